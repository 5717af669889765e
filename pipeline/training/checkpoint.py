"""Training checkpoints on any storage URI: plain state_dicts, atomic writes, keep-last-k, EMA export.

A checkpoint is the dict `Trainer.state_dict()` returns (tensors, numbers, strings, lists, dicts:
no pickled classes), so it loads with `torch.load(..., weights_only=True)` on any machine. Each one
is written to a temporary key and moved into place (`storage.atomic_write`): a writer that crashes
or dies mid-write leaves the previous checkpoint as the latest loadable one and nothing at the new key.

Layout under a run's root URI:
    {root}/checkpoints/step-00001000.pt   one per checkpoint, the last `keep_last` kept
    {root}/ema-final.pt                    the EMA weights for sampling: {"ema", "config", "step", "network"}
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import storage
from ..config import TrainConfig
from ..diffusion.sde import SDE, ScoreFn

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
_ZIP_MAGIC = b"PK\x03\x04"
EMA_EXPORT = "ema-final.pt"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")
# What atomic_write leaves behind when its writer process is killed: ".{name}.tmp-{hex}".
_ORPHAN = re.compile(r"^\.step-(\d{8,})\.pt\.tmp-[0-9a-f]+$")


def checkpoint_uri(root: str, step: int) -> str:
    """URI of the checkpoint taken after `step` optimiser steps."""
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return storage.join(root, CHECKPOINT_DIR, f"step-{int(step):08d}.pt")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, uri) of every complete checkpoint under `root`, oldest first."""
    found = []
    for name in storage.listdir(storage.join(root, CHECKPOINT_DIR)):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), storage.join(root, CHECKPOINT_DIR, name)))
    return sorted(found)


def load_latest(root: str, *, map_location: str | torch.device = "cpu",
                say: Callable[[str], None] | None = None) -> tuple[str | None, dict[str, Any] | None]:
    """(uri, state) of the newest checkpoint under `root` that loads, or (None, None) when none does.

    A newer checkpoint that does not load (truncated, corrupted, tampered) is skipped, and `say` (or
    the log) is told which one and why: a resume then redoes one interval more instead of failing."""
    for _, uri in reversed(list_checkpoints(root)):
        try:
            return uri, load_checkpoint(uri, map_location=map_location)
        except (ValueError, FileNotFoundError) as e:
            line = f"skipping checkpoint {uri}: {e}"
            (say or log.warning)(line)
    return None, None


def latest_checkpoint(root: str) -> str | None:
    """URI of the newest checkpoint under `root`, or None when there is none."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str, state: dict[str, Any], *, step: int | None = None, keep_last: int = 3) -> str:
    """Write `state` atomically to `{root}/checkpoints/step-{step}.pt`, then keep only the newest `keep_last`.

    `step` defaults to `state["position"]["step"]` (what `Trainer.state_dict()` records).
    """
    if int(keep_last) != keep_last or keep_last < 1:
        raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
    if step is None:
        try:
            step = int(state["position"]["step"])
        except (KeyError, TypeError) as e:
            raise ValueError("save_checkpoint: pass step= or a state with state['position']['step']") from e
    uri = checkpoint_uri(root, step)
    # torch.save streams into the temporary object; only a complete file is moved to `uri`.
    with storage.atomic_write(uri, "wb") as f:
        torch.save(state, f)
    prune_checkpoints(root, keep_last=keep_last, up_to_step=step)
    return uri


def prune_checkpoints(root: str, *, keep_last: int, up_to_step: int | None = None) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints, and temporary objects left by killed writers
    for steps ≤ `up_to_step` (a live writer only ever works on a newer step). Returns the removed URIs."""
    folder = storage.join(root, CHECKPOINT_DIR)
    removed = [uri for _, uri in list_checkpoints(root)[:-keep_last]]
    if up_to_step is not None:
        removed += [storage.join(folder, name) for name in storage.listdir(folder)
                    if (m := _ORPHAN.match(name)) and int(m.group(1)) <= up_to_step]
    for uri in removed:
        storage.remove(uri)
    return removed


