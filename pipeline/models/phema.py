"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, Sec. 3 and App. C).

A power-function EMA with exponent γ averages the training trajectory θ(τ) with the kernel
    p_γ,t(τ) = (γ + 1) τ^γ / t^(γ+1)  on 0 < τ ≤ t                                  (EDM2, eq. 2)
so its length grows with training. Its relative standard deviation is
    σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3)))                                         (EDM2, eq. 3)
and after the t-th optimiser step it is updated with β_t = (1 − 1/t)^(γ+1)           (EDM2, eq. 4)
(for a trajectory constant between steps this is the kernel exactly: step i gets weight
(i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1)).

Training keeps a few profiles (`PowerEMA`, default σ_rel 0.05 and 0.10) and stores their snapshots now
and then. Since ⟨p_γi,ti, p_γj,tj⟩ has a closed form, the EMA of any other σ_rel is reconstructed after
training as the least-squares combination of the snapshots' kernels (`solve_coefficients`), then summed
one snapshot at a time (`reconstruct`): never more than the accumulator and one snapshot in memory.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .ema import unwrap_model

StateDict = dict[str, Tensor]
SIGMA_REL_RANGE: tuple[float, float] = (0.0, 0.3)
# σ_rel(γ) peaks near γ ≈ −0.29 (just below 0.3), so (0, 0.3) is the range the paper quotes.
_SIGMA_REL_PEAK = 0.2995


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ of the profile with relative width σ_rel: the largest real root of
    γ³ + 7γ² + (16 − σ_rel⁻²) γ + (12 − σ_rel⁻²) = 0 (EDM2, eq. 3 rearranged)."""
    _check_sigma_rel("sigma_rel", sigma_rel)
    s2 = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real)) and r.real > -1.0]
    if not real:  # only in the sliver (≈0.2995, 0.3) above the curve's peak
        raise ValueError(f"sigma_rel must lie in (0, {_SIGMA_REL_PEAK}) to have a power-function "
                         f"profile, got {sigma_rel!r}")
    return float(max(real))


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3))) (EDM2, eq. 3), for γ > −1."""
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > -1):
        raise ValueError(f"gamma must be a finite number > -1, got {gamma!r}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def _check_sigma_rel(field: str, value: Any) -> None:
    lo, hi = SIGMA_REL_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise ValueError(f"{field} must be a number in ({lo}, {hi}), got {value!r}")


def power_beta(gamma: float, step: int, prev_step: int = 0) -> float:
    """β of the update at optimiser step `step` when the last one was at `prev_step`:
    (prev/step)^(γ+1), i.e. (1 − 1/t)^(γ+1) for consecutive steps (EDM2, eq. 4)."""
    return (prev_step / step) ** (gamma + 1)


# ---- tracking during training -------------------------------------------------------------------------


class PowerEMA:
    """K power-function EMA profiles of one network (floating entries of its state_dict are averaged,
    the others, e.g. integer buffers, copied). Call `update(net, step)` after each optimiser step with
    the 1-based step count; store `snapshot()` every so often for `reconstruct`."""

    def __init__(self, net: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10)) -> None:
        if isinstance(sigma_rels, (int, float)) or len(sigma_rels) < 1:
            raise ValueError(f"sigma_rels must be a non-empty sequence, got {sigma_rels!r}")
        for i, s in enumerate(sigma_rels):
            _check_sigma_rel(f"sigma_rels[{i}]", s)
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.step = 0
        src = unwrap_model(net).state_dict()
        self.profiles: list[StateDict] = [
            {k: v.detach().clone() for k, v in src.items()} for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> list[float]:
        """Fold the network after optimiser step `step` (> the last one) into every profile; returns βs."""
        if isinstance(step, bool) or not isinstance(step, int) or step <= self.step:
            raise ValueError(f"step must be an int > the last update's step ({self.step}), got {step!r}")
        src = unwrap_model(net).state_dict()
        if src.keys() != self.profiles[0].keys():
            diff = sorted(set(src) ^ set(self.profiles[0]))
            raise ValueError(f"PowerEMA: the network's state_dict keys differ from the tracked ones: "
                             f"{diff[:10]}")
        betas = [power_beta(g, step, self.step) for g in self.gammas]
        for profile, beta in zip(self.profiles, betas, strict=True):
            for k, v in src.items():
                if v.is_floating_point():
                    profile[k].lerp_(v.detach().to(profile[k].dtype), 1.0 - beta)
                else:
                    profile[k].copy_(v)
        self.step = step
        return betas

    def snapshot(self) -> list[dict[str, Any]]:
        """One plain dict per profile, {"step", "sigma_rel", "state_dict"} (cloned to CPU), to store."""
        return [{"step": self.step, "sigma_rel": s, "state_dict": {k: v.detach().cpu().clone()
                                                                   for k, v in p.items()}}
                for s, p in zip(self.sigma_rels, self.profiles, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints (torch.load(weights_only=True) compatible)."""
        return {"sigma_rels": list(self.sigma_rels), "step": self.step,
                "profiles": [dict(p) for p in self.profiles]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"sigma_rels", "step", "profiles"} - set(state)
        if missing:
            raise ValueError(f"PowerEMA state_dict is missing {sorted(missing)}")
        if tuple(float(s) for s in state["sigma_rels"]) != self.sigma_rels:
            raise ValueError(f"PowerEMA state_dict has sigma_rels {state['sigma_rels']}, "
                             f"this tracker {list(self.sigma_rels)}")
        for mine, theirs in zip(self.profiles, state["profiles"], strict=True):
            if mine.keys() != theirs.keys():
                raise ValueError("PowerEMA state_dict profiles do not match the network's keys")
            for k, v in theirs.items():
                mine[k].copy_(v)
        self.step = int(state["step"])

    def copy_to(self, net: nn.Module, index: int = 0) -> None:
        """Load profile `index` into `net`."""
        unwrap_model(net).load_state_dict(copy.copy(self.profiles[index]))


# ---- reconstruction after training --------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A stored profile: the step it was taken at, its σ_rel, and how to load its state_dict (called
    once, during the streaming sum; e.g. `lambda: torch.load(uri, weights_only=True)["state_dict"]`)."""

    step: int
    sigma_rel: float
    load: Callable[[], StateDict]


def _inner(g_i: np.ndarray, t_i: np.ndarray, g_j: np.ndarray, t_j: np.ndarray) -> np.ndarray:
    """⟨p_γi,ti, p_γj,tj⟩ = (γi+1)(γj+1) m^(γi+γj+1) / ((γi+γj+1) ti^(γi+1) tj^(γj+1)), m = min(ti, tj),
    evaluated in logs (t^γ overflows for γ ≈ 70 and t ≈ 10⁶)."""
    m = np.minimum(t_i, t_j)
    s = g_i + g_j + 1
    log = s * np.log(m) - (g_i + 1) * np.log(t_i) - (g_j + 1) * np.log(t_j)
    return (g_i + 1) * (g_j + 1) / s * np.exp(log)


def solve_coefficients(steps: Sequence[int], sigma_rels: Sequence[float], target_sigma_rel: float,
                       target_step: int | None = None) -> Tensor:
    """Weights x [n] (float64) with Σ x_i p_i ≈ p_target in L²(0, ∞), by least squares on the Gram
    matrix A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩ (EDM2, App. C.3). The target is the σ_rel profile
    at `target_step` (default: the latest snapshot)."""
    _check_sigma_rel("target_sigma_rel", target_sigma_rel)
    if len(steps) != len(sigma_rels):
        raise ValueError(f"steps and sigma_rels must have one entry per snapshot, got {len(steps)} "
                         f"and {len(sigma_rels)}")
    if len(steps) < 2:
        raise ValueError(f"reconstruction needs at least 2 snapshots (of at least 2 steps or 2 profiles), "
                         f"got {len(steps)}")
    for i, (t, s) in enumerate(zip(steps, sigma_rels, strict=True)):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"snapshot {i}: step must be an int >= 1, got {t!r}")
        _check_sigma_rel(f"snapshot {i}: sigma_rel", s)
    if len(set(zip(steps, sigma_rels, strict=True))) < 2:
        raise ValueError("reconstruction needs snapshots of at least 2 distinct (step, sigma_rel); "
                         f"all {len(steps)} are the same profile at the same step")
    t_max = max(int(t) for t in steps)
    t_r = t_max if target_step is None else target_step
    if isinstance(t_r, bool) or not isinstance(t_r, int) or not 1 <= t_r <= t_max:
        raise ValueError(f"target_step must be an int in [1, {t_max}] (the latest snapshot's step), "
                         f"got {target_step!r}")
    # Times scaled by the latest step: the kernels are scale-free, and this keeps the logs small.
    t = np.asarray(steps, dtype=np.float64) / t_max
    g = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels], dtype=np.float64)
    A = _inner(g[:, None], t[:, None], g[None, :], t[None, :])
    b = _inner(g, t, np.float64(sigma_rel_to_gamma(target_sigma_rel)), np.float64(t_r / t_max))
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    return torch.from_numpy(x)


