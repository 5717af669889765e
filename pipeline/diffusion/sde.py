"""Forward SDEs of Song et al. 2021 ("Score-Based Generative Modeling through SDEs").

Every process here is linear in x, so its perturbation kernel is Gaussian,
    p_0t(x_t | x_0) = N(x_t; α(t) x_0, σ(t)² I),
and `marginal_coeffs(t) -> (α(t), σ(t))` is the one place each process states it. Everything else
(`marginal_prob`, the EDM noise level σ̃ = σ/α used by preconditioning and the Heun sampler, the
reverse process) is derived from it or from `sde(x, t)`.

Time `t` is always a 1-D tensor of shape [B] (one time per sample) in [eps, T].
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] so it broadcasts against x [B, ...]."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def _check_t(t: Tensor, x: Tensor | None = None) -> None:
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D tensor of per-sample times, got shape {tuple(t.shape)}")
    if x is not None and t.shape[0] != x.shape[0]:
        raise ValueError(f"t has {t.shape[0]} times but x has batch size {x.shape[0]}")


class SDE(abc.ABC):
    """dx = f(x, t) dt + g(t) dw on t ∈ [0, T], with N steps for discretised samplers."""

    name: str = "sde"

    def __init__(self, N: int = 1000) -> None:
        if int(N) < 1:
            raise ValueError(f"N must be a positive number of discretisation steps, got {N}")
        self.N = int(N)

    @property
    def T(self) -> float:
        return 1.0

    @abc.abstractmethod
    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (shape [B])."""

    @abc.abstractmethod
    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α(t), σ(t) of the perturbation kernel N(α(t) x_0, σ(t)² I), each of shape [B]."""

    @abc.abstractmethod
    def prior_sampling(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
        """A sample of p_T, the prior the reverse process starts from."""

    @abc.abstractmethod
    def prior_logp(self, z: Tensor) -> Tensor:
        """log p_T(z) per sample, in nats, shape [B]."""

    @abc.abstractmethod
    def edm_sigma_inv(self, sigma: Tensor) -> Tensor:
        """The time t at which σ(t)/α(t) equals `sigma` (inverse of `edm_sigma`)."""

    def config(self) -> dict:
        """Constructor arguments, so checkpoints and reports can rebuild the process."""
        return {"name": self.name, "N": self.N}

    # ---- derived quantities -------------------------------------------------------------------

    def marginal_prob(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean α(t) x_0 (shape of x) and std σ(t) (shape [B]) of p_0t(x_t | x_0)."""
        _check_t(t, x)
        alpha, sigma = self.marginal_coeffs(t)
        return expand_like(alpha, x) * x, sigma

    def edm_sigma(self, t: Tensor) -> Tensor:
        """EDM's noise level σ̃(t) = σ(t)/α(t): x_t/α(t) = x_0 + σ̃(t) ε (Karras et al. 2022, eq. 4)."""
        alpha, sigma = self.marginal_coeffs(t)
        return sigma / alpha

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One step of x_{i+1} = x_i + f_i(x_i) + G_i z_i. Default: Euler–Maruyama with dt = T/N."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (Anderson 1982; Song et al. 2021, eq. 6) or, with
        probability_flow=True, the probability-flow ODE (eq. 13)."""
        return ReverseSDE(self, score_fn, probability_flow)

    def _time_index(self, t: Tensor) -> Tensor:
        # score_sde's map from continuous t to the discrete step used by `discretize`.
        return (t * (self.N - 1) / self.T).round().long().clamp(0, self.N - 1)


class ReverseSDE:
    """dx = [f(x,t) - c·g(t)² ∇ log p_t(x)] dt + [c < 1 ? 0 : g(t)] dw̄ with c = 1/2 for the ODE."""

    def __init__(self, fwd: SDE, score_fn: ScoreFn, probability_flow: bool) -> None:
        self.fwd, self.score_fn, self.probability_flow = fwd, score_fn, probability_flow
        self.N, self.T = fwd.N, fwd.T

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        drift, diffusion = self.fwd.sde(x, t)
        c = 0.5 if self.probability_flow else 1.0
        g2 = expand_like(diffusion**2, x)
        drift = drift - c * g2 * self.score_fn(x, t)
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Reverse-diffusion discretisation (Song et al. 2021, eq. 46)."""
        f, G = self.fwd.discretize(x, t)
        c = 0.5 if self.probability_flow else 1.0
        rev_f = f - c * expand_like(G**2, x) * self.score_fn(x, t)
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


