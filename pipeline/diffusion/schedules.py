"""Noise schedules: DDPM's discrete β chains, NCSN's σ ladder, EDM's ρ-spaced σ steps, and time grids.

A discrete DDPM chain with N steps has the VP SDE as its continuous limit (Song et al. 2021, App. B):
the linear chain β_i ∈ [1e-4, 0.02] tends to `VPSDE(beta_min=0.1, beta_max=20)` (β(t) = N β_i) and the
cosine chain of Nichol & Dhariwal 2021 to `CosineVPSDE`; `DDPMSchedule.vp_sde()` returns that limit,
observed at t_i = (i+1)/N (`continuous_time`). It is not the chain: at N = 1000 the linear chain's
log ᾱ differs from VPSDE(0.1, 20)'s by up to 6.8%. The chain itself, exact at its timesteps and with
integer labels, is `chain.DDPMChain` (`DDPMChain.from_schedule(schedule)`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .sde import SDE, VPSDE, CosineVPSDE, expand_like

# The fixed reverse-step variances σ_t² of a DDPM chain (Ho et al. 2020, Sec. 3.2): β_t ("beta"), the
# posterior's β̃_t ("beta_tilde"), or the DDPM code's table [β̃_2, β_2, …, β_N] ("fixedlarge", kept to
# reproduce its bits/dim; `elbo.ddpm_elbo`).
VARIANCES: tuple[str, ...] = ("beta", "beta_tilde", "fixedlarge")
# What a sampler's step can use on any grid: "fixedlarge" is a per-timestep table of one whole chain.
SAMPLER_VARIANCES: tuple[str, ...] = tuple(v for v in VARIANCES if v != "fixedlarge")


def linear_betas(N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020, Sec. 4: β_1 = 1e-4 … β_T = 0.02, linear, float64."""
    if not (0 < beta_start < beta_end < 1):
        raise ValueError(
            f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    return torch.linspace(beta_start, beta_end, N, dtype=torch.float64)


def cosine_alpha_bar(t: Tensor, s: float = 0.008) -> Tensor:
    """ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s) · π/2), t ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t.double()) / f(torch.zeros((), dtype=torch.float64))


def cosine_betas(N: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """β_i = min(1 - ᾱ(i/N)/ᾱ((i-1)/N), 0.999): clipped to avoid the singularity at t = 1."""
    if not (s > 0):
        raise ValueError(f"s must be > 0, got {s}")
    abar = cosine_alpha_bar(torch.arange(N + 1, dtype=torch.float64) / N, s)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class DDPMSchedule:
    """The discrete forward chain q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I), t = 1..N (index 0..N-1),
    with ᾱ_t = Π α_s and the posterior q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) (Ho et al. 2020, eq. 6–7)."""

    def __init__(self, betas: Tensor, kind: str = "custom", **params: float) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1)")
        self.kind, self.params = kind, params
        self.N = betas.shape[0]
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # Eq. 7: β̃_t = (1 - ᾱ_{t-1})/(1 - ᾱ_t) β_t;  μ̃_t = c1 x_0 + c2 x_t.
        self.posterior_variance = betas * (1 - ab_prev) / (1 - ab)
        # β̃_1 = 0: clip the log like improved-diffusion so it stays finite at t = 1.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(ab_prev) / (1 - ab)
        self.posterior_mean_coef2 = (1 - ab_prev) * torch.sqrt(self.alphas) / (1 - ab)

    @classmethod
    def linear(cls, N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DDPMSchedule:
        # Scale the endpoints with N so that a shorter chain is the same process (improved-diffusion).
        scale = 1000 / N
        return cls(linear_betas(N, beta_start * scale, beta_end * scale), "linear",
                   beta_start=beta_start * scale, beta_end=beta_end * scale)

    @classmethod
    def cosine(cls, N: int = 1000, s: float = 0.008) -> DDPMSchedule:
        return cls(cosine_betas(N, s), "cosine", s=s)

    def _take(self, v: Tensor, i: Tensor, x: Tensor) -> Tensor:
        return expand_like(v.to(x.device)[i].to(x.dtype), x)

    def q_sample(self, x0: Tensor, i: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (eq. 4); i is the 0-based step index [B]."""
        ab = self._take(self.alphas_cumprod, i, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        c1, c2 = self._take(self.posterior_mean_coef1, i, xt), self._take(self.posterior_mean_coef2, i, xt)
        mean = c1 * x0 + c2 * xt
        return (mean, self._take(self.posterior_variance, i, xt),
                self._take(self.posterior_log_variance_clipped, i, xt))

    def predict_x0_from_eps(self, xt: Tensor, i: Tensor, eps: Tensor) -> Tensor:
        ab = self._take(self.alphas_cumprod, i, xt)
        return (xt - (1 - ab).sqrt() * eps) / ab.sqrt()

    def continuous_time(self, i: Tensor) -> Tensor:
        """The VP-SDE time of step index i: t_i = (i + 1)/N."""
        return (i.double() + 1) / self.N

    def discrete_index(self, t: Tensor) -> Tensor:
        """Inverse of `continuous_time`, rounded to the nearest step."""
        return (t.double() * self.N - 1).round().long().clamp(0, self.N - 1)

    def vp_sde(self) -> SDE:
        """The continuous VP process this chain tends to (its limit, not the chain: see chain.DDPMChain)."""
        if self.kind == "linear":
            N = self.N
            return VPSDE(beta_min=self.params["beta_start"] * N, beta_max=self.params["beta_end"] * N, N=N)
        if self.kind == "cosine":
            return CosineVPSDE(s=self.params["s"], N=self.N)
        raise ValueError(f"no continuous VP process is known for a {self.kind!r} schedule")


def ncsn_sigmas(sigma_min: float = 0.01, sigma_max: float = 50.0, L: int = 232) -> Tensor:
    """NCSN's geometric ladder σ_1 = σ_max > … > σ_L = σ_min (Song & Ermon 2019, 2020), float64."""
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if L < 2:
        raise ValueError(f"L must be >= 2 noise levels, got {L}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), L, dtype=torch.float64))


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, i < n, then σ_n = 0
    (Karras et al. 2022, eq. 5). Length n + 1, float64."""
    if n < 1:
        raise ValueError(f"n must be >= 1 steps, got {n}")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not (rho > 0):
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


TimeGrid = Literal["uniform", "karras"]


def time_grid(sde: SDE, n: int, *, eps: float = 1e-3, kind: TimeGrid = "uniform", rho: float = 7.0) -> Tensor:
    """n + 1 decreasing times from T to eps for an n-step sampler, float64.

    "uniform" spaces t linearly (score_sde); "karras" spaces σ̃(t) = σ/α with EDM's ρ rule between
    σ̃(T) and σ̃(eps) and maps back to t with `sde.edm_sigma_inv`.
    """
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    if not (0 < eps < sde.T):
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    if kind == "uniform":
        return torch.linspace(sde.T, eps, n + 1, dtype=torch.float64)
    if kind == "karras":
        ends = sde.edm_sigma(torch.tensor([eps, sde.T], dtype=torch.float64))
        t = sde.edm_sigma_inv(karras_sigmas(n + 1, float(ends[0]), float(ends[1]), rho)[:-1])
        t[0], t[-1] = sde.T, eps  # exact endpoints despite round-off of the inverse
        return t
    raise ValueError(f"time grid kind must be 'uniform' or 'karras', got {kind!r}")
