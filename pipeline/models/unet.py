"""The DDPM / DDPM++ U-Net (Ho et al. 2020, App. B; Song et al. 2021, App. H) and its named presets.

Topology is DDPM's CIFAR-10 model exactly: conv_in; per level `num_res_blocks` residual blocks (each
followed by attention at the attention resolutions) and a stride-2 conv between levels; middle
res–attn–res; per level `num_res_blocks + 1` blocks fed by concatenated encoder activations, nearest ×2
+ conv between levels; GN–SiLU–conv_out. With the `ddpm-cifar10` preset it has DDPM's 35,746,307
parameters.

Contract (shared with every sampler and loss): net(x [B,C,H,W], noise_labels [B] float,
class_labels [B] long | None) -> tensor shaped like x. noise_labels are whatever the caller conditions
on (999·t or ¼ ln σ, see `pipeline.diffusion.param.noise_label`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    AttnBlock,
    Downsample,
    FourierEmbedding,
    PositionalEmbedding,
    ResBlock,
    Upsample,
    conv3x3,
    group_norm,
    linear,
)

EMBEDDING_TYPES: tuple[str, ...] = ("positional", "fourier")


class UNet(nn.Module):
    """Noise-conditional U-Net of DDPM (Ho et al. 2020) / DDPM++ (Song et al. 2021): ε_θ(x, noise, class)."""

    def __init__(self, *, in_channels: int = 3, out_channels: int | None = None, image_size: int = 32,
                 channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 embedding_type: str = "positional", fourier_scale: float = 16.0,
                 num_classes: int | None = None, num_heads: int = 1, scale_shift: bool = False,
                 skip_rescale: bool = False, downsample_pad: str = "symmetric") -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        channel_mult, attn_resolutions = tuple(int(m) for m in channel_mult), tuple(attn_resolutions)
        _check_config(in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                      channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                      attn_resolutions=attn_resolutions, dropout=dropout, embedding_type=embedding_type,
                      num_classes=num_classes, num_heads=num_heads)
        # Everything needed to rebuild this network with UNet(**model.config) (checkpoints store it).
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, image_size=image_size, channels=channels,
            channel_mult=channel_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
            dropout=dropout, embedding_type=embedding_type, fourier_scale=fourier_scale,
            num_classes=num_classes, num_heads=num_heads, scale_shift=scale_shift, skip_rescale=skip_rescale,
            downsample_pad=downsample_pad)
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.num_classes = num_classes
        emb_dim = 4 * channels  # DDPM: temb is ch·4 wide

        # Noise-level embedding, then DDPM's 2-layer MLP (dense0 – SiLU – dense1).
        if embedding_type == "positional":
            self.noise_embed: nn.Module = PositionalEmbedding(channels)
        else:
            self.noise_embed = FourierEmbedding(channels, scale=fourier_scale)
        self.emb_mlp = nn.Sequential(linear(channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))
        # Row K is the learned null label ∅ of classifier-free guidance (Ho & Salimans 2022).
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

        block = dict(emb_dim=emb_dim, dropout=dropout, scale_shift=scale_shift, skip_rescale=skip_rescale)
        attn = dict(num_heads=num_heads, skip_rescale=skip_rescale)
        self.conv_in = conv3x3(in_channels, channels)
        self.down = nn.ModuleList()
        skip_channels, c, res = [channels], channels, image_size
        for level, mult in enumerate(channel_mult):
            stage = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.append(ResBlock(c, channels * mult, **block))
                c = channels * mult
                if res in attn_resolutions:
                    stage.append(AttnBlock(c, **attn))
                skip_channels.append(c)
            if level != len(channel_mult) - 1:
                stage.append(Downsample(c, pad=downsample_pad))
                skip_channels.append(c)
                res //= 2
            self.down.append(stage)

        self.mid = nn.ModuleList([ResBlock(c, c, **block), AttnBlock(c, **attn), ResBlock(c, c, **block)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            stage = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.append(ResBlock(c + skip_channels.pop(), channels * mult, **block))
                c = channels * mult
                if res in attn_resolutions:
                    stage.append(AttnBlock(c, **attn))
            if level != 0:
                stage.append(Upsample(c))
                res *= 2
            self.up.append(stage)
        assert not skip_channels  # every encoder activation is consumed exactly once

        self.norm_out = group_norm(c)
        self.conv_out = conv3x3(c, out_channels, scale=0.0)

    @property
    def null_label(self) -> int:
        """Index of the unconditional (null) class embedding, K for a K-class model."""
        if self.num_classes is None:
            raise ValueError("null_label: this UNet is unconditional (num_classes=None)")
        return self.num_classes

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        self._check_inputs(x, noise_labels, class_labels)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(B)

        emb = self.emb_mlp(self.noise_embed(noise_labels).to(self.emb_mlp[0].weight.dtype))
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(class_labels)
        emb = F.silu(emb)  # DDPM applies SiLU to temb before each block's projection; do it once

        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            for layer in stage:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
                if not isinstance(layer, AttnBlock):  # attention refines the block before it in place
                    hs.append(h)
                else:
                    hs[-1] = h
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for stage in self.up:
            for layer in stage:
                if isinstance(layer, ResBlock):
                    h = layer(torch.cat([h, hs.pop()], dim=1), emb)
                else:
                    h = layer(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h.to(x.dtype)

    def _check_inputs(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None) -> None:
        # Shape checks are static (free under torch.compile); the label-range check reads values, so
        # it runs only in eager mode, where a bad index would otherwise fail deep inside nn.Embedding.
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(x.shape)}")
        if noise_labels.ndim > 1 or (noise_labels.ndim == 1 and noise_labels.shape[0] != x.shape[0]):
            raise ValueError(f"noise_labels must have shape [B] = [{x.shape[0]}] (or be a scalar), "
                             f"got {tuple(noise_labels.shape)}")
        if class_labels is None:
            return
        if self.num_classes is None:
            raise ValueError("class_labels were given but this UNet is unconditional (num_classes=None)")
        if class_labels.ndim != 1 or class_labels.shape[0] != x.shape[0]:
            raise ValueError(f"class_labels must have shape [B] = [{x.shape[0]}], "
                             f"got {tuple(class_labels.shape)}")
        dtype = class_labels.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ValueError(f"class_labels must be an integer tensor, got dtype {class_labels.dtype}")
        if torch.compiler.is_compiling():
            return
        K = self.num_classes
        if bool(((class_labels < 0) | (class_labels > K)).any()):  # one host sync; min/max only on failure
            lo, hi = int(class_labels.min()), int(class_labels.max())
            raise ValueError(f"class_labels must lie in [0, {K}] ({K} = null label), "
                             f"got values in [{lo}, {hi}]")


def _check_config(*, in_channels: int, out_channels: int, image_size: int, channels: int,
                  channel_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                  dropout: float, embedding_type: str, num_classes: int | None, num_heads: int) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("image_size", image_size), ("channels", channels),
                        ("num_res_blocks", num_res_blocks), ("num_heads", num_heads)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty sequence of positive integers, "
                         f"got {channel_mult}")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size must be divisible by 2^(levels-1) = {factor} for {len(channel_mult)} "
                         f"levels (channel_mult={channel_mult}), got {image_size}")
    resolutions = tuple(image_size // 2**i for i in range(len(channel_mult)))
    bad = [r for r in attn_resolutions if r not in resolutions]
    if bad:
        raise ValueError(f"attn_resolutions must be among the level resolutions {resolutions}, got {bad}")
    for r in (*attn_resolutions, resolutions[-1]):  # the middle block always has attention
        width = channels * channel_mult[resolutions.index(r)]
        if width % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention width {width} at {r}×{r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"embedding_type must be one of {EMBEDDING_TYPES}, got {embedding_type!r}")
    if embedding_type == "fourier" and channels % 2:
        raise ValueError(f"channels must be even for the fourier embedding, got {channels}")
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")


# ---- presets --------------------------------------------------------------------------------------

_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=None, image_size=32, channels=128, channel_mult=(1, 2, 2, 2),
    num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, embedding_type="positional",
    fourier_scale=16.0, num_classes=None, num_heads=1, scale_shift=False, skip_rescale=False,
    downsample_pad="symmetric")

PRESETS: dict[str, dict[str, Any]] = {
    # Ho et al. 2020, App. B: the 35.7M-parameter CIFAR-10 model.
    "ddpm-cifar10": {},
    "ddpm-cifar10-cond": dict(num_classes=10),
    # The embedded sklearn digits (8×8, 1 channel, 10 classes); trains on 2 CPU cores in minutes.
    "tiny-digits": dict(in_channels=1, image_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=2,
                        attn_resolutions=(4,), num_classes=10),
    # A 32×32×3 model small enough to train on a CPU.
    "small-32": dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,)),
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword dict of a preset (with overrides), such that UNet(**cfg) rebuilds it exactly."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown UNet override(s) {unknown}; allowed: {sorted(_DEFAULTS)}")
    cfg = {**copy.deepcopy(_DEFAULTS), **copy.deepcopy(PRESETS[name]), **overrides}
    if cfg["out_channels"] is None:
        cfg["out_channels"] = cfg["in_channels"]
    for key in ("channel_mult", "attn_resolutions"):
        cfg[key] = tuple(cfg[key])
    return cfg


def build_unet(preset: str, **overrides: Any) -> UNet:
    """Build a UNet from a named preset in PRESETS, e.g. build_unet("ddpm-cifar10", dropout=0.0)."""
    return UNet(**preset_config(preset, **overrides))


__all__ = ["EMBEDDING_TYPES", "PRESETS", "UNet", "build_unet", "preset_config"]
