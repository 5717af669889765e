"""Samplers for score-based diffusion models: plain functions plus one dispatcher, `sample`.

Every process here has the Gaussian kernel x_t = α(t) x_0 + σ(t) ε (`SDE.marginal_coeffs`), so the
discrete samplers are written once in that (α, σ) form; for VP (α² + σ² = 1) they reduce to the DDPM /
DDIM formulas of the papers, for VE (α = 1) to SMLD's. Between two grid times s < t the forward process
moves by its exact transition x_t = α_{t|s} x_s + σ_{t|s} z with
    α_{t|s} = α_t / α_s,    σ_{t|s}² = σ_t² − α_{t|s}² σ_s²,
and Tweedie's formula gives the posterior mean of x_0: x̂_0 = (x_t + σ_t² ∇log p_t(x_t)) / α_t.

Each sampler takes (score_fn, sde, x_T, *, steps, generator, noise, ..., callback) and returns the
sample; options that travel together are one small frozen value (`ChainOptions` for an exact chain's
timesteps, `Churn` for EDM's stochasticity, `MultistepOptions`/`UniPCOptions` for the multistep solvers).
`sample` takes every option by its flat name, builds those values, draws x_T from the prior (or takes
the x_T it is given), shows progress from the `callback` events when asked, counts score evaluations
(NFE) and returns both. Every in-trajectory normal draw goes through one noise source: a callable
`noise(x) -> Tensor` shaped like x in EDM's manner (`randn_like`), or else the torch.Generator passed
in, so a seed fixes the result. `per_sample_noise` and `per_sample_prior` give each sample its own
generator, so that sample k regenerated alone equals row k of a batch run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import multistep
from .chain import DDPMChain
from .multistep import MultistepOptions, UniPCOptions, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
from .respace import (
    SPACINGS,
    ChainOptions,
    check_chain_options,
    draw_noise,
    sample_chain_ancestral,
    sample_chain_ddim,
)
from .schedules import SAMPLER_VARIANCES, time_grid
from .sde import SDE, VESDE, ScoreFn, expand_like

Callback = Callable[[dict[str, Any]], None]
NoiseFn = Callable[[Tensor], Tensor]  # randn_like(x): a standard normal draw with the shape of x

ADAPTIVE_SOLVERS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_SOLVERS: tuple[str, ...] = ("euler", "midpoint", "heun2", "heun3", "rk4")
GRIDS: tuple[str, ...] = ("uniform", "karras")
SNR_NORMS: tuple[str, ...] = ("batch", "sample")
_CHAIN_DEFAULTS = ChainOptions()  # the default of the samplers' `chain` (one shared immutable value)


class ScoreCounter:
    """Wraps a score_fn and counts its calls: the number of function evaluations (NFE)."""

    def __init__(self, score_fn: ScoreFn) -> None:
        self.score_fn, self.nfe = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.score_fn(x, t)


# ---- shared pieces ----------------------------------------------------------------------------------


def _vec(t: Tensor | float, x: Tensor) -> Tensor:
    """A scalar time as the per-sample vector [B] that score_fn expects."""
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def _coeffs(sde: SDE, t: float) -> tuple[Tensor, Tensor]:
    """α(t), σ(t) as 0-dim float64 tensors (the grid arithmetic is done in float64)."""
    alpha, sigma = sde.marginal_coeffs(torch.tensor([float(t)], dtype=torch.float64))
    return alpha[0], sigma[0]


def _noise(x: Tensor, generator: torch.Generator | None, noise: NoiseFn | None = None) -> Tensor:
    """One standard normal draw shaped like x: from `noise` when given (it takes precedence), else
    from `generator`."""
    return draw_noise(x, generator, noise)


def per_sample_noise(generators: Sequence[torch.Generator]) -> NoiseFn:
    """A noise source whose row i of every draw comes from generators[i] (shape x.shape[1:]), so each
    sample has its own stream and does not depend on the batch it is run in."""
    gens = list(generators)
    if not gens:
        raise ValueError("generators must hold one torch.Generator per sample, got none")

    def randn_like(x: Tensor) -> Tensor:
        if x.shape[0] != len(gens):
            raise ValueError(f"per_sample_noise has {len(gens)} generators but x has batch size {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                            for g in gens])

    return randn_like


def per_sample_prior(sde: SDE, shape: Sequence[int], generators: Sequence[torch.Generator],
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """x_T of `shape` [B, ...] whose row i is `sde.prior_sampling` drawn with generators[i]."""
    shape = tuple(int(n) for n in shape)
    gens = list(generators)
    if len(shape) < 2 or shape[0] != len(gens):
        raise ValueError(f"shape must be [B, ...] with B = len(generators) = {len(gens)}, got {shape}")
    rows = [sde.prior_sampling((1, *shape[1:]), generator=g, device=device) for g in gens]
    x = torch.cat(rows)
    return x if dtype is None else x.to(dtype)


def _tweedie(score_fn: ScoreFn, sde: SDE, x: Tensor, t: float) -> Tensor:
    """x̂_0 = E[x_0 | x_t] = (x_t + σ_t² ∇log p_t(x_t)) / α_t (Tweedie's formula); one NFE."""
    alpha, sigma = _coeffs(sde, t)
    return (x + float(sigma**2) * score_fn(x, _vec(t, x))) / float(alpha)


def _transition(sde: SDE, t: float, s: float) -> tuple[float, float, float, float, float]:
    """α_s, σ_s, σ_t, α_{t|s} and σ_{t|s}² of the forward step from s to t > s."""
    a_t, s_t = _coeffs(sde, t)
    a_s, s_s = _coeffs(sde, s)
    a_ts = a_t / a_s
    var_ts = (s_t**2 - a_ts**2 * s_s**2).clamp(min=0.0)
    return float(a_s), float(s_s), float(s_t), float(a_ts), float(var_ts)


def _emit(callback: Callback | None, i: int, t: float, x: Tensor, denoised: Tensor | None) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "denoised": denoised})


