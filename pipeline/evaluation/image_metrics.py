"""PSNR and SSIM of reconstructions against ground truth (inverse problems), per image.

PSNR = 10 log10(L² / MSE) with L the data range (2 for the project's [-1, 1] images).
SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, eqs. 13–16): local statistics under a normalised Gaussian
window w (σ = 1.5), taken at every position where the window fits ("valid", no padding):
    SSIM(x, y) = (2 μ_x μ_y + C1)(2 σ_xy + C2) / ((μ_x² + μ_y² + C1)(σ_x² + σ_y² + C2)),
    μ_x = Σ w x, σ_x² = Σ w (x − μ_x)², σ_xy = Σ w (x − μ_x)(y − μ_y), C1 = (K1 L)², C2 = (K2 L)²,
K1 = 0.01, K2 = 0.03; averaged over positions and channels. The paper's window is 11×11; small images
(8×8 digits) need a smaller one, so `win_size` defaults to 7 (scikit-image's default) and must fit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(x: Tensor, y: Tensor, data_range: float) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(x.shape)}")
    if not (data_range > 0):
        raise ValueError(f"data_range must be > 0 (2 for [-1, 1] images), got {data_range!r}")


def psnr(x: Tensor, y: Tensor, *, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image [B], float64; +inf for identical images."""
    _check_pair(x, y, data_range)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(win_size: int, sigma: float = 1.5) -> Tensor:
    """The normalised 2-D Gaussian window [win_size, win_size], float64."""
    r = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, *, data_range: float = 2.0, win_size: int = 7, sigma: float = 1.5,
         K1: float = 0.01, K2: float = 0.03) -> Tensor:
    """Mean structural similarity per image [B], float64 (Wang et al. 2004; module docstring)."""
    _check_pair(x, y, data_range)
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 1, got {win_size!r}")
    H, W = x.shape[-2:]
    if win_size > min(H, W):
        raise ValueError(f"win_size {win_size} does not fit images of size {H}×{W}; pass win_size <= "
                         f"{min(H, W) - (1 - min(H, W) % 2)}")
    if not (sigma > 0):
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    C = x.shape[1]
    w = gaussian_window(win_size, sigma).to(x.device)[None, None].expand(C, 1, win_size, win_size)

    def filt(z: Tensor) -> Tensor:
        return F.conv2d(z, w, groups=C)

    x, y = x.double(), y.double()
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    C1, C2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))
    return s.flatten(1).mean(1)


def reconstruction_metrics(x: Tensor, truth: Tensor, *, data_range: float = 2.0,
                           win_size: int = 7) -> dict[str, float]:
    """Batch means of PSNR (finite images only) and SSIM, for reports."""
    p = psnr(x, truth, data_range=data_range)
    finite = p[torch.isfinite(p)]
    return {"psnr": float(finite.mean()) if finite.numel() else math.inf,
            "ssim": float(ssim(x, truth, data_range=data_range, win_size=win_size).mean())}


__all__ = ["gaussian_window", "psnr", "reconstruction_metrics", "ssim"]
