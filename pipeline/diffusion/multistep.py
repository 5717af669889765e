"""Fast multistep solvers in (α, σ) / log-SNR form: DPM-Solver++(2M), its SDE variant, and UniPC.

With x_t = α_t x_0 + σ_t ε and the half log-SNR λ_t = log(α_t/σ_t), the probability-flow ODE in
data prediction x̂_0(x_t, t) = (x_t + σ_t² ∇log p_t(x_t))/α_t (Tweedie) has the exact solution
    x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x̂_0(x_λ, λ) dλ                      (Lu et al. 2022b, eq. 8)
so the linear part is integrated exactly and only x̂_0 is approximated, by polynomials in λ through
earlier outputs (one NFE per step). Nothing here assumes VP: α, σ come from `sde.marginal_coeffs`,
so VE (α = 1, λ = −log σ), sub-VP, cosine and the discrete chains all work.

Each solver takes (score_fn, sde, x_T, *, steps, generator, noise, eps, multistep, denoise, callback)
like the samplers of `samplers.py`, with the grid options in one `MultistepOptions` (UniPC's own in
`UniPCOptions`); NFE = steps (+1 with denoise). `noise`, when given, is called as noise(x) in place of
randn_like(x) (per-sample streams); deterministic solvers ignore both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .schedules import time_grid
from .sde import SDE, ScoreFn

NoiseFn = Callable[[Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
MULTISTEP_GRIDS: tuple[str, ...] = ("logsnr", "karras", "uniform")
UNIPC_VARIANTS: tuple[str, ...] = ("bh1", "bh2")


@dataclass(frozen=True)
class MultistepOptions:
    """The grid and order schedule every multistep solver here shares: `grid` kind and EDM's `rho` for
    "karras" (see `multistep_grid`), and `lower_order_final`: lower orders at the end, on the last step
    when steps < 15 (DPM-Solver++) or no higher than the steps left (UniPC), Lu et al.'s advice for
    stability at few steps."""

    grid: str = "logsnr"
    rho: float = 7.0
    lower_order_final: bool = True


@dataclass(frozen=True)
class UniPCOptions:
    """UniPC's own options (Zhao et al. 2023): predictor `order` p ∈ {1, 2, 3}, the B(h) `variant`
    ("bh1": B = h, "bh2": B = e^h − 1) and whether the UniC `corrector` runs."""

    order: int = 3
    variant: str = "bh2"
    corrector: bool = True


# ---- shared pieces ------------------------------------------------------------------------------------


def multistep_grid(sde: SDE, steps: int, *, eps: float = 1e-3, kind: str = "logsnr",
                   rho: float = 7.0) -> Tensor:
    """steps + 1 decreasing times from T to eps, float64: uniform in λ = −log σ̃ ("logsnr", the
    DPM-Solver default, Lu et al. 2022a, Sec. 3.3), EDM's ρ-spaced σ̃ ("karras") or uniform in t."""
    if kind not in MULTISTEP_GRIDS:
        raise ValueError(f"grid must be one of {MULTISTEP_GRIDS}, got {kind!r}")
    if kind != "logsnr":
        return time_grid(sde, steps, eps=eps, kind=kind, rho=rho)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ends = torch.log(sde.edm_sigma(torch.tensor([sde.T, eps], dtype=torch.float64)))
    t = sde.edm_sigma_inv(torch.exp(torch.linspace(float(ends[0]), float(ends[1]), steps + 1,
                                                   dtype=torch.float64)))
    t[0], t[-1] = sde.T, eps  # exact endpoints despite round-off of the inverse
    return t


def _ats(sde: SDE, t: float) -> tuple[float, float, float]:
    """α_t, σ_t and λ_t = log(α_t/σ_t), in float64."""
    a, s = sde.marginal_coeffs(torch.tensor([t], dtype=torch.float64))
    a, s = float(a[0]), float(s[0])
    return a, s, math.log(a / s)


def _x0(score_fn: ScoreFn, x: Tensor, t: float, alpha: float, sigma: float) -> Tensor:
    """Tweedie's x̂_0 = (x_t + σ_t² ∇log p_t(x_t))/α_t; one NFE."""
    tv = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    return (x + sigma**2 * score_fn(x, tv)) / alpha