# ---- discrete-time samplers ----------------------------------------------------------------------------


def sample_ancestral(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
                     generator: torch.Generator | None = None, noise: NoiseFn | None = None,
                     eps: float = 1e-3, variance: str = "beta_tilde", grid: str = "uniform",
                     denoise: bool = True, callback: Callback | None = None,
                     chain: ChainOptions = _CHAIN_DEFAULTS) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2; SMLD: Song et al. 2021, App. F, eq. 47).

    Each step samples q(x_s | x_t, x̂_0) with the exact transition of the process between grid times,
        mean = (x_t + σ_{t|s}² score) / α_{t|s},
        var = σ_{t|s}² ("beta") or σ_{t|s}² σ_s²/σ_t² ("beta_tilde").
    For VP, 1 − α_{t|s}² = 1 − ᾱ(t)/ᾱ(s) = β'_i and the mean is Alg. 2's (x_t − β'/√(1−ᾱ_t) ε̂)/√(1−β')
    with ε̂ = −σ_t score; for VE it is eq. 47. sub-VP gets the same posterior of its own Gaussian
    transition (the SDE is linear, so that transition is exact; no DDPM chain is assumed).

    On an exact chain (`DDPMChain`) the steps run on its integer timesteps instead, as `chain` says
    (spacing "leading" by default, "trailing", "linspace"; steps_offset; clip_sample; see
    `respace.sample_chain_ancestral`); the last step lands on x_0 itself, so eps, grid and denoise
    have no role there.
    """
    if isinstance(sde, DDPMChain):
        return sample_chain_ancestral(score_fn, sde, x_T, steps=steps, generator=generator, noise=noise,
                                      variance=variance, options=chain, callback=callback)
    ts = time_grid(sde, steps, eps=eps, kind=grid).tolist()
    x = x_T
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        _, s_s, s_t, a_ts, var_ts = _transition(sde, t, s)
        score = score_fn(x, _vec(t, x))
        x0_hat = (x + s_t**2 * score) / float(_coeffs(sde, t)[0]) if callback else None
        mean = (x + var_ts * score) / a_ts
        # β̃ = σ_{t|s}² σ_s² / σ_t² is the variance of q(x_s | x_t, x_0) (Ho et al. 2020, eq. 7).
        var = var_ts if variance == "beta" else var_ts * s_s**2 / s_t**2
        x = mean + math.sqrt(var) * _noise(x, generator, noise)
        _emit(callback, i, t, x, x0_hat)
    return _tweedie(score_fn, sde, x, ts[-1]) if denoise else x


def sample_ddim(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
                generator: torch.Generator | None = None, noise: NoiseFn | None = None,
                eps: float = 1e-3, eta: float = 0.0, grid: str = "uniform", denoise: bool = True,
                callback: Callback | None = None, chain: ChainOptions = _CHAIN_DEFAULTS) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) in (α, σ) form:
    x_s = α_s x̂_0 + √(σ_s² − σ_η²) ε̂ + σ_η z,  σ_η = η √(σ_{t|s}² σ_s²/σ_t²) (eq. 16).

    η = 0 is deterministic (Euler on the probability-flow ODE in σ̃ = σ/α); η = 1 is ancestral
    sampling with the posterior variance β̃.

    On an exact chain (`DDPMChain`) the steps run on its integer timesteps, as `chain` says (spacing,
    steps_offset, set_alpha_to_one: ᾱ = 1 below timestep 0, else ᾱ_0; clip_sample; see
    `respace.sample_chain_ddim`).
    """
    if isinstance(sde, DDPMChain):
        return sample_chain_ddim(score_fn, sde, x_T, steps=steps, generator=generator, noise=noise, eta=eta,
                                 options=chain, callback=callback)
    ts = time_grid(sde, steps, eps=eps, kind=grid).tolist()
    x = x_T
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        a_s, s_s, s_t, _, var_ts = _transition(sde, t, s)
        a_t = float(_coeffs(sde, t)[0])
        score = score_fn(x, _vec(t, x))
        eps_hat = -s_t * score
        x0_hat = (x - s_t * eps_hat) / a_t
        sigma_eta = eta * math.sqrt(var_ts * s_s**2 / s_t**2)
        x = a_s * x0_hat + math.sqrt(max(s_s**2 - sigma_eta**2, 0.0)) * eps_hat
        if sigma_eta > 0:
            x = x + sigma_eta * _noise(x, generator, noise)
        _emit(callback, i, t, x, x0_hat)
    return _tweedie(score_fn, sde, x, ts[-1]) if denoise else x