def load_checkpoint(uri: str, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers, never pickled code."""
    return _load_bytes(storage.read_bytes(uri), uri, map_location)


def _load_bytes(data: bytes, uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not data:
        raise ValueError(f"checkpoint {uri} is empty (0 bytes): not a checkpoint this project wrote")
    if not data.startswith(_ZIP_MAGIC):  # torch.save has written zip archives since PyTorch 1.6
        raise ValueError(f"checkpoint {uri} is not a PyTorch checkpoint ({len(data)} bytes starting "
                         f"{data[:8]!r}): corrupt, truncated, or not a file this project wrote")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file holds code
        found = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line),
                     "objects other than tensors")
        raise ValueError(f"checkpoint {uri} holds more than tensors and plain containers ({found}); "
                         "refused by weights_only=True loading, since loading it could run code") from None
    except Exception as e:  # a damaged archive: say which file and what broke
        detail = str(e).splitlines()[0] if str(e).strip() else "no detail"
        raise ValueError(f"checkpoint {uri} is corrupt ({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {uri} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def export_ema(uri: str, *, ema: dict[str, Any] | nn.Module, config: dict[str, Any], step: int,
               network: dict[str, Any] | None = None) -> str:
    """Write the EMA weights for sampling: {"ema": network state_dict, "config", "step", "network"}.

    `ema` is the EMA module, its state_dict, or an `EMA.state_dict()` (whose "module" entry is used);
    `network` is the U-Net's constructor config (`UNet.config`), so a sampler can rebuild the network
    without knowing the preset.
    """
    if isinstance(ema, nn.Module):
        weights = ema.state_dict()
    elif "module" in ema and isinstance(ema["module"], dict):
        weights = ema["module"]
    else:
        weights = ema
    payload = {"ema": weights, "config": dict(config), "step": int(step)}
    if network is not None:
        payload["network"] = {k: list(v) if isinstance(v, tuple) else v for k, v in network.items()}
    with storage.atomic_write(uri, "wb") as f:
        torch.save(payload, f)
    return uri


# ---- reading a network for sampling and evaluation ---------------------------------------------


@dataclass
class SamplingModel:
    """A network rebuilt from a checkpoint, with how its output is read as a score."""

    net: nn.Module
    sde: SDE
    config: TrainConfig
    parameterization: str
    noise_label_kind: str
    sigma_data: float
    num_classes: int | None
    image_shape: tuple[int, int, int]
    checkpoint_uri: str
    checkpoint_sha256: str
    step: int | None
    weights: str  # "ema" or "model"

    @classmethod
    def from_parts(cls, net: nn.Module, sde: SDE, config: TrainConfig, *, uri: str = "<in-memory>",
                   sha256: str = "", step: int | None = None, weights: str = "ema") -> SamplingModel:
        """Read `net` as the run `config` trained it (its loss names the parameterisation)."""
        lk = dict(config.loss_kwargs)
        inner = getattr(net, "net", net)  # an AutocastNet keeps the U-Net as .net
        return cls(net=net, sde=sde, config=config,
                   parameterization="edm" if config.loss == "edm" else lk.get("parameterization", "eps"),
                   noise_label_kind=lk.get("noise_label_kind", "log_sigma"),
                   sigma_data=float(lk.get("sigma_data", 0.5)),
                   num_classes=getattr(inner, "num_classes", None),
                   image_shape=(int(inner.in_channels), int(inner.image_size), int(inner.image_size)),
                   checkpoint_uri=uri, checkpoint_sha256=sha256, step=step, weights=weights)

    @classmethod
    def from_trainer(cls, trainer: Any) -> SamplingModel:
        """A live trainer's EMA network, read exactly as `load_model` reads its checkpoint."""
        return cls.from_parts(trainer.ema.module, trainer.sde, trainer.config, uri="<in-memory EMA>",
                              step=trainer.position.step)

    @property
    def null_label(self) -> int | None:
        return None if self.num_classes is None else int(self.num_classes)

    def check_guidance(self, w: float) -> None:
        if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"guidance w must be a finite number >= 0, got {w!r}")
        if w > 0 and self.num_classes is None:
            raise ValueError(f"guidance w={w}: the model of {self.checkpoint_uri} is unconditional "
                             f"(preset {self.config.preset!r} has no classes); use w=0")

    def score_fn(self, class_labels: Tensor | None, w: float = 0.0, *,
                 interval: tuple[float, float] = (0.0, math.inf),
                 guide: SamplingModel | None = None) -> ScoreFn:
        """score_fn(x, t) for these labels.

        Without `guide`: w > 0 is classifier-free guidance (1 + w) s(x, c) − w s(x, ∅) (Ho & Salimans
        2022, eq. 6), applied only where σ̃ = σ/α lies in `interval` = (σ_lo, σ_hi] (Kynkäänniemi et al.
        2024) and the conditional score elsewhere. With `guide` (a weaker model of the same data, e.g. an
        earlier or smaller checkpoint): autoguidance D_w = D_guide + w (D_main − D_guide) (Karras et al.
        2024), so w = 1 is the main model and w = 0 the guide; it needs no classes.
        """
        from ..diffusion.guidance import autoguided, cfg_score_fn, check_autoguide, check_interval
        from ..diffusion.guidance import guidance_interval as within
        from ..diffusion.param import make_score_fn

        sigma_lo, sigma_hi = check_interval(*interval)
        kw = {"noise_label_kind": self.noise_label_kind, "sigma_data": self.sigma_data}
        if guide is not None:
            if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"guidance w must be a finite number >= 0, got {w!r}")
            inner = lambda m: getattr(m.net, "net", m.net)  # noqa: E731  (the U-Net inside AutocastNet)
            check_autoguide(inner(self), inner(guide), image_shape=self.image_shape,
                            guide_image_shape=guide.image_shape)
            main = make_score_fn(self.net, self.sde, self.parameterization, class_labels=class_labels, **kw)
            weak = guide.score_fn(class_labels)
            return within(autoguided(main, weak, w), main, self.sde, sigma_lo, sigma_hi)
        self.check_guidance(w)
        if w > 0:
            return cfg_score_fn(self.net, self.sde, self.parameterization, class_labels, self.null_label, w,
                                sigma_lo=sigma_lo, sigma_hi=sigma_hi, **kw)
        return make_score_fn(self.net, self.sde, self.parameterization, class_labels=class_labels, **kw)

    def describe(self) -> dict[str, Any]:
        return {"uri": self.checkpoint_uri, "sha256": self.checkpoint_sha256, "step": self.step,
                "weights": self.weights, "preset": self.config.preset,
                "model_overrides": self.config.model_overrides, "sde": self.sde.config(),
                "parameterization": self.parameterization, "noise_label_kind": self.noise_label_kind,
                "sigma_data": self.sigma_data, "num_classes": self.num_classes}


