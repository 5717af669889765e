"""Exponential moving average of network weights, with EDM's half-life counted in images.

Karras et al. 2022 (EDM, training_loop.py): after each optimiser step on `batch_size` images,
    β = 0.5 ** (batch_size / halflife_nimg),   θ_ema ← β θ_ema + (1 - β) θ,
so whatever the batch size, the weights of `halflife_nimg` images ago contribute one half. With a
ramp-up ratio r the half-life early in training is min(halflife_nimg, r · nimg_seen), which makes the
average forget the random initialisation quickly (β = 0 on the very first update).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """Shadow copy of a model's parameters (averaged) and buffers (copied); EDM's half-life schedule."""

    def __init__(self, model: nn.Module, halflife_nimg: float | None = None,
                 rampup_ratio: float | None = 0.05, *, halflife_kimg: float | None = None) -> None:
        # EDM configures the half-life in thousands of images (ema_halflife_kimg, default 500).
        if halflife_nimg is not None and halflife_kimg is not None:
            raise ValueError(f"give halflife_nimg or halflife_kimg, not both "
                             f"(got {halflife_nimg} and {halflife_kimg})")
        if halflife_kimg is not None:
            halflife_nimg = 1000.0 * halflife_kimg
        elif halflife_nimg is None:
            halflife_nimg = 500_000.0
        if not halflife_nimg > 0:
            raise ValueError(f"halflife_nimg must be positive (= 1000 · halflife_kimg), got {halflife_nimg}")
        if rampup_ratio is not None and not rampup_ratio > 0:
            raise ValueError(f"rampup_ratio must be positive or None, got {rampup_ratio}")
        self.halflife_nimg, self.rampup_ratio = float(halflife_nimg), rampup_ratio
        self.nimg = 0  # images seen by the updates so far
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    def beta(self, batch_size: int) -> float:
        """β of the next update: 0.5 ** (batch / halflife), half-life ramped up as in EDM."""
        halflife = self.halflife_nimg
        if self.rampup_ratio is not None:
            halflife = min(halflife, self.nimg * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int) -> float:
        """θ_ema ← β θ_ema + (1 - β) θ after a step on `batch_size` images; returns the β used."""
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        beta = self.beta(batch_size)
        src = unwrap_model(model)
        shadow_p, model_p = _matched(self.module.named_parameters(), src.named_parameters(), "parameters")
        if shadow_p:
            # One fused kernel per dtype/device group instead of a Python loop of small ones.
            live = [p.detach().to(s.device, s.dtype) for s, p in zip(shadow_p, model_p, strict=True)]
            torch._foreach_lerp_(shadow_p, live, 1.0 - beta)
        for s, b in zip(*_matched(self.module.named_buffers(), src.named_buffers(), "buffers"), strict=True):
            s.copy_(b)
        self.nimg += int(batch_size)
        return beta

    @property
    def nimg(self) -> int:
        """Images seen by the updates so far (a host read when `update_masked` keeps it on a device)."""
        return int(self._nimg_t.item()) if getattr(self, "_nimg_t", None) is not None else self._nimg

    @nimg.setter
    def nimg(self, value: int) -> None:
        self._nimg, self._nimg_t = int(value), None

    @torch.no_grad()
    def update_masked(self, model: nn.Module, batch_size: int, apply: torch.Tensor) -> None:
        """`update`, applied only where the 0-dim bool tensor `apply` is true, without a host read.

        β and the image count then live on `apply`'s device (float64, exact for counts below 2^53),
        and a skipped update is a lerp of weight 0, so the same sequence of applied updates gives
        the same bits as `update` (β computed by the same IEEE operations as `beta`)."""
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if apply.dtype != torch.bool or apply.ndim != 0:
            raise ValueError(f"apply must be a 0-dim bool tensor, got {apply.dtype} {tuple(apply.shape)}")
        if getattr(self, "_nimg_t", None) is None or self._nimg_t.device != apply.device:
            self._nimg_t = torch.tensor(float(self.nimg), dtype=torch.float64, device=apply.device)
        halflife = torch.tensor(self.halflife_nimg, dtype=torch.float64, device=apply.device)
        if self.rampup_ratio is not None:
            halflife = torch.minimum(halflife, self._nimg_t * self.rampup_ratio)
        # A true division (a Python number over a tensor would be a reciprocal times the number).
        beta = torch.pow(0.5, torch.full_like(halflife, batch_size) / halflife.clamp(min=1e-8))
        weight = torch.where(apply, 1.0 - beta, 0.0)
        src = unwrap_model(model)
        shadow_p, model_p = _matched(self.module.named_parameters(), src.named_parameters(), "parameters")
        if shadow_p:
            live = [p.detach().to(s.device, s.dtype) for s, p in zip(shadow_p, model_p, strict=True)]
            weights = {}
            for s in shadow_p:
                weights.setdefault((s.device, s.dtype), weight.to(s.device, s.dtype))
            torch._foreach_lerp_(shadow_p, live, [weights[(s.device, s.dtype)] for s in shadow_p])
        for s, b in zip(*_matched(self.module.named_buffers(), src.named_buffers(), "buffers"), strict=True):
            s.copy_(torch.where(apply.to(s.device), b, s))
        self._nimg_t += apply.double() * int(batch_size)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (e.g. a fresh network for sampling)."""
        unwrap_model(model).load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Plain dict for torch.save / torch.load(weights_only=True); "module" loads into the bare network."""
        return {"module": self.module.state_dict(), "nimg": self.nimg,
                "halflife_nimg": self.halflife_nimg, "rampup_ratio": self.rampup_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"module", "nimg", "halflife_nimg", "rampup_ratio"} - set(state)
        if missing:
            raise ValueError(f"EMA state_dict is missing {sorted(missing)}")
        self.module.load_state_dict(state["module"])
        self.nimg = int(state["nimg"])
        self.halflife_nimg = float(state["halflife_nimg"])
        self.rampup_ratio = None if state["rampup_ratio"] is None else float(state["rampup_ratio"])

    def to(self, *args: Any, **kwargs: Any) -> EMA:
        self.module.to(*args, **kwargs)
        return self


def _matched(shadow, live, what: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shadow, live = dict(shadow), dict(live)
    if shadow.keys() != live.keys():
        diff = sorted(set(shadow) ^ set(live))
        raise ValueError(f"EMA {what} do not match the model's: differing names {diff[:10]}")
    names = list(shadow)
    return [shadow[n] for n in names], [live[n] for n in names]


__all__ = ["EMA", "unwrap_model"]