# ---- SDE samplers -----------------------------------------------------------------------------------


def sample_euler_maruyama(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
                          generator: torch.Generator | None = None, noise: NoiseFn | None = None,
                          eps: float = 1e-3, denoise: bool = True,
                          callback: Callback | None = None) -> Tensor:
    """Euler–Maruyama on the reverse SDE dx = [f − g² ∇log p_t] dt + g dw̄ (Song et al. 2021, eq. 6),
    uniform grid from T to eps."""
    ts = time_grid(sde, steps, eps=eps).tolist()
    rsde = sde.reverse(score_fn)
    x = x_T
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]  # dt < 0: time runs backwards
        drift, diffusion = rsde.sde(x, _vec(t, x))
        x = x + drift * dt + expand_like(diffusion, x) * math.sqrt(-dt) * _noise(x, generator, noise)
        _emit(callback, i, t, x, None)
    return _tweedie(score_fn, sde, x, ts[-1]) if denoise else x


def _with_chain_length(sde: SDE, n: int) -> SDE:
    """The same process with an n-step discretisation, so `discretize` matches the sampler's grid."""
    if n == sde.N:
        return sde
    if isinstance(sde, DDPMChain):  # a chain's steps are its own; another N would be another chain
        raise ValueError(f"pc on a ddpm-chain needs steps == N = {sde.N} (its own timesteps), got {n}")
    params = {k: v for k, v in sde.config().items() if k != "name"}
    params["N"] = n
    try:
        return type(sde)(**params)
    except TypeError as err:
        raise ValueError(f"pc needs steps == sde.N ({sde.N}) for {type(sde).__name__}, "
                         f"which cannot be rebuilt from its config: {err}") from err


def _langevin_alpha(chain: SDE, t: Tensor) -> Tensor:
    """score_sde's corrector scale: the chain's α_i = 1 − β_i for VP-type chains, 1 otherwise."""
    alphas = getattr(chain, "alphas", None)
    if alphas is None:
        return torch.ones_like(t)
    return alphas.to(t.device)[chain._time_index(t)].to(t.dtype)


