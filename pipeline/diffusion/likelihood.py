"""Exact likelihood of a score model through the probability-flow ODE (Song et al. 2021, App. D.2).

The probability-flow ODE dx/dt = f̃(x, t) = f(x, t) - ½ g(t)² s_θ(x, t) (Song et al. 2021, eq. 13) is a
continuous normalising flow, so by the instantaneous change of variables (Chen et al. 2018, Thm. 1)
    d log p_t(x(t))/dt = -∇·f̃(x(t), t)   ⇒   log p_ε(x) = log p_T(x(T)) + ∫_ε^T ∇·f̃(x(t), t) dt,
with x(ε) = x. We integrate [x, ∫∇·f̃] from t = ε to T in one adaptive solve (torchdiffeq) and use the
prior π ≈ p_T for the first term, `sde.prior_logp(x(T))`.

The divergence is either exact (one vector-Jacobian product per dimension) or the Hutchinson–Skilling
estimate vᵀ(∂f̃/∂x)v with E[vvᵀ] = I (Skilling 1989; Hutchinson 1990; Grathwohl et al. 2019). Each probe
v is drawn once and held FIXED for the whole solve, so ∫ vᵀ J(t) v dt = vᵀ(∫J dt)v stays unbiased for
∫ tr J dt. Several probes share one solve: the x-trajectory does not depend on the probe, so we evaluate
f̃ once per solver stage and take one vector-Jacobian product per probe from the same graph (P backward
passes, one score evaluation). For a symmetric A, Var(vᵀAv) is 2‖A‖_F² for Gaussian probes and
2 Σ_{i≠j} A_ij² for Rademacher probes, which is never larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint

from .dequantize import bits_per_dim, check_levels, check_on_grid, logp_offset, uniform_dequantize
from .sde import SDE, ScoreFn

TRACES: tuple[str, ...] = ("hutchinson", "exact")
PROBES: tuple[str, ...] = ("rademacher", "gaussian")
DEQUANTIZE_KEYS: tuple[str, ...] = ("levels", "draws")


@dataclass(frozen=True)
class LikelihoodResult:
    """Per-sample results of `ode_likelihood`; every tensor has the batch size as its first dim.

    logp:      log-likelihood in nats, the mean of `samples` (with dequantisation: the bound on the
               log-probability of the discrete data, offset included).
    bpd:       bits/dim, -logp / (D ln 2).
    stderr:    Monte Carlo standard error of logp in nats: over the K dequantisation draws when K > 1,
               else over the P probes; 0 for exact trace without dequantisation, NaN for one random
               estimate (one probe, one draw).
    bpd_stderr: stderr in bits/dim.
    samples:   [B, K·P] the individual estimates in nats (draw-major).
    prior_logp: log p_T(x(T)) averaged over draws, nats.
    latent:    x(T), the ODE's encoding of x (of the last dequantisation draw).
    nfe:       score evaluations (batched calls of score_fn) summed over all solves.
    """

    logp: Tensor
    bpd: Tensor
    stderr: Tensor
    bpd_stderr: Tensor
    samples: Tensor
    prior_logp: Tensor
    latent: Tensor
    nfe: int


def _check_options(trace: str, probes: str, n_probes: int, rtol: float, atol: float, eps: float,
                   sde: SDE, dequantize: dict | None) -> tuple[int | None, int]:
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if probes not in PROBES:
        raise ValueError(f"probes must be one of {PROBES}, got {probes!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (tol > 0):
            raise ValueError(f"{name} must be > 0, got {tol!r}")
    if not (0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
    if dequantize is None:
        return None, 1
    if not isinstance(dequantize, dict):
        raise ValueError(
            f"dequantize must be None or a dict like {{'levels': 256, 'draws': 1}}, got {dequantize!r}")
    unknown = set(dequantize) - set(DEQUANTIZE_KEYS)
    if unknown:
        raise ValueError(f"dequantize has unknown keys {sorted(unknown)}; allowed: {DEQUANTIZE_KEYS}")
    if "levels" not in dequantize:
        raise ValueError("dequantize needs 'levels', the number of data levels (256 for 8-bit images)")
    draws = dequantize.get("draws", 1)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"dequantize draws must be an integer >= 1, got {draws!r}")
    return check_levels(dequantize["levels"]), draws


def check_data(x: object) -> Tensor:
    """Validate a data batch [B, ...] (floating point, finite, at least one data dimension)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape [B, ...], got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"x must have shape [B, ...] with at least one data dimension, got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"x must hold at least one sample and one value, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values")
    return x


def draw_probes(kind: str, shape: tuple[int, ...], like: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
    """Probe vectors with E[vvᵀ] = I: Rademacher (±1) or standard Gaussian, dtype/device of `like`."""
    device = generator.device if generator is not None else like.device
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=device).to(like.dtype) * 2 - 1
    elif kind == "gaussian":
        v = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    else:
        raise ValueError(f"probes must be one of {PROBES}, got {kind!r}")
    return v.to(like.device)


def _raise_not_finite(what: str, value: Tensor, t: Tensor) -> None:
    bad = (~torch.isfinite(value.reshape(value.shape[0], -1))).any(1)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, idx[:8])) + (", …" if len(idx) > 8 else "")
        raise ValueError(f"probability-flow ODE: {what} is NaN/inf at t={float(t):.6g} for sample index "
                         f"{shown} (of a batch of {value.shape[0]}); check the score model and the data")