def _draw(x: Tensor, generator: torch.Generator | None, noise: NoiseFn | None) -> Tensor:
    if noise is not None:  # the caller's per-sample streams win over the shared generator
        z = noise(x)
        if z.shape != x.shape:
            raise ValueError(f"noise(x) must return a tensor shaped like x {tuple(x.shape)}, "
                             f"got {tuple(z.shape)}")
        return z.to(x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _finish(score_fn: ScoreFn, sde: SDE, x: Tensor, eps: float, denoise: bool) -> Tensor:
    if not denoise:
        return x
    a, s, _ = _ats(sde, eps)
    return _x0(score_fn, x, eps, a, s)


def _emit(callback: Callback | None, i: int, t: float, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "denoised": denoised})


# ---- DPM-Solver++ -------------------------------------------------------------------------------------


def sample_dpmpp_2m(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
                    generator: torch.Generator | None = None, noise: NoiseFn | None = None,
                    eps: float = 1e-3, multistep: MultistepOptions = MultistepOptions(),
                    denoise: bool = False, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): with h_i = λ_i − λ_{i−1} and r_i = h_{i−1}/h_i,
        x_i = (σ_i/σ_{i−1}) x_{i−1} + α_i (1 − e^{−h_i}) D_i,
        D_i = (1 + 1/(2r_i)) x̂_0,{i−1} − 1/(2r_i) x̂_0,{i−2}   (first step: D_1 = x̂_0,0, i.e. DDIM).
    `multistep.lower_order_final` takes the last step at first order when steps < 15 (Lu et al.'s
    advice for stability at few steps). Deterministic: `generator` and `noise` are accepted and unused."""
    return sample_dpmpp_2m_sde(score_fn, sde, x_T, steps=steps, generator=generator, noise=noise, eps=eps,
                               multistep=multistep, eta=0.0, denoise=denoise, callback=callback)


def sample_dpmpp_2m_sde(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
                        generator: torch.Generator | None, noise: NoiseFn | None = None, eps: float = 1e-3,
                        multistep: MultistepOptions = MultistepOptions(), eta: float = 1.0,
                        denoise: bool = False, callback: Callback | None = None) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, App. B, midpoint form), with ĥ = (1 + η) h:
        x_i = (σ_i/σ_{i−1}) e^{−ηh} x_{i−1} + α_i (1 − e^{−ĥ}) (x̂_0 + (x̂_0 − x̂_0,prev)/(2r))
              + σ_i √(1 − e^{−2ηh}) z.
    η = 1 is the paper's SDE solver (first order: x_i's mean and variance are exact for a point mass),
    η = 0 is DPM-Solver++(2M)."""
    ts = multistep_grid(sde, steps, eps=eps, kind=multistep.grid, rho=multistep.rho).tolist()
    x = x_T
    a_s, s_s, l_s = _ats(sde, ts[0])
    prev: tuple[Tensor, float] | None = None  # (x̂_0, h) of the last step
    for i in range(steps):
        a_t, s_t, l_t = _ats(sde, ts[i + 1])
        d = _x0(score_fn, x, ts[i], a_s, s_s)
        h = l_t - l_s
        h_hat = (1 + eta) * h
        x_new = (s_t / s_s) * math.exp(-eta * h) * x + a_t * (-math.expm1(-h_hat)) * d
        last = multistep.lower_order_final and steps < 15 and i == steps - 1
        if prev is not None and not last:
            r = prev[1] / h
            x_new = x_new + a_t * (-math.expm1(-h_hat)) / (2 * r) * (d - prev[0])
        if eta > 0:
            x_new = x_new + s_t * math.sqrt(-math.expm1(-2 * eta * h)) * _draw(x, generator, noise)
        _emit(callback, i, ts[i], x_new, d)
        x, prev = x_new, (d, h)
        a_s, s_s, l_s = a_t, s_t, l_t
    return _finish(score_fn, sde, x, eps, denoise)


# ---- UniPC --------------------------------------------------------------------------------------------