def sample_pc(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
              generator: torch.Generator | None = None, noise: NoiseFn | None = None, eps: float = 1e-3,
              snr: float = 0.16, n_corrector: int = 1, snr_norm: str = "batch", denoise: bool = True,
              callback: Callback | None = None) -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 2/3, as score_sde's `pc_sampler`).

    The process is discretised into its own `steps`-step chain (DDPM chain for VP, SMLD ladder for VE,
    Euler–Maruyama for sub-VP) and visited at score_sde's grid linspace(T, eps, steps). At each time:
    `n_corrector` Langevin steps with step size 2 α_i (snr ‖z‖ / ‖score‖)² (Alg. 4/5), then one
    reverse-diffusion predictor step `sde.reverse(score_fn).discretize` (eq. 46). The chain's last step
    evaluates the score at eps and lands on the data; `denoise` drops its noise (score_sde's noise
    removal), which is the Tweedie step at eps at no extra NFE. NFE = steps · (1 + n_corrector).
    snr_norm "batch" averages the norms over the batch as score_sde does; "sample" uses each sample's
    own norms, so a sample does not depend on the others in its batch (regenerable alone).
    """
    chain = _with_chain_length(sde, steps)
    rsde = chain.reverse(score_fn)
    ts = time_grid(sde, steps - 1, eps=eps).tolist() if steps > 1 else [sde.T]
    x = x_mean = x_T
    for i in range(steps):
        t = _vec(ts[i], x)
        alpha = expand_like(_langevin_alpha(chain, t), x) if n_corrector else None
        for _ in range(n_corrector):
            grad = score_fn(x, t)
            z = _noise(x, generator, noise)
            grad_norm = grad.reshape(x.shape[0], -1).norm(dim=-1)
            noise_norm = z.reshape(x.shape[0], -1).norm(dim=-1)
            if snr_norm == "batch":  # averaged over the batch, as score_sde's LangevinCorrector
                grad_norm, noise_norm = grad_norm.mean(), noise_norm.mean()
            else:
                grad_norm, noise_norm = expand_like(grad_norm, x), expand_like(noise_norm, x)
            step = 2 * alpha * (snr * noise_norm / grad_norm) ** 2
            x = x + step * grad + torch.sqrt(2 * step) * z
        f, G = rsde.discretize(x, t)
        x_mean = x - f
        x = x_mean + expand_like(G, x) * _noise(x, generator, noise)
        _emit(callback, i, ts[i], x, None)
    return x_mean if denoise else x


def sample_annealed_langevin(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
                             generator: torch.Generator | None = None, noise: NoiseFn | None = None,
                             eps: float = 1e-3, n_steps_each: int = 100, step_lr: float = 2e-5,
                             denoise: bool = True, callback: Callback | None = None) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) on the VE process.

    `steps` = L noise levels σ_1 > … > σ_L, geometric between σ(T) and σ(eps) (NCSN's ladder, which is
    VE's σ(t) on a uniform t grid); at level i, `n_steps_each` steps
    x ← x + (α_i/2) s(x, σ_i) + √α_i z with α_i = step_lr · σ_i²/σ_L². `denoise` is the final Tweedie
    step at σ_L (Jolicoeur-Martineau et al. 2021; NCSNv2).
    """
    if not isinstance(sde, VESDE):
        raise ValueError(f"annealed_langevin needs a VE process (VESDE), got {type(sde).__name__}")
    ts = time_grid(sde, steps - 1, eps=eps) if steps > 1 else torch.tensor([sde.T], dtype=torch.float64)
    sigmas = sde.edm_sigma(ts)  # VE: σ̃ = σ
    sigma_L = float(sigmas[-1])
    x = x_T
    for i in range(steps):
        t = _vec(sde.edm_sigma_inv(sigmas[i : i + 1]).item(), x)
        step = step_lr * float(sigmas[i]) ** 2 / sigma_L**2
        for _ in range(n_steps_each):
            x = x + 0.5 * step * score_fn(x, t) + math.sqrt(step) * _noise(x, generator, noise)
        _emit(callback, i, float(ts[i]), x, None)
    return _tweedie(score_fn, sde, x, float(ts[-1])) if denoise else x


# ---- ODE samplers -----------------------------------------------------------------------------------


