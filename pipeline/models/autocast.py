"""bf16 autocast around a network, handing fp32 back."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AutocastNet(nn.Module):
    """Runs the wrapped network under bf16 autocast and hands fp32 back, so that loss arithmetic
    (weights like 1/σ², which span many decades) stays in full precision."""

    def __init__(self, net: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if self.dtype is None:
            return self.net(x, noise_labels, class_labels)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.net(x, noise_labels, class_labels)
        return out.float()


__all__ = ["AutocastNet"]
