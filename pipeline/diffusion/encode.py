"""The probability-flow ODE as an invertible encoder (Song et al. 2021, Sec. 4.3 and App. D.5).

The PF-ODE dx/dt = f(x, t) − ½ g(t)² ∇log p_t(x) (Song et al. 2021, eq. 13) is deterministic, so each x₀
(taken at t = eps) has one latent x_T = Φ_{eps→T}(x₀), and Φ_{T→eps} inverts it. `encode` and `decode`
integrate it with the adaptive solver and the tolerances of `likelihood.ode_likelihood` (dopri5,
rtol = atol = 1e-5, eps = 1e-5): the same map whose divergence the likelihood integrates, so
`encode(x)` is `ode_likelihood(x).latent` without the trace. Round-trip error is of the order of the
tolerances times the Lipschitz constant of the flow, not zero.

Latents of VP processes are (for a good model) ≈ N(0, I) samples, whose mass lies on the sphere of
radius √D; linear interpolation between two of them passes through the low-norm interior, which the
prior never produces, so `slerp` (Shoemake 1985) interpolates along the great circle instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint

from .likelihood import Integration, _raise_not_finite, check_data
from .samplers import ADAPTIVE_SOLVERS, FIXED_SOLVERS
from .sde import SDE, ScoreFn

# The likelihood's defaults (ode_likelihood's signature; a test pins that they agree).
RTOL, ATOL, EPS, SOLVER = 1e-5, 1e-5, 1e-5, Integration().method
DATA_RANGE: tuple[float, float] = (-1.0, 1.0)  # the project's image scaling


def _check_solver(sde: SDE, rtol: float, atol: float, eps: float, method: str) -> None:
    solvers = ADAPTIVE_SOLVERS + FIXED_SOLVERS
    if method not in solvers:
        raise ValueError(f"method must be one of {solvers}, got {method!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (tol > 0):
            raise ValueError(f"{name} must be > 0, got {tol!r}")
    if not (0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")


def _flow(score_fn: ScoreFn, sde: SDE, x: Tensor, t0: float, t1: float, *, rtol: float, atol: float,
          method: str, steps: int) -> tuple[Tensor, int]:
    """x(t1) from x(t0) on the PF-ODE, and the number of score evaluations."""
    ode = sde.reverse(score_fn, probability_flow=True)
    nfe = 0

    def rhs(t: Tensor, x_t: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        _raise_not_finite("the state x(t)", x_t, t)
        return ode.sde(x_t, t.to(x_t.dtype).reshape(1).expand(x_t.shape[0]))[0]

    if method in ADAPTIVE_SOLVERS:
        times = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        # Never evaluate beyond [eps, T] (coefficients and networks are undefined there): end on t1.
        options = {"step_t": times[-1:]}
    else:
        times = torch.linspace(t0, t1, steps + 1, dtype=x.dtype, device=x.device)
        options = None
    with torch.no_grad():
        out = odeint(rhs, x, times, rtol=rtol, atol=atol, method=method, options=options)[-1]
    _raise_not_finite("the solution", out, times[-1])
    return out, nfe


def encode(score_fn: ScoreFn, sde: SDE, x0: Tensor, *, rtol: float = RTOL, atol: float = ATOL,
           eps: float = EPS, method: str = SOLVER, steps: int = 100,
           data_range: tuple[float, float] | None = DATA_RANGE) -> tuple[Tensor, int]:
    """x_T = Φ_{eps→T}(x0) through the PF-ODE (Song et al. 2021, eq. 13); returns (x_T, NFE).

    `data_range` (lo, hi) is the range the model was trained on (the project's images: [-1, 1]); data
    outside it is refused, since the flow of an out-of-range point says nothing about the model.
    `steps` is used only by fixed-step solvers.
    """
    x0 = check_data(x0)
    _check_solver(sde, rtol, atol, eps, method)
    if data_range is not None:
        lo, hi = data_range
        x_lo, x_hi = float(x0.min()), float(x0.max())
        if x_lo < lo or x_hi > hi:
            raise ValueError(f"encode: x0 has values in [{x_lo:.4g}, {x_hi:.4g}], outside the model's data "
                             f"range [{lo}, {hi}] (data_range); rescale the data (8-bit images: "
                             f"x/127.5 − 1) or pass the range the model was trained on")
    return _flow(score_fn, sde, x0, eps, sde.T, rtol=rtol, atol=atol, method=method, steps=steps)


def decode(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, rtol: float = RTOL, atol: float = ATOL,
           eps: float = EPS, method: str = SOLVER, steps: int = 100) -> tuple[Tensor, int]:
    """x0 = Φ_{T→eps}(x_T), the inverse of `encode` (no final denoising step); returns (x0, NFE)."""
    x_T = check_data(x_T)
    _check_solver(sde, rtol, atol, eps, method)
    return _flow(score_fn, sde, x_T, sde.T, eps, rtol=rtol, atol=atol, method=method, steps=steps)


def slerp(z0: Tensor, z1: Tensor, t: float | Tensor) -> Tensor:
    """Spherical interpolation per sample (Shoemake 1985):
        slerp(z0, z1; t) = sin((1 − t)θ)/sin θ · z0 + sin(tθ)/sin θ · z1,  cos θ = ⟨z0, z1⟩/(‖z0‖‖z1‖),
    over the flattened dimensions of each sample [B, ...]. A float t gives [B, ...]; a 1-D tensor of K
    values gives [K, B, ...]. Nearly parallel pairs (sin θ < 1e-6) fall back to linear interpolation."""
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    if z0.ndim < 2:
        raise ValueError(f"z0 must have shape [B, ...], got {tuple(z0.shape)}")
    ts = torch.as_tensor(t, dtype=z0.dtype, device=z0.device)
    if ts.ndim > 1:
        raise ValueError(f"t must be a float or a 1-D tensor, got shape {tuple(ts.shape)}")
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(a.dtype).tiny)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))  # [B]
    sin = torch.sin(theta)
    tk = ts.reshape(-1, 1)  # [K, 1]
    small = sin < 1e-6
    safe = torch.where(small, torch.ones_like(sin), sin)
    w0 = torch.where(small, 1 - tk, torch.sin((1 - tk) * theta) / safe)  # [K, B]
    w1 = torch.where(small, tk.expand_as(w0), torch.sin(tk * theta) / safe)
    out = w0[..., None] * a + w1[..., None] * b  # [K, B, D]
    out = out.reshape(tk.shape[0], *z0.shape)
    return out[0] if ts.ndim == 0 else out


def interpolate(score_fn: ScoreFn, sde: SDE, z0: Tensor, z1: Tensor, *, n: int = 8, rtol: float = RTOL,
                atol: float = ATOL, eps: float = EPS, method: str = SOLVER,
                steps: int = 100) -> tuple[Tensor, int]:
    """Decode the slerp path between latents z0 and z1 [B, ...] at n evenly spaced t ∈ [0, 1]:
    returns ([n, B, ...], NFE), one batched ODE solve. Latents of data come from `encode`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n (points on the path, both ends included) must be an integer >= 2, got {n!r}")
    z0, z1 = check_data(z0), check_data(z1)
    path = slerp(z0, z1, torch.linspace(0.0, 1.0, n, dtype=torch.float64).to(z0.dtype))
    x, nfe = decode(score_fn, sde, path.reshape(-1, *z0.shape[1:]), rtol=rtol, atol=atol, eps=eps,
                    method=method, steps=steps)
    return x.reshape(n, *z0.shape), nfe


__all__ = ["ATOL", "DATA_RANGE", "EPS", "RTOL", "SOLVER", "decode", "encode", "interpolate",
           "slerp"]
