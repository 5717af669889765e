"""Uniform dequantisation of L-level data scaled to [-1, 1], and its exact bits/dim offset.

Data with L levels is stored as integers k ∈ {0, …, L-1} and fed to the model as
    x = k·Δ - 1,   Δ = 2/(L-1)                      (256 levels: x = k/127.5 - 1; digits: L = 17).
Uniform dequantisation (Uria et al. 2013; Theis et al. 2016) draws y = k + u, u ~ U(0, 1), a point of the
integer-grid cell [k, k+1) ⊂ [0, L), and maps it affinely into model space with the cell centred on x:
    x_deq = (y - ½)·Δ - 1 = x + (u - ½)·Δ.
The map y ↦ x_deq has Jacobian Δ per dimension, so a model density p(x_deq) on D dimensions gives the
density Δ^D·p(x_deq) on the integer grid, and by Jensen's inequality the discrete model P(k) obeys
    log P(k) ≥ E_u[log p(x_deq)] + D·log Δ = E_u[log p(x_deq)] - D·log((L-1)/2).
In bits/dim,
    bits/dim = -(log p(x_deq) + D·log(2/(L-1))) / (D ln 2) = -log p(x_deq)/(D ln 2) + log₂((L-1)/2),
an offset of log₂(127.5) ≈ 6.9944 bits/dim for 8-bit data and exactly 3 bits/dim for L = 17.
(score_sde maps y to 2y/L - 1 instead, cells of width 2/L that do not centre the grid values, and adds
log₂(L/2) = 7 for L = 256; both are valid bounds on log P(k), for slightly different continuous inputs.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Off-grid tolerance in units of one level: float32 images k/127.5 - 1 round-trip to within ~1e-5.
_GRID_TOL = 1e-3


def check_levels(levels: object) -> int:
    """Validate a number of data levels L (an integer ≥ 2)."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"dequantize levels must be an integer >= 2 (256 for 8-bit data), got {levels!r}")
    return levels


def bin_width(levels: int) -> float:
    """Δ = 2/(L-1), the spacing of L levels on [-1, 1]."""
    return 2.0 / (check_levels(levels) - 1)


def logp_offset(levels: int, dims: int) -> float:
    """D·log Δ = D·log(2/(L-1)) nats, added to a continuous log-density of x_deq to bound log P(k)."""
    return dims * math.log(bin_width(levels))


def offset_bits_per_dim(levels: int) -> float:
    """log₂((L-1)/2): what dequantisation adds to continuous bits/dim."""
    return -math.log2(bin_width(levels))


def check_on_grid(x: Tensor, levels: int) -> None:
    """Raise ValueError unless every value of x is one of the L grid points k·Δ - 1 in [-1, 1]."""
    levels = check_levels(levels)
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"x must lie in the data range [-1, 1] to be dequantised, got values in [{lo:.4g}, {hi:.4g}]")
    k = (x.double() + 1) * (levels - 1) / 2
    off = float((k - k.round()).abs().max())
    if off > _GRID_TOL:
        raise ValueError(
            f"x is not on the grid of {levels} levels k·2/(L-1) - 1 (a value is {off:.3g} levels off): "
            f"pass data scaled as k/{(levels - 1) / 2:g} - 1, or the right number of levels")


# ---- quantisation: [-1, 1] floats ↔ the L data levels (the one home of this arithmetic) ----------


def level_index(x: Tensor, levels: int) -> Tensor:
    """k = round((x + 1)(L − 1)/2) ∈ {0, …, L−1} (float), the nearest data level of x clamped to [-1, 1]."""
    levels = check_levels(levels)
    return ((x.detach().float().clamp(-1, 1) + 1) / 2 * (levels - 1)).round()


def from_level_index(k: Tensor, levels: int) -> Tensor:
    """x = k·Δ − 1, the model-space value of level k."""
    return 2 * k.float() / (check_levels(levels) - 1) - 1


def snap_to_levels(x: Tensor, levels: int) -> Tensor:
    """[-1, 1] floats → the nearest of the data's L values k·Δ − 1 (what a shard of that data holds)."""
    return from_level_index(level_index(x, levels), levels)


def to_display_uint8(x: Tensor, levels: int = 256) -> Tensor:
    """[-1, 1] floats → 0..255 through the data's own L levels (digits: 17 greys stretched to 0..255)."""
    return (level_index(x, levels) * (255.0 / (levels - 1))).round().clamp(0, 255)


def to_levels(x: Tensor, levels: int) -> np.ndarray:
    """[-1, 1] floats [B, C, H, W] → uint8 [B, H, W, C] with values 0..L−1 (what the shards store)."""
    if levels > 256:
        raise ValueError(f"levels must be <= 256 to store as uint8, got {levels}")
    return level_index(x.cpu(), levels).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def from_levels(v: np.ndarray | Tensor, levels: int) -> Tensor:
    """uint8 [B, H, W, C] levels → [-1, 1] floats [B, C, H, W]."""
    return from_level_index(torch.as_tensor(np.array(v)).permute(0, 3, 1, 2), levels)


def uniform_dequantize(x: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """x_deq = x + (u - ½)·Δ with u ~ U(0, 1) per value (see the module docstring)."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return x + (u - 0.5) * bin_width(levels)


def bits_per_dim(logp: Tensor, dims: int) -> Tensor:
    """-log p / (D ln 2), per sample."""
    return -logp / (dims * math.log(2.0))


__all__ = [
    "bin_width", "bits_per_dim", "check_levels", "check_on_grid", "from_level_index", "from_levels",
    "level_index", "logp_offset", "offset_bits_per_dim", "snap_to_levels", "to_display_uint8", "to_levels",
    "uniform_dequantize",
]