def _unipc_coeffs(rks: list[float], hh: float, variant: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Vandermonde R_{ij} = r_j^i, right-hand side b_i = i! φ_{i+1}(hh)/B(h) and B(h) of UniPC
    (Zhao et al. 2023, Thm. 3.1 / Alg. 2), for data prediction (hh = −h). B = hh ("bh1") or e^hh − 1."""
    p = len(rks)
    B = hh if variant == "bh1" else math.expm1(hh)
    phi = math.expm1(hh) / hh - 1  # φ-functions by their recursion φ_{k+1} = (φ_k − 1/k!)/hh
    fact, b = 1.0, []
    for k in range(1, p + 1):
        b.append(phi * fact / B)
        fact *= k + 1
        phi = phi / hh - 1 / fact
    R = np.array([[r ** (k - 1) for r in rks] for k in range(1, p + 1)], dtype=np.float64)
    return R, np.array(b, dtype=np.float64), B


def sample_unipc(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
                 generator: torch.Generator | None = None, noise: NoiseFn | None = None, eps: float = 1e-3,
                 multistep: MultistepOptions = MultistepOptions(), unipc: UniPCOptions = UniPCOptions(),
                 denoise: bool = False, callback: Callback | None = None) -> Tensor:
    """UniPC (Zhao et al. 2023, Alg. 2–3) with data prediction: the UniP-p predictor
        x_i = (σ_i/σ_{i−1}) x_{i−1} + α_i (1 − e^{−h}) m_0 − α_i B(h) Σ_k ρ_k D_k / r_k
    on the last p = `unipc.order` outputs (D_k = m_k − m_0, r_k = (λ_k − λ_{i−1})/h), then the UniC corrector,
    which re-weights with the new output at x_i: the evaluation the next step needs anyway, so NFE
    stays one per step (no corrector after the last step). Lower orders while history builds up and,
    with `multistep.lower_order_final`, on the last steps. Deterministic: `generator`, `noise` unused."""
    ts = multistep_grid(sde, steps, eps=eps, kind=multistep.grid, rho=multistep.rho).tolist()
    order, variant = unipc.order, unipc.variant
    coeffs = [_ats(sde, t) for t in ts]
    hist: list[tuple[Tensor, float]] = []  # (x̂_0, λ) at the previous grid points, newest last
    x, x_prev, used = x_T, None, 1

    def update(x_s: Tensor, i: int, p: int, m_t: Tensor | None) -> Tensor:
        """UniP (m_t None) or UniC (m_t = x̂_0 at the predicted x_{i+1}) from t_i to t_{i+1}, order p."""
        a_t, s_t, l_t = coeffs[i + 1]
        _, s_s, l_s = coeffs[i]
        h = l_t - l_s
        m0 = hist[-1][0]
        rks = [(hist[-1 - k][1] - l_s) / h for k in range(1, p)] + [1.0]
        D = [(hist[-1 - k][0] - m0) / rks[k - 1] for k in range(1, p)]
        R, b, B = _unipc_coeffs(rks, -h, variant)
        x_new = (s_t / s_s) * x_s + a_t * (-math.expm1(-h)) * m0
        if m_t is None:  # predictor: ρ from the first p − 1 conditions (order 2: ρ = ½)
            rho_p = [0.5] if p == 2 else (np.linalg.solve(R[:-1, :-1], b[:-1]).tolist() if p > 2 else [])
            res = sum((c * Dk for c, Dk in zip(rho_p, D, strict=True)), torch.zeros_like(x_s))
        else:  # corrector: all p conditions, the new output included (order 1: ρ = ½)
            rho_c = [0.5] if p == 1 else np.linalg.solve(R, b).tolist()
            res = sum((c * Dk for c, Dk in zip(rho_c[:-1], D, strict=True)), torch.zeros_like(x_s))
            res = res + rho_c[-1] * (m_t - m0)
        return x_new - a_t * B * res

    for i in range(steps):
        a_s, s_s, l_s = coeffs[i]
        m = _x0(score_fn, x, ts[i], a_s, s_s)
        if unipc.corrector and x_prev is not None:
            x = update(x_prev, i - 1, used, m)  # UniC on the step just taken, at no extra NFE
        hist = [*hist, (m, l_s)][-order:]
        used = min(order, len(hist), steps - i) if multistep.lower_order_final else min(order, len(hist))
        x_prev = x
        x = update(x, i, used, None)
        _emit(callback, i, ts[i], x, m)
    return _finish(score_fn, sde, x, eps, denoise)


__all__ = ["MULTISTEP_GRIDS", "UNIPC_VARIANTS", "MultistepOptions", "UniPCOptions", "multistep_grid",
           "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_unipc"]