def _std_normal_logp(z: Tensor, std: float = 1.0) -> Tensor:
    d = z[0].numel()
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * d * math.log(2 * math.pi * std**2) - flat.pow(2).sum(1) / (2 * std**2)


class _VPFamily(SDE):
    """Shared pieces of VP and sub-VP: β(t) linear in t, B(t) = ∫_0^t β(s) ds, ᾱ(t) = exp(-B(t))."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        super().__init__(N)
        if not (beta_min > 0):
            raise ValueError(f"beta_min must be > 0, got {beta_min}")
        if not (beta_max > beta_min):
            raise ValueError(f"beta_max must be > beta_min, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_0, self.beta_1 = float(beta_min), float(beta_max)
        # The DDPM chain this process is the limit of (Song et al. 2021, App. B): β_i = β(t_i)/N.
        self.discrete_betas = torch.linspace(self.beta_0 / N, self.beta_1 / N, N, dtype=torch.float64)
        self.alphas = 1.0 - self.discrete_betas

    def config(self) -> dict:
        return {**super().config(), "beta_min": self.beta_0, "beta_max": self.beta_1}

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """B(t) = β_0 t + ½ (β_1 - β_0) t²."""
        return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t**2

    def _t_from_integrated_beta(self, B: Tensor) -> Tensor:
        # Positive root of ½(β_1-β_0) t² + β_0 t - B = 0, written to avoid cancellation for small B.
        a = 0.5 * (self.beta_1 - self.beta_0)
        return 2 * B / (self.beta_0 + torch.sqrt(self.beta_0**2 + 4 * a * B))

    def prior_sampling(self, shape, generator=None, device=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z: Tensor) -> Tensor:
        return _std_normal_logp(z)


class VPSDE(_VPFamily):
    """Variance preserving: dx = -½ β(t) x dt + √β(t) dw (Song et al. 2021, eq. 11; DDPM's limit)."""

    name = "vp"

    def sde(self, x, t):
        _check_t(t, x)
        beta_t = self.beta(t)
        return -0.5 * expand_like(beta_t, x) * x, torch.sqrt(beta_t)

    def marginal_coeffs(self, t):
        B = self.integrated_beta(t)
        return torch.exp(-0.5 * B), torch.sqrt(-torch.expm1(-B))

    def edm_sigma_inv(self, sigma):
        # σ̃² = 1/ᾱ - 1  ⇒  B = log(1 + σ̃²).
        return self._t_from_integrated_beta(torch.log1p(sigma**2))

    def discretize(self, x, t):
        """DDPM's own step x_i = √(1-β_i) x_{i-1} + √β_i z (Ho et al. 2020, eq. 2)."""
        _check_t(t, x)
        i = self._time_index(t)
        beta = self.discrete_betas.to(x.device)[i].to(x.dtype)
        alpha = self.alphas.to(x.device)[i].to(x.dtype)
        f = expand_like(torch.sqrt(alpha), x) * x - x
        return f, torch.sqrt(beta)


class SubVPSDE(_VPFamily):
    """sub-VP: dx = -½ β(t) x dt + √(β(t)(1 - e^{-2B(t)})) dw (Song et al. 2021, eq. 12).
    Its variance (1 - ᾱ)² is bounded by the VP one, which gives better likelihoods."""

    name = "subvp"

    def sde(self, x, t):
        _check_t(t, x)
        beta_t = self.beta(t)
        discount = -torch.expm1(-2 * self.integrated_beta(t))
        return -0.5 * expand_like(beta_t, x) * x, torch.sqrt(beta_t * discount)

    def marginal_coeffs(self, t):
        B = self.integrated_beta(t)
        return torch.exp(-0.5 * B), -torch.expm1(-B)

    def edm_sigma_inv(self, sigma):
        # σ̃ = (1 - a²)/a with a = √ᾱ  ⇒  a = (√(σ̃² + 4) - σ̃)/2 = 2/(√(σ̃² + 4) + σ̃).
        a = 2.0 / (torch.sqrt(sigma**2 + 4) + sigma)
        return self._t_from_integrated_beta(-2 * torch.log(a))


class VESDE(SDE):
    """Variance exploding: dx = σ(t) √(2 log(σ_max/σ_min)) dw, σ(t) = σ_min (σ_max/σ_min)^t
    (Song et al. 2021, eq. 9; the continuous limit of NCSN's noise ladder)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000) -> None:
        super().__init__(N)
        if not (sigma_min > 0):
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        if not (sigma_max > sigma_min):
            raise ValueError(
                f"sigma_max must be > sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), N,
                                                        dtype=torch.float64))

    def config(self) -> dict:
        return {**super().config(), "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        _check_t(t, x)
        return torch.zeros_like(x), self.sigma(t) * math.sqrt(2 * self._log_ratio)

    def marginal_coeffs(self, t):
        # score_sde (and NCSN) use std σ(t), not √(σ(t)² - σ_min²): the data is taken as already
        # blurred by σ_min. We follow that convention so checkpoints and numbers compare.
        return torch.ones_like(t), self.sigma(t)

    def edm_sigma_inv(self, sigma):
        return torch.log(sigma / self.sigma_min) / self._log_ratio

    def prior_sampling(self, shape, generator=None, device=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device) * self.sigma_max

    def prior_logp(self, z: Tensor) -> Tensor:
        return _std_normal_logp(z, self.sigma_max)

    def discretize(self, x, t):
        """SMLD's step x_i = x_{i-1} + √(σ_i² - σ_{i-1}²) z (Song et al. 2021, eq. 8)."""
        _check_t(t, x)
        i = self._time_index(t)
        sigmas = self.discrete_sigmas.to(x.device)
        sigma = sigmas[i]
        adjacent = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigma**2 - adjacent**2).to(x.dtype)


