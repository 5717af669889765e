"""Sample grids as PNG bytes: the picture a researcher looks at first."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..diffusion.dequantize import to_display_uint8


def to_uint8(x: Tensor, levels: int = 256) -> np.ndarray:
    """[-1, 1] floats [B, C, H, W] → uint8 [B, H, W, C] on the data's own grid of `levels` values,
    stretched to 0..255 for display (digits have 17 levels, 0..16)."""
    return to_display_uint8(x.cpu(), levels).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(x: Tensor, *, nrow: int, levels: int = 256, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile a batch row-major into a grid image, each tile upscaled `scale`× by nearest neighbour."""
    if x.ndim != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    imgs = to_uint8(x, levels)
    B, H, W, C = imgs.shape
    ncol = -(-B // nrow)
    Hs, Ws = H * scale, W * scale
    canvas = np.full((ncol * (Hs + pad) + pad, nrow * (Ws + pad) + pad, C), 255, np.uint8)
    for k in range(B):
        r, c = divmod(k, nrow)
        tile = imgs[k].repeat(scale, 0).repeat(scale, 1)
        top, left = pad + r * (Hs + pad), pad + c * (Ws + pad)
        canvas[top:top + Hs, left:left + Ws] = tile
    return Image.fromarray(canvas[..., 0] if C == 1 else canvas)


def grid_png(x: Tensor, **kwargs) -> bytes:
    buf = io.BytesIO()
    image_grid(x, **kwargs).save(buf, format="PNG")
    return buf.getvalue()