def sample_ode(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int, eps: float = 1e-3,
               solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, denoise: bool = False,
               callback: Callback | None = None) -> Tensor:
    """Probability-flow ODE dx/dt = f − ½ g² ∇log p_t (Song et al. 2021, eq. 13) from T to eps with
    torchdiffeq. Adaptive solvers (dopri5, …) ignore `steps` and stop at rtol/atol; fixed-step solvers
    (euler, rk4, …) take `steps` uniform steps."""
    from torchdiffeq import odeint

    rsde = sde.reverse(score_fn, probability_flow=True)
    calls = [0]

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        calls[0] += 1
        drift = rsde.sde(x, t.to(x.dtype).reshape(1).expand(x.shape[0]))[0]
        _emit(callback, calls[0], float(t), x, None)  # one event per drift evaluation
        return drift

    if solver in ADAPTIVE_SOLVERS:
        grid = torch.tensor([sde.T, eps], dtype=x_T.dtype, device=x_T.device)
    else:
        grid = time_grid(sde, steps, eps=eps).to(dtype=x_T.dtype, device=x_T.device)
    # torchdiffeq's adaptive solvers step past the last time and interpolate back; below eps the
    # process's coefficients (and a network's inputs) are invalid, so force a step to end at eps.
    options = {"step_t": grid[-1:]} if solver in ADAPTIVE_SOLVERS else None
    x = odeint(rhs, x_T, grid, method=solver, rtol=rtol, atol=atol, options=options)[-1]
    return _tweedie(score_fn, sde, x, eps) if denoise else x


@dataclass(frozen=True)
class Churn:
    """EDM's stochasticity (Karras et al. 2022, Alg. 2): while S_tmin ≤ σ̃ ≤ S_tmax, each step first
    raises the noise level by γ = min(S_churn/steps, √2 − 1) with fresh noise scaled by S_noise.
    S_churn = 0 (the default) is the deterministic Alg. 1."""

    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = float("inf")
    S_noise: float = 1.0


def sample_heun(score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, steps: int,
                generator: torch.Generator | None = None, noise: NoiseFn | None = None,
                eps: float = 1e-3, rho: float = 7.0, churn: Churn = Churn(), denoise: bool = False,
                callback: Callback | None = None) -> Tensor:
    """EDM's sampler (Karras et al. 2022, Alg. 1; Alg. 2 with churn.S_churn > 0) on x̃ = x/α, σ̃ = σ/α.

    There the PF-ODE is dx̃/dσ̃ = −σ̃ ∇log p(x̃; σ̃) = (x̃ − D(x̃; σ̃))/σ̃ with the denoiser
    D = x̃ + σ̃² α ∇_x log p_t(α x̃) (Tweedie in x̃; ∇_x̃ = α ∇_x). Heun steps over the ρ-spaced grid,
    Euler on the last step to eps. NFE = 2·steps − 1. Churn never raises σ̃ above σ̃(T), so the score is
    only asked for t ≤ T.
    """
    ts = time_grid(sde, steps, eps=eps, kind="karras", rho=rho)
    sigmas = sde.edm_sigma(ts).tolist()
    sigma_T = sigmas[0]
    alpha_T = float(_coeffs(sde, ts[0].item())[0])

    def denoiser(x_tilde: Tensor, sigma: float) -> Tensor:
        t = sde.edm_sigma_inv(torch.tensor([sigma], dtype=torch.float64)).clamp(max=sde.T).item()
        alpha = float(_coeffs(sde, t)[0])
        return x_tilde + sigma**2 * alpha * score_fn(alpha * x_tilde, _vec(t, x_tilde))

    x = x_T / alpha_T
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        in_range = churn.S_tmin <= sigma <= churn.S_tmax
        gamma = min(churn.S_churn / steps, math.sqrt(2) - 1) if in_range else 0.0
        sigma_hat = min(sigma * (1 + gamma), sigma_T)
        if sigma_hat > sigma:  # Alg. 2, lines 5–6: raise the noise level to σ̂ by adding fresh noise
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * churn.S_noise * _noise(x, generator, noise)
        D = denoiser(x, sigma_hat)
        d = (x - D) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if i < steps - 1:  # second-order correction (Alg. 1, lines 7–8)
            d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
        _emit(callback, i, ts[i].item(), x, D)
    x = float(_coeffs(sde, eps)[0]) * x
    return _tweedie(score_fn, sde, x, eps) if denoise else x