def exact_divergence(y: Tensor, x: Tensor) -> Tensor:
    """∇·y(x) per sample by one vector-Jacobian product per dimension (for small D and for checks)."""
    flat = y.reshape(y.shape[0], -1)
    div = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    for i in range(flat.shape[1]):
        # Samples are independent, so one backward pass of Σ_b y_b,i gives ∂y_b,i/∂x_b,i for all b.
        grad = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
        div = div + grad.reshape(grad.shape[0], -1)[:, i]
    return div


def hutchinson_divergence(y: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """vᵀ(∂y/∂x)v per sample and probe, [B, P], for probes v of shape [P, *x.shape]."""
    out = []
    for p in range(probes.shape[0]):
        vjp = torch.autograd.grad(y, x, probes[p], retain_graph=p < probes.shape[0] - 1)[0]
        out.append((vjp * probes[p]).reshape(x.shape[0], -1).sum(1))
    return torch.stack(out, 1)


def _solve(score_fn: ScoreFn, sde: SDE, x: Tensor, probes: Tensor | None, *, rtol: float, atol: float,
           eps: float, method: str) -> tuple[Tensor, Tensor, int]:
    """Integrate [x, ∫∇·f̃ dt] from eps to T; returns x(T), the integral [B, P] and the NFE."""
    B = x.shape[0]
    P = 1 if probes is None else probes.shape[0]
    ode = sde.reverse(score_fn, probability_flow=True)
    nfe = 0

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        x_t = state[0]
        _raise_not_finite("the state x(t)", x_t, t)
        t_vec = t.reshape(1).expand(B)
        with torch.enable_grad():
            x_t = x_t.detach().requires_grad_(True)
            drift, _ = ode.sde(x_t, t_vec)
            nfe += 1
            _raise_not_finite("the drift f(x,t) - ½g(t)² score(x,t)", drift, t)
            if probes is None:
                div = exact_divergence(drift, x_t).unsqueeze(1)
            else:
                div = hutchinson_divergence(drift, x_t, probes)
        _raise_not_finite("the divergence of the drift", div, t)
        return drift.detach(), div.detach()

    times = torch.tensor([eps, sde.T], dtype=x.dtype, device=x.device)
    state0 = (x, torch.zeros(B, P, dtype=x.dtype, device=x.device))
    with torch.no_grad():
        xs, divs = odeint(rhs, state0, times, rtol=rtol, atol=atol, method=method)
    _raise_not_finite("the solution x(T)", xs[-1], times[-1])
    _raise_not_finite("the integrated divergence", divs[-1], times[-1])
    return xs[-1], divs[-1], nfe


def ode_likelihood(score_fn: ScoreFn, sde: SDE, x: Tensor, *, trace: str = "hutchinson",
                   probes: str = "rademacher", n_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                   eps: float = 1e-5, method: str = "dopri5", dequantize: dict | None = None,
                   generator: torch.Generator | None = None) -> LikelihoodResult:
    """log p(x) and bits/dim by the probability-flow ODE and the instantaneous change of variables
    (Song et al. 2021, App. D.2; Chen et al. 2018). The result is log p_eps(x): pass eps small.

    dequantize={"levels": L, "draws": K} treats x as L-level data on [-1, 1] (k·2/(L-1) - 1), averages
    over K uniform dequantisations x + (u - ½)·2/(L-1) and returns the bound on the discrete log-probability
        logp = mean_u[log p(x_deq)] + D·log(2/(L-1)),   bpd = -logp/(D ln 2)
    (derivation in `pipeline.diffusion.dequantize`).
    """
    x = check_data(x)
    levels, draws = _check_options(trace, probes, n_probes, rtol, atol, eps, sde, dequantize)
    if levels is not None:
        check_on_grid(x, levels)
    D = x[0].numel()
    P = n_probes if trace == "hutchinson" else 1
    per_draw, priors, nfe = [], [], 0
    for _ in range(draws):
        x_in = x if levels is None else uniform_dequantize(x, levels, generator)
        v = draw_probes(probes, (P, *x.shape), x, generator) if trace == "hutchinson" else None
        z, integral, n = _solve(score_fn, sde, x_in, v, rtol=rtol, atol=atol, eps=eps, method=method)
        prior = sde.prior_logp(z).to(x.dtype)
        logp = prior.unsqueeze(1) + integral  # [B, P]
        if levels is not None:
            logp = logp + logp_offset(levels, D)
        per_draw.append(logp)
        priors.append(prior)
        nfe += n
    samples = torch.cat(per_draw, 1)
    logp = samples.mean(1)
    if draws > 1:  # draws are i.i.d.; the probes within one draw share its u
        means = torch.stack([s.mean(1) for s in per_draw], 1)
        stderr = means.std(1) / math.sqrt(draws)
    elif P > 1:
        stderr = samples.std(1) / math.sqrt(P)
    elif trace == "exact" and levels is None:
        stderr = torch.zeros_like(logp)
    else:
        stderr = torch.full_like(logp, float("nan"))
    return LikelihoodResult(logp=logp, bpd=bits_per_dim(logp, D), stderr=stderr,
                            bpd_stderr=stderr / (D * math.log(2.0)), samples=samples,
                            prior_logp=torch.stack(priors, 1).mean(1), latent=z, nfe=nfe)


__all__ = [
    "DEQUANTIZE_KEYS", "PROBES", "TRACES", "LikelihoodResult", "check_data", "draw_probes",
    "exact_divergence", "hutchinson_divergence", "ode_likelihood",
]
