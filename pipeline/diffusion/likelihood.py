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
from .sde import SDE, VPSDE, ScoreFn

TRACES: tuple[str, ...] = ("hutchinson", "exact")
# Integration variables: the SDE's own time t (Song et al. 2021), or a clock of the noise level σ̃ = σ/α
# with the state in variance-preserving units (`_solve_noise_level`): "angle", θ = arctan σ̃ (the
# default: fewest score evaluations for the accuracy, benchmarks/RESULTS.md), or "vp", the time of the
# default VP SDE.
VARIABLES: tuple[str, ...] = ("angle", "t", "vp")
PROBES: tuple[str, ...] = ("rademacher", "gaussian")
DEQUANTIZE_KEYS: tuple[str, ...] = ("levels", "draws")


@dataclass(frozen=True)
class Integration:
    """How the probability-flow ODE is integrated: torchdiffeq's solver `method` (adaptive dopri5 by
    default; the tolerances are `ode_likelihood`'s rtol/atol) and the integration `variable` (VARIABLES:
    "angle" θ = arctan σ̃ by default, the SDE's own time "t" as score_sde does, or "vp", the noise level
    on the VP SDE's clock; `_solve_noise_level`)."""

    method: str = "dopri5"
    variable: str = "angle"


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
                   sde: SDE, dequantize: dict | None, variable: str = "t") -> tuple[int | None, int]:
    if variable not in VARIABLES:
        raise ValueError(f"variable must be one of {VARIABLES}, got {variable!r}")
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