class CosineVPSDE(VPSDE):
    """VP process with Nichol & Dhariwal's (2021) cosine schedule, ᾱ(t) = f(t)/f(0),
    f(t) = cos²(φ(t)), φ(t) = (t + s)/(1 + s) · π/2, so β(t) = dB/dt = π/(1+s) · tan φ(t).

    β(t) → ∞ as t → 1, so the process stops at T = t_max < 1 (ᾱ(0.999) ≈ 2e-6, a prior mismatch far
    below any reported digit). Its discretisation is the cosine DDPM chain, β_i clipped at 0.999.
    """

    name = "cosine-vp"

    def __init__(self, s: float = 0.008, t_max: float = 0.999, N: int = 1000) -> None:
        if not (s > 0):
            raise ValueError(f"s must be > 0, got {s}")
        if not (0 < t_max < 1):
            raise ValueError(f"t_max must lie in (0, 1), got {t_max}")
        self.s, self.t_max = float(s), float(t_max)
        SDE.__init__(self, N)
        t = torch.arange(N + 1, dtype=torch.float64) / N
        abar = torch.exp(-self.integrated_beta(t))
        self.discrete_betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        self.alphas = 1.0 - self.discrete_betas

    @property
    def T(self) -> float:
        return self.t_max

    def config(self) -> dict:
        return {"name": self.name, "N": self.N, "s": self.s, "t_max": self.t_max}

    def _phi(self, t: Tensor | float) -> Tensor:
        return (torch.as_tensor(t, dtype=torch.float64) + self.s) / (1 + self.s) * (math.pi / 2)

    def beta(self, t):
        return (math.pi / (1 + self.s)) * torch.tan(self._phi(t)).to(torch.as_tensor(t).dtype)

    def integrated_beta(self, t):
        dtype = t.dtype
        return (2 * (math.log(math.cos(self._phi(0.0))) - torch.log(torch.cos(self._phi(t))))).to(dtype)

    def _t_from_integrated_beta(self, B):
        cos_phi = math.cos(self._phi(0.0)) * torch.exp(-0.5 * B.double())
        return (torch.arccos(cos_phi) * 2 * (1 + self.s) / math.pi - self.s).to(B.dtype)


SDES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine-vp": CosineVPSDE}


def build_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by name: 'vp', 'subvp', 've', 'cosine-vp', or 'ddpm-chain' (the exact discrete chain
    of `chain.DDPMChain`, e.g. build_sde("ddpm-chain", schedule="linear", N=1000))."""
    if name not in SDES:
        raise ValueError(f"sde name must be one of {sorted(SDES)}, got {name!r}")
    return SDES[name](**kwargs)



