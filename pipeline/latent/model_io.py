"""Reading an autoencoder checkpoint (a trainer checkpoint or EMA export of a `model="autoencoder"` run)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .. import storage
from ..config import TrainConfig
from ..models.autoencoder import Autoencoder, autoencoder_config
from ..training.checkpoint import _check_matches, _load_bytes, _weights_of


@dataclass
class LoadedAutoencoder:
    """A ready autoencoder (eval mode, no grad) and where it came from (its sha256 names it)."""

    net: Autoencoder
    config: TrainConfig
    uri: str
    sha256: str
    step: int | None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.net.latent_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.image_size, self.net.image_size)


def load_autoencoder(
    uri: str, *, device: torch.device | str = "cpu", weights: str = "ema"
) -> LoadedAutoencoder:
    """The autoencoder of checkpoint `uri`. ValueError when it is not an autoencoder checkpoint or its
    weights do not match the network its config names (nothing is written either way)."""
    data = storage.read_bytes(uri)
    state = _load_bytes(data, uri)
    sd, _, step = _weights_of(state, uri, weights)
    config = TrainConfig.from_dict(state["config"])
    if config.model != "autoencoder":
        raise ValueError(
            f"checkpoint {uri} is a {config.model!r} checkpoint (preset {config.preset!r}), "
            "not an autoencoder: pass the autoencoder stage's checkpoint"
        )
    network = state.get("network")
    cfg = (
        {k: tuple(v) if isinstance(v, list) else v for k, v in network.items()}
        if isinstance(network, dict)
        else autoencoder_config(config.preset, **config.model_overrides)
    )
    net = Autoencoder(**cfg)
    _check_matches(net, sd, uri, config.preset)  # ValueError: "does not match preset ..."
    net.load_state_dict(sd)
    net = net.to(device).eval().requires_grad_(False)
    return LoadedAutoencoder(
        net=net, config=config, uri=uri, sha256=hashlib.sha256(data).hexdigest(), step=step
    )


def identity_autoencoder(image_shape: tuple[int, int, int], uri: str) -> str:
    """Write the identity "autoencoder" (latent = pixels) for images [C, H, W] as an EMA export at `uri`
    (the latent branch's control: it must reproduce the pixel branch)."""
    from ..training.checkpoint import export_ema

    c, h, w = image_shape
    if h != w:
        raise ValueError(f"image_shape {image_shape}: the autoencoder takes square images")
    net = Autoencoder(kind="identity", in_channels=c, image_size=h)
    cfg = TrainConfig(
        model="autoencoder",
        preset="identity-digits" if c == 1 else "identity-32",
        model_overrides={"in_channels": c, "image_size": h},
        steps=1,
    )
    return export_ema(uri, ema=net.state_dict(), config=cfg.to_dict(), step=0, network=net.config)


__all__ = ["LoadedAutoencoder", "identity_autoencoder", "load_autoencoder"]
