"""An exact discrete DDPM chain behind the `SDE` interface (Ho et al. 2020, eq. 2–4).

The chain q(x_i | x_{i-1}) = N(√(1-β_i) x_{i-1}, β_i I), i = 0..N-1 (0-based, as diffusers and the
networks trained on it label them), has ᾱ_i = Π_{j≤i} (1-β_j) from any β table. It is a process of its
own here, not a VP SDE observed on a grid: `VPSDE(0.1, 20)` differs from the linear chain's ᾱ by up to
6.8% in log space.

Continuous-time convention (stated once, used everywhere):
    step i sits at t_i = (i + 1)/N, and t = 0 is the data (ᾱ = 1);
    log ᾱ(t) is linear in t between the grid points t_k = k/N, k = 0..N.
So `marginal_coeffs(t_i)` returns √ᾱ_i, √(1-ᾱ_i) of the table (ᾱ(t_i) is the table's ᾱ_i bit for
bit; α, σ are its square roots), and in between the process is the VP SDE dx = -½ β(t) x dt + √β(t) dw
with the piecewise-constant rate
β(t) = -N log(1-β_i) on (i/N, (i+1)/N] (Song et al. 2021, eq. 11 with that β). The probability-flow ODE
and the continuous ELBO of this SDE are therefore densities / bounds of the *interpolated* process:
they agree with the chain at its N timesteps, and the discrete VLB (`elbo.ddpm_elbo`) is the chain's own.

A network trained on the chain is conditioned on the integer timestep i: `time_label(t) = N t - 1`,
exactly i at t_i (float32 round-off of t is snapped away), continuous in between.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .schedules import DDPMSchedule, cosine_betas
from .sde import SDE, SDES, _check_t, _std_normal_logp, expand_like

CHAIN_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "custom")


def chain_betas(schedule: str, N: int, *, beta_start: float = 1e-4, beta_end: float = 0.02,
                s: float = 0.008, max_beta: float = 0.999,
                betas: Sequence[float] | Tensor | None = None) -> Tensor:
    """The β table of a named schedule, float64: "linear" (Ho et al. 2020, Sec. 4), "scaled_linear"
    (linear in √β, latent diffusion), "cosine" (Nichol & Dhariwal 2021, eq. 17, clipped at max_beta)
    or "custom" (`betas` as given)."""
    if schedule not in CHAIN_SCHEDULES:
        raise ValueError(f"schedule must be one of {CHAIN_SCHEDULES}, got {schedule!r}")
    if schedule == "custom":
        if betas is None:
            raise ValueError("schedule='custom' needs betas (a 1-D table of β_i in (0, 1))")
        table = torch.as_tensor(betas, dtype=torch.float64)
    else:
        if betas is not None:
            raise ValueError(f"betas is only allowed with schedule='custom', got schedule={schedule!r}")
        if isinstance(N, bool) or not isinstance(N, int) or N < 2:
            raise ValueError(f"N must be an int >= 2 timesteps, got {N!r}")
        if schedule in ("linear", "scaled_linear"):
            if not (0 < beta_start < beta_end < 1):
                raise ValueError("beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1 "
                                 f"(β increasing), got beta_start={beta_start}, beta_end={beta_end}")
            if schedule == "linear":
                table = torch.linspace(beta_start, beta_end, N, dtype=torch.float64)
            else:
                table = torch.linspace(beta_start**0.5, beta_end**0.5, N, dtype=torch.float64) ** 2
        else:
            if not (0 < max_beta < 1):
                raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")
            table = cosine_betas(N, s, max_beta)
    if table.ndim != 1 or table.numel() < 2:
        raise ValueError(f"betas must be a 1-D table of at least 2 values, got shape {tuple(table.shape)}")
    bad = ~((table > 0) & (table < 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"betas must lie in (0, 1) at every timestep, got β_{i} = {float(table[i])!r}")
    return table


class DDPMChain(SDE):
    """The exact N-step DDPM chain of a β table as a process (see the module docstring for the
    continuous-time convention). Build by name with `build_sde("ddpm-chain", schedule=..., ...)`."""

    name = "ddpm-chain"

    def __init__(self, schedule: str = "linear", N: int = 1000, *, beta_start: float = 1e-4,
                 beta_end: float = 0.02, s: float = 0.008, max_beta: float = 0.999,
                 betas: Sequence[float] | Tensor | None = None) -> None:
        table = chain_betas(schedule, N, beta_start=beta_start, beta_end=beta_end, s=s, max_beta=max_beta,
                            betas=betas)
        # N defaults to 1000; a custom table decides it, and a config may restate it.
        if schedule == "custom" and table.numel() != N and N != 1000:
            raise ValueError(f"N must equal len(betas) = {table.numel()} for a custom table, got {N}")
        super().__init__(table.numel())
        self.schedule, self.params = schedule, dict(beta_start=float(beta_start), beta_end=float(beta_end),
                                                    s=float(s), max_beta=float(max_beta))
        self.betas = self.discrete_betas = table
        self.alphas = 1.0 - table
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)  # ᾱ_i, i = 0..N-1
        # Grid k = 0..N: ᾱ at t_k = k/N (k = 0 is the data) and its log, for the interpolation.
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        log_abar = torch.cumsum(torch.log1p(-table), 0)
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar])

    def config(self) -> dict:
        cfg: dict = {"name": self.name, "schedule": self.schedule, "N": self.N}
        if self.schedule == "custom":
            cfg["betas"] = self.betas.tolist()
        elif self.schedule == "cosine":
            cfg.update(s=self.params["s"], max_beta=self.params["max_beta"])
        else:
            cfg.update(beta_start=self.params["beta_start"], beta_end=self.params["beta_end"])
        return cfg

    # ---- the grid ----------------------------------------------------------------------------

    def timestep_time(self, i: Tensor | int) -> Tensor:
        """t_i = (i + 1)/N of 0-based timestep i, float64."""
        return (torch.as_tensor(i, dtype=torch.float64) + 1) / self.N

    def _grid_position(self, t: Tensor) -> Tensor:
        """u = N t in float64, snapped to the integer grid within the round-off of t's own dtype."""
        u = t.double() * self.N
        tol = 1e-9 if t.dtype == torch.float64 else 8 * self.N * torch.finfo(t.dtype).eps
        r = u.round()
        return torch.where((u - r).abs() <= tol, r, u).clamp(0, self.N)

    def time_label(self, t: Tensor) -> Tensor:
        """The network's timestep label N t - 1: the integer i at t_i (dtype of t)."""
        return (self._grid_position(t) - 1).to(t.dtype)

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        u = self._grid_position(t)
        k = u.floor().long().clamp(0, self.N - 1)
        return u, k, u - k, self._log_abar.to(t.device)

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        """log ᾱ(t), linear between grid points, float64."""
        _, k, w, L = self._interp(t)
        return (1 - w) * L[k] + w * L[k + 1]

    # ---- the process -------------------------------------------------------------------------

    def beta(self, t: Tensor) -> Tensor:
        """β(t) = -d log ᾱ/dt = -N log(1-β_i) on (i/N, (i+1)/N] (right-continuous at the data end)."""
        u = self._grid_position(t)
        i = (u.ceil().long() - 1).clamp(0, self.N - 1)
        L = self._log_abar.to(t.device)
        return (self.N * (L[i] - L[i + 1])).to(t.dtype)

    def sde(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        _check_t(t, x)
        beta_t = self.beta(t)
        return -0.5 * expand_like(beta_t, x) * x, torch.sqrt(beta_t)

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        _, k, w, L = self._interp(t)
        abar = self._abar.to(t.device)
        # ᾱ_k^(1-w) ᾱ_{k+1}^w is exactly the table's ᾱ at w = 0 and w = 1 (x^1 = x, x^0 = 1 in IEEE).
        ab = abar[k] ** (1 - w) * abar[k + 1] ** w
        log_ab = (1 - w) * L[k] + w * L[k + 1]
        return torch.sqrt(ab).to(t.dtype), torch.sqrt(-torch.expm1(log_ab)).to(t.dtype)

    def edm_sigma_inv(self, sigma: Tensor) -> Tensor:
        # σ̃² = 1/ᾱ - 1 ⇒ log ᾱ = -log(1 + σ̃²); invert the piecewise-linear log ᾱ(t).
        target = -torch.log1p(sigma.double() ** 2)
        L = self._log_abar.to(sigma.device)
        k = torch.searchsorted(-L, -target, right=True).sub(1).clamp(0, self.N - 1)
        w = ((L[k] - target) / (L[k] - L[k + 1])).clamp(0, 1)
        return ((k + w) / self.N).to(sigma.dtype)

    def prior_sampling(self, shape, generator=None, device=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z: Tensor) -> Tensor:
        return _std_normal_logp(z)

    def discretize(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The chain's own step x_i = √(1-β_i) x_{i-1} + √β_i z (Ho et al. 2020, eq. 2)."""
        _check_t(t, x)
        i = self._time_index(t)
        beta = self.betas.to(x.device)[i].to(x.dtype)
        return expand_like(torch.sqrt(1 - beta), x) * x - x, torch.sqrt(beta)

    def _time_index(self, t: Tensor) -> Tensor:
        return (self._grid_position(t) - 1).round().long().clamp(0, self.N - 1)

    @classmethod
    def from_schedule(cls, schedule: DDPMSchedule) -> DDPMChain:
        """A `DDPMSchedule`'s chain as a process of its own, ᾱ exact at every timestep."""
        return cls("custom", betas=schedule.betas)

    def ddpm_schedule(self) -> DDPMSchedule:
        """The same chain as a `DDPMSchedule` (posterior coefficients for the discrete VLB)."""
        return DDPMSchedule(self.betas, kind=self.schedule)


def chain_max_log_gap(chain: DDPMChain, other: SDE) -> float:
    """max_i |log ᾱ_i(chain) - log ᾱ(t_i)(other)|: how far a continuous process is from the chain."""
    t = chain.timestep_time(torch.arange(chain.N))
    alpha, _ = other.marginal_coeffs(t)
    return float((2 * torch.log(alpha) - torch.log(chain.alphas_cumprod)).abs().max())


SDES.setdefault("ddpm-chain", DDPMChain)  # so `build_sde("ddpm-chain", ...)` rebuilds it by name

__all__ = ["CHAIN_SCHEDULES", "DDPMChain", "chain_betas", "chain_max_log_gap"]