# ---- dispatcher -------------------------------------------------------------------------------------

def _flat(group: type, *, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """A group's fields as flat options of `sample`, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(group) if f.name not in without}


_COMMON: dict[str, Any] = {"eps": 1e-3, "progress": False, "callback": None, "dtype": torch.float32}
_METHODS: dict[str, tuple[Callable[..., Tensor], dict[str, Any]]] = {
    # set_alpha_to_one is DDIM's: ancestral steps land on the data.
    "ancestral": (sample_ancestral, {"denoise": True, "variance": "beta_tilde", "grid": "uniform",
                                     **_flat(ChainOptions, without=("set_alpha_to_one",))}),
    "ddim": (sample_ddim, {"denoise": True, "eta": 0.0, "grid": "uniform", **_flat(ChainOptions)}),
    "euler_maruyama": (sample_euler_maruyama, {"denoise": True}),
    "pc": (sample_pc, {"denoise": True, "snr": 0.16, "n_corrector": 1, "snr_norm": "batch"}),
    "annealed_langevin": (sample_annealed_langevin, {"denoise": True, "n_steps_each": 100, "step_lr": 2e-5}),
    "ode": (sample_ode, {"denoise": False, "solver": "dopri5", "rtol": 1e-5, "atol": 1e-5}),
    "heun": (sample_heun, {"denoise": False, "rho": 7.0, **_flat(Churn)}),
    # Fast multistep solvers in log-SNR form (multistep.py).
    "dpmpp_2m": (sample_dpmpp_2m, {"denoise": False, **_flat(MultistepOptions)}),
    "dpmpp_2m_sde": (sample_dpmpp_2m_sde, {"denoise": False, "eta": 1.0, **_flat(MultistepOptions)}),
    "unipc": (sample_unipc, {"denoise": False, **_flat(MultistepOptions), **_flat(UniPCOptions)}),
}
# The flat options each method gathers into one value: (the sampler's parameter, the value's class).
_GROUPS: dict[str, tuple[tuple[str, type], ...]] = {
    "ancestral": (("chain", ChainOptions),),
    "ddim": (("chain", ChainOptions),),
    "heun": (("churn", Churn),),
    "dpmpp_2m": (("multistep", MultistepOptions),),
    "dpmpp_2m_sde": (("multistep", MultistepOptions),),
    "unipc": (("multistep", MultistepOptions), ("unipc", UniPCOptions)),
}
METHODS: tuple[str, ...] = tuple(_METHODS)
MULTISTEP_METHODS: tuple[str, ...] = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")


def allowed_options(method: str) -> dict[str, Any]:
    """The options `sample` accepts for `method`, with their defaults."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return {**_COMMON, **_METHODS[method][1]}


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_spacing(sde: SDE, steps: int, opts: dict[str, Any]) -> None:
    """Respacing options exist only on an exact chain, where they are checked against its N."""
    defaults = _flat(ChainOptions)
    if isinstance(sde, DDPMChain):
        check_chain_options(sde, steps, ChainOptions(**{k: opts[k] for k in defaults if k in opts}))
        return
    _require(opts["spacing"] is None or opts["spacing"] in SPACINGS, "spacing", opts["spacing"],
             f"None or one of {SPACINGS}")
    for key, default in defaults.items():
        if key in opts and opts[key] != default:
            raise ValueError(f"{key} is an option of sampling an exact discrete chain (sde 'ddpm-chain'), "
                             f"not of {type(sde).__name__}; got {key}={opts[key]!r}")


def check_options(method: str, sde: SDE, steps: int, opts: dict[str, Any]) -> None:
    """Reject bad option values (opts: every option of `method`, defaults filled in) before any score
    is evaluated; callers that run the sampler functions directly use it as `sample` does."""
    num = (int, float)
    _require(isinstance(opts["dtype"], torch.dtype) and opts["dtype"].is_floating_point, "dtype",
             opts["dtype"], "a floating torch.dtype")
    eps = opts["eps"]
    _require(isinstance(eps, num) and 0 < eps < sde.T, "eps", eps, f"in (0, T={sde.T})")
    _require(opts["callback"] is None or callable(opts["callback"]), "callback", opts["callback"],
             "None or a callable")
    if "variance" in opts:
        _require(opts["variance"] in SAMPLER_VARIANCES, "variance", opts["variance"],
                 f"one of {SAMPLER_VARIANCES}")
    if "grid" in opts:
        grids = multistep.MULTISTEP_GRIDS if method in MULTISTEP_METHODS else GRIDS
        _require(opts["grid"] in grids, "grid", opts["grid"], f"one of {grids}")
    if "spacing" in opts:
        _check_spacing(sde, steps, opts)
    if "eta" in opts:
        _require(isinstance(opts["eta"], num) and 0 <= opts["eta"] <= 1, "eta", opts["eta"], "in [0, 1]")
    if method == "pc":
        _require(isinstance(opts["snr"], num) and opts["snr"] > 0, "snr", opts["snr"], "> 0")
        n = opts["n_corrector"]
        _require(isinstance(n, int) and n >= 0, "n_corrector", n, "an int >= 0")
        _require(opts["snr_norm"] in SNR_NORMS, "snr_norm", opts["snr_norm"], f"one of {SNR_NORMS}")
        alphas = getattr(_with_chain_length(sde, steps), "alphas", None)
        # A VP-type chain has β_i ≈ β(t_i)/steps, which must stay below 1 (Song et al. 2021, App. B).
        _require(alphas is None or bool((alphas > 0).all()), "steps", steps,
                 f"large enough that every β_i of the {steps}-step {sde.name} chain is < 1")
    if method == "annealed_langevin":
        if not isinstance(sde, VESDE):
            raise ValueError(f"annealed_langevin needs a VE process (VESDE), got {type(sde).__name__}")
        n = opts["n_steps_each"]
        _require(isinstance(n, int) and n >= 1, "n_steps_each", n, "an int >= 1")
        _require(isinstance(opts["step_lr"], num) and opts["step_lr"] > 0, "step_lr", opts["step_lr"], "> 0")
    if method == "ode":
        solvers = ADAPTIVE_SOLVERS + FIXED_SOLVERS
        _require(opts["solver"] in solvers, "solver", opts["solver"], f"one of {solvers}")
        for key in ("rtol", "atol"):
            _require(isinstance(opts[key], num) and opts[key] > 0, key, opts[key], "> 0")
    if method in MULTISTEP_METHODS:
        for key in ("lower_order_final", "corrector"):
            if key in opts:
                _require(isinstance(opts[key], bool), key, opts[key], "a bool")
        if method == "unipc":
            _require(opts["order"] in (1, 2, 3) and not isinstance(opts["order"], bool), "order",
                     opts["order"], "1, 2 or 3")
            _require(opts["variant"] in multistep.UNIPC_VARIANTS, "variant", opts["variant"],
                     f"one of {multistep.UNIPC_VARIANTS}")
    if method == "heun" or method in MULTISTEP_METHODS:
        _require(isinstance(opts["rho"], num) and opts["rho"] > 0, "rho", opts["rho"], "> 0")
    if method == "heun":
        for key in ("S_churn", "S_tmin", "S_tmax", "S_noise"):
            _require(isinstance(opts[key], num) and opts[key] >= 0, key, opts[key], ">= 0")


def _grouped(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `method`'s sampler from flat options: each group of options becomes its
    one value (`_GROUPS`), a group's options not given keep that value's defaults."""
    out = dict(opts)
    for param, group in _GROUPS.get(method, ()):
        names = [f.name for f in dataclasses.fields(group)]
        out[param] = group(**{k: out.pop(k) for k in names if k in out})
    return out


def _progress(method: str, steps: int, opts: dict[str, Any]) -> tuple[Callback, Any]:
    """A callback that advances a progress bar by one per event of the sampler (one per step; for
    `ode`, one per drift evaluation, with no known total) before calling the caller's callback."""
    from tqdm.auto import tqdm  # only when asked for: the math core does not need it otherwise

    user = opts["callback"]
    if method == "ode":
        bar = tqdm(desc=f"ode ({opts['solver']})", unit="nfe")
    else:
        bar = tqdm(total=steps, desc=method)

    def on_event(event: dict[str, Any]) -> None:
        bar.update(1)
        if user is not None:
            user(event)

    return on_event, bar


def draws_noise(method: str, options: dict[str, Any] | None = None) -> bool:
    """Whether `method` with these options (defaults filled in) makes any in-trajectory normal draw: a
    sampler that makes none is deterministic given x_T."""
    opts = {**allowed_options(method), **(options or {})}
    if method in ("ode", "dpmpp_2m", "unipc"):
        return False
    if method in ("ddim", "dpmpp_2m_sde"):
        return opts["eta"] > 0
    if method == "heun":
        return opts["S_churn"] > 0
    return True


def sample(method: str, /, score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], *, steps: int,
           seed: int | None = None, x_T: Tensor | None = None, noise: NoiseFn | None = None,
           device: torch.device | str | None = None, **options: Any) -> tuple[Tensor, int]:
    """Run `method` from x_T; returns (samples, NFE).

    The start: `x_T` when given (a tensor of `shape`), else a draw of the prior with a generator seeded
    with `seed`. The in-trajectory noise: `noise` (a callable randn_like(x), e.g. `per_sample_noise`)
    when given, else the same seeded generator, which continues after x_T when x_T is drawn here; so
    `sample(seed=s)` equals `sample(x_T=prior draw, noise=randn_like on that generator)`. `seed` is
    needed unless x_T is given and the method draws no noise or `noise` is given.

    Options common to all methods: eps (end time, 1e-3), dtype (float32), progress (a bar driven by the
    callback events), callback, denoise (a final Tweedie step at eps; default True for
    ancestral/ddim/euler_maruyama/pc/annealed_langevin, False for ode/heun). Per method, see
    `allowed_options(method)`; every option is given by its flat name (S_churn=..., spacing=...,
    order=...) and gathered here into the sampler's option values (ChainOptions, Churn,
    MultistepOptions, UniPCOptions). For `ode`, `steps` is used only by the fixed-step solvers.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    fn, _ = _METHODS[method]
    allowed = allowed_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = " (the ODE integrator is chosen with `solver`)" if "method" in unknown else ""
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; allowed: {sorted(allowed)}{hint}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if len(shape) < 2 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be [B, ...] with positive sizes, got {tuple(shape)}")
    shape = tuple(int(n) for n in shape)
    if x_T is not None and (not isinstance(x_T, Tensor) or tuple(x_T.shape) != shape):
        got = tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__
        raise ValueError(f"x_T must be a tensor of shape {shape}, got {got}")
    if noise is not None and not callable(noise):
        raise ValueError(f"noise must be None or a callable randn_like(x), got {noise!r}")
    opts = {**allowed, **options}
    check_options(method, sde, steps, opts)
    if seed is None and (x_T is None or (noise is None and draws_noise(method, opts))):
        raise ValueError("seed must be an int unless x_T is given and either noise is given or "
                         f"{method!r} with these options draws no noise")

    device = torch.device(device) if device is not None else (x_T.device if x_T is not None
                                                              else torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if x_T is None:
        x_T = sde.prior_sampling(shape, generator=generator, device=device)
    x_T = x_T.to(device=device, dtype=opts.pop("dtype"))
    counter = ScoreCounter(score_fn)
    if method != "ode":
        opts["generator"], opts["noise"] = generator, noise
    bar = None
    if opts.pop("progress"):
        opts["callback"], bar = _progress(method, steps, opts)
    try:
        # No graph through the network: sampling memory stays flat in the number of steps. Classifier
        # guidance re-enables gradients for its own input gradient.
        with torch.no_grad():
            x = fn(counter, sde, x_T, steps=steps, **_grouped(method, opts))
    finally:
        if bar is not None:
            bar.close()
    return x, counter.nfe


__all__ = [
    "ADAPTIVE_SOLVERS", "FIXED_SOLVERS", "METHODS", "MULTISTEP_METHODS", "SAMPLER_VARIANCES", "ChainOptions",
    "Churn", "MultistepOptions", "NoiseFn", "ScoreCounter", "UniPCOptions",
    "allowed_options", "check_options", "draws_noise", "per_sample_noise", "per_sample_prior", "sample",
    "sample_ancestral", "sample_annealed_langevin", "sample_ddim", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_euler_maruyama", "sample_heun", "sample_ode", "sample_pc", "sample_unipc",
]
