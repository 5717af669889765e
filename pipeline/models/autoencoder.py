"""A small convolutional autoencoder for latent diffusion (Rombach et al. 2022, §3 and App. G).

Encoder E: conv_in; per level `num_res_blocks` residual blocks, then a stride-2 conv (all levels but
the last); GN–SiLU–conv to 2·z_channels (mean and log-variance of q(z|x)) for a VAE, or z_channels for a
plain autoencoder. Decoder D mirrors it with nearest ×2 + conv. The downsampling factor is
f = 2^(len(channel_mult) − 1), so an H×W×C image has an (H/f)×(W/f)×z_channels latent.

Kinds:
- "vae": KL-regularised, q(z|x) = N(μ(x), diag σ²(x)) (Rombach et al. 2022, "KL-reg.");
- "ae": deterministic z = E(x) (a plain autoencoder; its latents are rescaled to unit std, Rombach
  et al. 2022, §4.3.2 and App. G, "scale factor");
- "identity": z = x, D(z) = z, no parameters to learn (the latent branch then is the pixel branch).

Training contract (the one the Trainer's autocast/DDP wrappers expect, net(x, a, b) -> Tensor):
`forward(x, eps)` returns one tensor [B, D + 1] packing the flattened reconstruction x̂ = D(μ + σ·ε)
and the per-sample KL(q(z|x) ‖ N(0, I)) in nats; `unpack(out, shape)` splits it. `AutoencoderLoss`
is the matching per-sample loss.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS: tuple[str, ...] = ("vae", "ae", "identity")
RECONSTRUCTIONS: tuple[str, ...] = ("mse", "l1")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c) if c % min(32, c) == 0 else 1, c, eps=1e-6)


class _Res(nn.Module):
    """GN–SiLU–conv ×2 with a skip (no noise embedding: the autoencoder is not noise-conditional)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.n1, self.c1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.n2, self.c2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class Autoencoder(nn.Module):
    """E: x [B, C, H, W] → z [B, z_channels, H/f, W/f]; D: z → x̂. See the module docstring."""

    def __init__(
        self,
        *,
        kind: str = "vae",
        in_channels: int = 3,
        image_size: int = 32,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 4,
        logvar_min: float = -30.0,
        logvar_max: float = 20.0,
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        _check_config(
            kind=kind,
            in_channels=in_channels,
            image_size=image_size,
            channels=channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
        )
        if kind == "identity":
            z_channels, channel_mult = in_channels, (1,)
        self.config: dict[str, Any] = dict(
            kind=kind,
            in_channels=in_channels,
            image_size=image_size,
            channels=channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            logvar_min=logvar_min,
            logvar_max=logvar_max,
        )
        self.kind, self.in_channels, self.image_size, self.z_channels = (
            kind,
            in_channels,
            image_size,
            z_channels,
        )
        self.factor = 2 ** (len(channel_mult) - 1)
        self.logvar_range = (logvar_min, logvar_max)
        if kind == "identity":
            # One frozen buffer so that the checkpoint machinery (EMA, optimiser) has a state to save.
            self.register_buffer("_identity", torch.zeros(()))
            self.dummy = nn.Parameter(torch.zeros(()), requires_grad=True)
            return
        widths = [channels * m for m in channel_mult]
        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(_Res(c, w))
                c = w
            if i < len(widths) - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        moments = 2 * z_channels if kind == "vae" else z_channels
        enc += [_Res(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, moments, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(z_channels, c, 3, padding=1), _Res(c, c)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                dec.append(_Res(c, w))
                c = w
            if i > 0:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        dec += [_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(z_channels, H/f, W/f)."""
        s = self.image_size // self.factor
        return (self.z_channels, s, s)

    def check_input(self, x: Tensor) -> None:
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"autoencoder input has shape {tuple(x.shape)}; expected [B, {want[0]}, {want[1]}, {want[2]}]"
            )

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z|x); a deterministic encoder has log σ² = −∞ (returned as −inf)."""
        if self.kind == "identity":
            return x, torch.full_like(x, -math.inf)
        h = self.encoder(x)
        if self.kind == "ae":
            return h, torch.full_like(h, -math.inf)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*self.logvar_range)  # clamped as Rombach et al.'s DiagonalGaussian

    def encode(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """z = μ + σ·ε (the mode μ when eps is None or the encoder is deterministic)."""
        mean, logvar = self.moments(x)
        if eps is None or self.kind != "vae":
            return mean
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor) -> Tensor:
        if self.kind == "identity":
            return z
        return self.decoder(z)

    def forward(self, x: Tensor, eps: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Training forward: [B, D + 1] = (flattened x̂, KL in nats per sample). See `unpack`."""
        mean, logvar = self.moments(x)
        if self.kind == "vae":
            z = mean + torch.exp(0.5 * logvar) * eps
            # KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (μ² + σ² − 1 − log σ²) (Kingma & Welling 2014, App. B)
            # (in fp32: under bf16 autocast a sum of many small terms would lose digits)
            m, lv = mean.float(), logvar.float()
            kl = 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).flatten(1).sum(1)
        else:
            z, kl = mean, mean.new_zeros(mean.shape[0])
        x_hat = self.decode(z)
        if self.kind == "identity":
            x_hat = x_hat + 0.0 * self.dummy  # keeps a (zero) gradient path for the optimiser
        return torch.cat([x_hat.float().flatten(1), kl.float()[:, None]], dim=1)

    @staticmethod
    def unpack(out: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(x̂ shaped `shape`, KL [B]) from the training forward's packed output."""
        return out[:, :-1].reshape(tuple(shape)), out[:, -1]


class AutoencoderLoss:
    """Per-sample autoencoder loss: L = rec(x, x̂) + β·KL(q(z|x) ‖ N(0, I)) / D.

    rec is the per-pixel mean squared ("mse") or absolute ("l1") error, KL is in nats summed over the
    latent and divided by the D pixel dimensions so that β is per pixel (Rombach et al. 2022 use a
    small β ≈ 1e-6 so that the latent stays expressive; their perceptual and GAN terms are left out).
    Same interface as the diffusion losses: `forward_with_noise(model, x, labels, generator=)`
    returns (per-sample loss [B], a per-sample "σ" [B]); σ = 0 here (the Trainer's loss buckets are
    per noise level, and an autoencoder has one).
    """

    def __init__(
        self, *, latent_shape: Sequence[int], reconstruction: str = "mse", kl_weight: float = 1e-6
    ) -> None:
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
        if not (isinstance(kl_weight, int | float) and 0 <= kl_weight < math.inf):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        self.latent_shape, self.reconstruction, self.kl_weight = (
            tuple(latent_shape),
            reconstruction,
            kl_weight,
        )

    def forward_with_noise(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        eps = torch.randn(
            (x.shape[0], *self.latent_shape), generator=generator, device=x.device, dtype=x.dtype
        )
        x_hat, kl = Autoencoder.unpack(model(x, eps, None), x.shape)
        err = x_hat - x
        rec = (err.pow(2) if self.reconstruction == "mse" else err.abs()).flatten(1).mean(1)
        loss = rec + self.kl_weight * kl / x[0].numel()
        return loss, torch.zeros_like(loss)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return self.forward_with_noise(model, x, labels, generator=generator)[0]


def _check_config(
    *,
    kind: str,
    in_channels: int,
    image_size: int,
    channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    z_channels: int,
) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for name, v in (
        ("in_channels", in_channels),
        ("image_size", image_size),
        ("channels", channels),
        ("num_res_blocks", num_res_blocks),
        ("z_channels", z_channels),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of integers >= 1, got {channel_mult}")
    f = 2 ** (len(channel_mult) - 1)
    if kind != "identity" and image_size % f:
        raise ValueError(
            f"image_size {image_size} is not divisible by the downsampling factor {f} "
            f"(channel_mult={channel_mult})"
        )


_DEFAULTS: dict[str, Any] = dict(
    kind="vae",
    in_channels=3,
    image_size=32,
    channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    z_channels=4,
    logvar_min=-30.0,
    logvar_max=20.0,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded 8×8×1 digits: f = 2, a 4×4×2 latent (32 numbers for 64 pixels).
    "vae-digits": dict(
        in_channels=1, image_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=2
    ),
    # 32×32×3 images: f = 4, an 8×8×4 latent (Rombach et al. 2022's KL-f4 shape, smaller network).
    "vae-32": dict(
        in_channels=3, image_size=32, channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4
    ),
    # The identity (latent = pixels): the latent branch's control, reproducing the pixel branch.
    "identity-digits": dict(kind="identity", in_channels=1, image_size=8),
    "identity-32": dict(kind="identity", in_channels=3, image_size=32),
}


def autoencoder_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword dict of an autoencoder preset, such that Autoencoder(**cfg) rebuilds it."""
    if preset not in PRESETS:
        raise ValueError(f"autoencoder preset must be one of {sorted(PRESETS)}, got {preset!r}")
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown autoencoder override(s) {unknown}; allowed: {sorted(_DEFAULTS)}")
    cfg = {**copy.deepcopy(_DEFAULTS), **copy.deepcopy(PRESETS[preset]), **overrides}
    cfg["channel_mult"] = tuple(cfg["channel_mult"])
    return cfg


def build_autoencoder(preset: str, **overrides: Any) -> Autoencoder:
    """Build an Autoencoder from a named preset in PRESETS (overrides: kind, z_channels, ...)."""
    return Autoencoder(**autoencoder_config(preset, **overrides))


def build_autoencoder_loss(net: Autoencoder, **loss_kwargs: Any) -> AutoencoderLoss:
    """The loss matching `net` (its latent shape); loss_kwargs: reconstruction, kl_weight."""
    allowed = {"reconstruction", "kl_weight"}
    unknown = sorted(set(loss_kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown autoencoder loss option(s) {unknown}; allowed: {sorted(allowed)}")
    return AutoencoderLoss(latent_shape=net.latent_shape, **loss_kwargs)


__all__ = [
    "KINDS",
    "PRESETS",
    "RECONSTRUCTIONS",
    "Autoencoder",
    "AutoencoderLoss",
    "autoencoder_config",
    "build_autoencoder",
    "build_autoencoder_loss",
]