@torch.no_grad()
def reconstruct(snapshots: Sequence[Snapshot], target_sigma_rel: float, *, target_step: int | None = None,
                dtype: torch.dtype | None = None) -> StateDict:
    """The EMA with `target_sigma_rel` at `target_step` (default: the latest snapshot's step), summed
    from the snapshots one at a time: each `load()` is called once, in order, and released before the
    next, so at most two networks' tensors (the accumulator and the current snapshot) are alive.

    Floating entries accumulate in float64 for CPU tensors (float32 otherwise, or `dtype`) and come
    back in their stored dtype; non-floating entries (counters) are taken from the latest snapshot.
    """
    snapshots = list(snapshots)
    x = solve_coefficients([s.step for s in snapshots], [s.sigma_rel for s in snapshots],
                           target_sigma_rel, target_step)
    latest = max(range(len(snapshots)), key=lambda i: snapshots[i].step)
    acc: StateDict | None = None
    keys: set[str] = set()
    stored: dict[str, torch.dtype] = {}
    v: Tensor | None
    for i, snap in enumerate(snapshots):
        sd = snap.load()
        if acc is None:
            keys = set(sd)
            acc = {}
            for k, v in sd.items():
                stored[k] = v.dtype
                if v.is_floating_point():
                    adt = dtype or (torch.float64 if v.device.type == "cpu" else torch.float32)
                    acc[k] = torch.zeros(v.shape, dtype=adt, device=v.device)
                else:
                    acc[k] = v.clone()
        elif set(sd) != keys:
            diff = sorted(set(sd) ^ keys)
            raise ValueError(f"snapshot {i} (step {snap.step}) has other state_dict keys: {diff[:10]}")
        coeff = float(x[i])
        for k, v in sd.items():
            if v.is_floating_point():
                acc[k].add_(v.to(acc[k].dtype), alpha=coeff)
            elif i == latest:
                acc[k].copy_(v)
        sd = v = None  # drop the snapshot before the next load(): two networks at most
    assert acc is not None
    return {k: v.to(stored[k]) for k, v in acc.items()}


def snapshots_from_dicts(items: Iterable[dict[str, Any]]) -> list[Snapshot]:
    """`Snapshot`s over in-memory `PowerEMA.snapshot()` dicts (tests, small models)."""
    return [Snapshot(int(d["step"]), float(d["sigma_rel"]), (lambda d=d: d["state_dict"])) for d in items]


__all__ = [
    "SIGMA_REL_RANGE", "PowerEMA", "Snapshot", "gamma_to_sigma_rel", "power_beta", "reconstruct",
    "sigma_rel_to_gamma", "snapshots_from_dicts", "solve_coefficients",
]
