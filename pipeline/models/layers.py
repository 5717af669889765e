"""Building blocks of the DDPM / DDPM++ U-Net (Ho et al. 2020, App. B; Song et al. 2021, App. H).

Every block takes activations in NCHW (contiguous or channels_last) and keeps the layout it was given,
so a model converted with `.to(memory_format=torch.channels_last)` stays channels_last end to end.
No block branches on tensor values, so `torch.compile` traces each one into a single graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# DDPM's TF group norm uses ε = 1e-6 (tf.contrib.layers.group_norm default); score_sde keeps it.
GROUPNORM_EPS = 1e-6
MAX_GROUPS = 32
# EDM (Karras et al. 2022, networks.py) never lets a group hold fewer than 4 channels: with 1-channel
# groups a 4×4 feature map is normalised over 16 numbers, which makes tiny models train badly.
MIN_CHANNELS_PER_GROUP = 4


def num_groups(channels: int) -> int:
    """Groups for GroupNorm: 32 as in DDPM, fewer for narrow layers (the largest divisor that fits)."""
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    limit = max(1, min(MAX_GROUPS, channels // MIN_CHANNELS_PER_GROUP))
    return next(g for g in range(limit, 0, -1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=GROUPNORM_EPS)


def init_ddpm_(module: nn.Module, scale: float = 1.0) -> nn.Module:
    """DDPM's `default_init`: variance scaling, fan_avg, uniform (i.e. Xavier-uniform); zero biases.

    `scale=0` gives the zero init DDPM uses on each block's last layer and on the output conv, so a
    fresh residual block is the identity and a fresh network outputs zeros.
    """
    weight = module.weight
    if scale == 0:
        nn.init.zeros_(weight)
    else:
        nn.init.xavier_uniform_(weight, gain=math.sqrt(scale))
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


def conv3x3(c_in: int, c_out: int, stride: int = 1, scale: float = 1.0) -> nn.Conv2d:
    return init_ddpm_(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), scale)


def linear(c_in: int, c_out: int, scale: float = 1.0) -> nn.Linear:
    return init_ddpm_(nn.Linear(c_in, c_out), scale)


def positional_embedding(noise_labels: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of Vaswani et al. 2017 as DDPM's `get_timestep_embedding`: [B] -> [B, dim].

    Frequencies are max_period^(-i/(half-1)), i = 0..half-1; output is [sin, cos] (zero-padded if dim
    is odd). Computed in at least float32: bf16 cannot resolve sin(999·t).
    """
    half = dim // 2
    dtype = torch.promote_types(noise_labels.dtype, torch.float32)
    exponent = torch.arange(half, device=noise_labels.device, dtype=dtype) / max(half - 1, 1)
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = noise_labels.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class PositionalEmbedding(nn.Module):
    """DDPM's fixed sinusoidal noise-level embedding (Ho et al. 2020, §4)."""

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.max_period = dim, max_period

    def forward(self, noise_labels: Tensor) -> Tensor:
        return positional_embedding(noise_labels, self.dim, self.max_period)


class FourierEmbedding(nn.Module):
    """Random Fourier features of NCSN++ (Song et al. 2021, App. H; Tancik et al. 2020): [B] -> [B, dim].

    The frequencies ω ~ N(0, scale²) are a buffer, not a parameter: they are drawn once, saved in the
    state_dict and never trained, as in score_sde's GaussianFourierProjection.
    """

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"fourier embedding dim must be even, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, noise_labels: Tensor) -> Tensor:
        dtype = torch.promote_types(noise_labels.dtype, torch.float32)
        args = (2 * math.pi) * noise_labels.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """DDPM residual block (Ho et al. 2020, App. B) with DDPM++ options (Song et al. 2021, App. H).

    h = conv1(SiLU(GN(x))) + W·emb;  h = conv2(dropout(SiLU(GN(h))));  out = skip(x) + h.
    `scale_shift`: the embedding instead modulates the second norm, GN(h)·(1 + s) + b (FiLM, as in
    Dhariwal & Nichol 2021). `skip_rescale`: out / √2, DDPM++'s variance-preserving sum.
    `emb` is the already-activated embedding SiLU(e) (DDPM applies SiLU before every projection).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0,
                 scale_shift: bool = False, skip_rescale: bool = False) -> None:
        super().__init__()
        self.scale_shift, self.dropout = scale_shift, dropout
        self.out_scale = 1 / math.sqrt(2) if skip_rescale else 1.0
        self.norm1 = group_norm(c_in)
        self.conv1 = conv3x3(c_in, c_out)
        self.emb_proj = linear(emb_dim, c_out * (2 if scale_shift else 1))
        self.norm2 = group_norm(c_out)
        self.conv2 = conv3x3(c_out, c_out, scale=0.0)
        # DDPM's `nin_shortcut`: a 1×1 conv only where the width changes.
        self.skip = init_ddpm_(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(F.dropout(F.silu(h), p=self.dropout, training=self.training))
        out = self.skip(x) + h
        return out * self.out_scale if self.out_scale != 1.0 else out


class AttnBlock(nn.Module):
    """Self-attention over the H·W positions (Ho et al. 2020's `attn_block`, multi-head optional).

    q, k, v and the output projection are DDPM's 1×1 `nin` layers, written as one fused qkv linear on
    the [B, HW, C] token view (same parameter count: 3C² + 3C, then C² + C) so a channels_last input
    needs no copy; the product is F.scaled_dot_product_attention (flash / memory-efficient kernels).
    """

    def __init__(self, channels: int, num_heads: int = 1, skip_rescale: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads must be a positive divisor of the attention width {channels}, "
                             f"got {num_heads}")
        self.num_heads = num_heads
        self.out_scale = 1 / math.sqrt(2) if skip_rescale else 1.0
        self.norm = group_norm(channels)
        self.qkv = linear(channels, 3 * channels)
        self.proj = linear(channels, channels, scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]; a view for channels_last
        qkv = self.qkv(tokens).view(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √d) v
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))
        out = x + h.transpose(1, 2).reshape(B, C, H, W)
        return out * self.out_scale if self.out_scale != 1.0 else out


DOWNSAMPLE_PADS: tuple[str, ...] = ("symmetric", "tf_same")


class Downsample(nn.Module):
    """Stride-2 3×3 conv (DDPM's `downsample` with `resamp_with_conv=True`).

    `pad="symmetric"` pads one pixel on every side; "tf_same" pads only right and bottom, which is what
    TensorFlow's SAME padding does for a stride-2 3×3 conv on an even size, so DDPM's released weights
    (and diffusers' `downsample_padding=0`) see the windows they were trained with.
    """

    def __init__(self, channels: int, pad: str = "symmetric") -> None:
        super().__init__()
        if pad not in DOWNSAMPLE_PADS:
            raise ValueError(f"downsample_pad must be one of {DOWNSAMPLE_PADS}, got {pad!r}")
        self.pad = pad
        self.conv = conv3x3(channels, channels, stride=2)
        if pad == "tf_same":
            self.conv.padding = (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad == "tf_same":
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv (DDPM's `upsample` with `resamp_with_conv=True`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


__all__ = [
    "DOWNSAMPLE_PADS", "AttnBlock", "Downsample", "FourierEmbedding", "PositionalEmbedding", "ResBlock",
    "Upsample",
    "group_norm", "init_ddpm_", "num_groups", "positional_embedding",
]