def _divergence(drift: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    if probes is None:
        return exact_divergence(drift, x).unsqueeze(1)
    return hutchinson_divergence(drift, x, probes)


_VP_CLOCK = VPSDE()  # β from 0.1 to 20 (Song et al. 2021): the clock of variable="vp"


def _vp_clock(tau: Tensor) -> tuple[Tensor, Tensor]:
    """σ̃(τ) and dσ̃/dτ on the VP clock: σ̃² = exp(∫β) - 1 (Song et al. 2021, App. B), so
    dσ̃/dτ = (1 + σ̃²) β(τ) / (2σ̃)."""
    st = _VP_CLOCK.edm_sigma(tau.reshape(1))[0]
    return st, (1 + st**2) * _VP_CLOCK.beta(tau.reshape(1))[0] / (2 * st)


def _angle_clock(theta: Tensor) -> tuple[Tensor, Tensor]:
    """σ̃ = tan θ and dσ̃/dθ = 1 + σ̃². In VP units x = cos θ·x₀ + sin θ·ε, so θ is the angle between
    data and noise: every σ̃ from 0 to ∞ lies in [0, π/2), and the clock neither crowds the small noise
    levels (as log σ̃ does) nor the large ones (as σ̃ itself does)."""
    st = torch.tan(theta)
    return st, 1 + st**2


# variable → (σ̃(τ), dσ̃/dτ), τ(σ̃)
_CLOCKS = {"vp": (_vp_clock, lambda s: _VP_CLOCK.edm_sigma_inv(s)),
           "angle": (_angle_clock, torch.atan)}


def _solve_noise_level(score_fn: ScoreFn, sde: SDE, x: Tensor, probes: Tensor | None, *, rtol: float,
                       atol: float, eps: float, method: str,
                       variable: str) -> tuple[Tensor, Tensor, int]:
    """The solve in noise-level coordinates: x(T), the log-density change [B, P] and the NFE.

    Write σ̃ = σ/α (Karras et al. 2022, eq. 4) and y = x/α = x_0 + σ̃ ε. For VP, sub-VP and VE alike
    the PF-ODE (Song et al. 2021, eq. 13) becomes dy/dσ̃ = ε̂(x, t) with ε̂ = -σ ∇log p_t(x), t = t(σ̃).
    We integrate the state w = y/r, r = √(1 + σ̃²) (y in variance-preserving units: O(1) however
    large σ̃ grows, where VE's x ~ σ ε grows without bound, and constant for unit-variance data), so
        dw/dσ̃ = (r ε̂ - σ̃ w)/r²,   dw/dτ = dw/dσ̃ · dσ̃/dτ,
    in a clock τ of the noise level (`_CLOCKS`): the angle θ = arctan σ̃ (there dw/dθ = r ε̂ - σ̃ w), or
    the time of the default VP SDE (for that SDE its own ODE). The SDE only enters through t(σ̃), so
    every process costs what a VP one does. With x = k w, k = α r, log p_x = log p_w - D log k, so
        log p_eps(x) = log p_T(x(T)) + D (log k(T) - log k(eps)) + ∫ ∇_w·(dw/dτ) dτ.
    A step is made to end exactly at τ(T): interpolating past it costs the high-order solvers accuracy.
    """
    clock, tau_of = _CLOCKS[variable]
    B, D = x.shape[0], x[0].numel()
    P = 1 if probes is None else probes.shape[0]
    nfe = 0
    ends = torch.tensor([eps, sde.T], dtype=torch.float64, device=x.device)
    alpha_ends, _ = sde.marginal_coeffs(ends)
    sig_ends = sde.edm_sigma(ends)
    k_ends = alpha_ends * torch.sqrt(1 + sig_ends**2)

    def rhs(tau: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        w = state[0]
        # The initial-step probe may look past τ(T) (beyond π/2 the angle clock's σ̃ turns negative).
        st, dst = clock(tau.double().clamp(float(taus[0]), float(taus[1])))
        t = sde.edm_sigma_inv(st).clamp(float(ends[0]), float(ends[1])).reshape(1)
        alpha, sigma = (c.to(x.dtype) for c in sde.marginal_coeffs(t))
        t, st, dst = t.to(x.dtype), st.to(x.dtype), dst.to(x.dtype)
        r = torch.sqrt(1 + st**2)
        _raise_not_finite("the state x(t)", w, t)
        with torch.enable_grad():
            w = w.detach().requires_grad_(True)
            eps_hat = -sigma * score_fn(alpha * r * w, t.expand(B))
            nfe += 1
            drift = (r * eps_hat - st * w) * (dst / r**2)
            _raise_not_finite("the drift dw/dτ", drift, t)
            div = _divergence(drift, w, probes)
        _raise_not_finite("the divergence of the drift", div, t)
        return drift.detach(), div.detach()

    taus = tau_of(sig_ends).to(x.dtype)
    state0 = (x / k_ends[0].to(x.dtype), torch.zeros(B, P, dtype=x.dtype, device=x.device))
    with torch.no_grad():
        ws, divs = odeint(rhs, state0, taus, rtol=rtol, atol=atol, method=method,
                          options={"step_t": taus[1:]})
    z = ws[-1] * k_ends[1].to(x.dtype)
    _raise_not_finite("the solution x(T)", z, ends[1])
    _raise_not_finite("the integrated divergence", divs[-1], ends[1])
    correction = D * (torch.log(k_ends[1]) - torch.log(k_ends[0])).to(x.dtype)
    return z, divs[-1] + correction, nfe


def ode_likelihood(score_fn: ScoreFn, sde: SDE, x: Tensor, *, trace: str = "hutchinson",
                   probes: str = "rademacher", n_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                   eps: float = 1e-5, integration: Integration = Integration(),
                   dequantize: dict | None = None,
                   generator: torch.Generator | None = None) -> LikelihoodResult:
    """log p(x) and bits/dim by the probability-flow ODE and the instantaneous change of variables
    (Song et al. 2021, App. D.2; Chen et al. 2018). The result is log p_eps(x): pass eps small.

    dequantize={"levels": L, "draws": K} treats x as L-level data on [-1, 1] (k·2/(L-1) - 1), averages
    over K uniform dequantisations x + (u - ½)·2/(L-1) and returns the bound on the discrete log-probability
        logp = mean_u[log p(x_deq)] + D·log(2/(L-1)),   bpd = -logp/(D ln 2)
    (derivation in `pipeline.diffusion.dequantize`).

    integration=Integration() integrates in the angle θ = arctan σ̃ of the noise level with the state in
    variance-preserving units (see `_solve_noise_level`): the same log p_eps(x) as score_sde's
    integration in the SDE's own time (variable="t"), in fewer score evaluations for the same accuracy
    (benchmarks/RESULTS.md: 1.13× fewer on VP, 1.5× on sub-VP, 3.5× on VE).
    """
    x = check_data(x)
    if not isinstance(integration, Integration):
        raise ValueError(f"integration must be an Integration(method=..., variable=...), got {integration!r}")
    variable = integration.variable
    levels, draws = _check_options(trace, probes, n_probes, rtol, atol, eps, sde, dequantize, variable)
    if levels is not None:
        check_on_grid(x, levels)
    D = x[0].numel()
    P = n_probes if trace == "hutchinson" else 1
    per_draw, priors, nfe = [], [], 0
    for _ in range(draws):
        x_in = x if levels is None else uniform_dequantize(x, levels, generator)
        v = draw_probes(probes, (P, *x.shape), x, generator) if trace == "hutchinson" else None
        opts = dict(rtol=rtol, atol=atol, eps=eps, method=integration.method)
        if variable == "t":
            z, integral, n = _solve(score_fn, sde, x_in, v, **opts)
        else:
            z, integral, n = _solve_noise_level(score_fn, sde, x_in, v, variable=variable, **opts)
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
    "DEQUANTIZE_KEYS", "PROBES", "TRACES", "VARIABLES", "Integration", "LikelihoodResult", "check_data",
    "draw_probes", "exact_divergence", "hutchinson_divergence", "ode_likelihood",
]