PRECISIONS = ("fp32", "bf16")
_FORMS = ("a trainer checkpoint {model, ema, optimizer, position, rng, config} or an EMA export "
          "{ema, config, step[, network]}")


def _weights_of(state: dict[str, Any], uri: str, weights: str) -> tuple[dict[str, Tensor], str, int | None]:
    """The network state_dict of a trainer checkpoint or an EMA export, which weights, and the step."""
    if "config" not in state or not ({"ema", "model"} & set(state)):
        raise ValueError(f"checkpoint {uri}: expected {_FORMS}; found keys {sorted(state)}")
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if weights == "model" and "model" not in state:
        raise ValueError(f"checkpoint {uri} is an EMA export: it has no raw 'model' weights; "
                         "use weights='ema'")
    used = weights if weights in state else "model"
    sd = state[used]
    if used == "ema" and isinstance(sd, dict) and isinstance(sd.get("module"), dict):
        sd = sd["module"]  # EMA.state_dict() = {"module": ..., "nimg", ...}
    step = state.get("step")
    if step is None and isinstance(state.get("position"), dict):
        step = state["position"].get("step")
    return sd, used, None if step is None else int(step)


def _build_network(state: dict[str, Any], config: TrainConfig, uri: str) -> nn.Module:
    """The network of a checkpoint: from its recorded constructor config ("network", written by
    `export_ema`) when present, so that networks the presets do not name load too; else the preset."""
    from ..models import UNet, build_unet, preset_config

    network = state.get("network")
    if isinstance(network, dict):
        try:
            return UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in network.items()})
        except TypeError as e:
            raise ValueError(f"checkpoint {uri}: its 'network' entry does not build a UNet: {e}") from e
    preset_config(config.preset, **config.model_overrides)  # ValueError naming the preset/override
    return build_unet(config.preset, **config.model_overrides)


def _check_matches(net: nn.Module, sd: dict[str, Tensor], uri: str, preset: str) -> None:
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else ""]
        raise ValueError(f"checkpoint {uri} does not match preset {preset!r}: "
                         + "; ".join(p for p in parts if p))


def load_model(uri: str, *, device: torch.device | str = "cpu", weights: str = "ema",
               precision: str = "fp32") -> SamplingModel:
    """The one reader of every checkpoint the project writes (trainer state or EMA export): a ready
    network (eval mode, no grad, bf16 autocast when asked) with its process and parameterisation."""
    from ..diffusion.sde import build_sde
    from ..models import AutocastNet

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    data = storage.read_bytes(uri)
    state = _load_bytes(data, uri)
    sd, used, step = _weights_of(state, uri, weights)
    config = TrainConfig.from_dict(state["config"])
    net = _build_network(state, config, uri)
    _check_matches(net, sd, uri, config.preset)
    net.load_state_dict(sd)
    net = net.to(device).eval().requires_grad_(False)
    sde = build_sde(config.sde, **config.sde_kwargs)
    wrapped = AutocastNet(net, torch.bfloat16 if precision == "bf16" else None)
    return SamplingModel.from_parts(wrapped, sde, config, uri=uri, sha256=hashlib.sha256(data).hexdigest(),
                                    step=step, weights=used)


def unconditional_score_fn(uri: str) -> ScoreFn:
    """The unconditional score of the checkpoint at `uri`, on this process's GPU when it has one (what a
    Ray task of `evaluation.bpd.evaluate_bpd_ray` builds on its worker; picklable with functools.partial)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return load_model(uri, device=device).score_fn(None)


__all__ = ["CHECKPOINT_DIR", "EMA_EXPORT", "PRECISIONS", "SamplingModel", "checkpoint_uri", "export_ema",
           "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_model", "prune_checkpoints",
           "save_checkpoint", "unconditional_score_fn"]
