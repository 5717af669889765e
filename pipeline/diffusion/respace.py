"""Respaced sampling on an exact discrete chain: the timestep spacings of the field, and DDPM / DDIM steps.

A network trained on an N-step chain (`chain.DDPMChain`) is sampled on n ≤ N of its integer timesteps
τ_1 > … > τ_n (Nichol & Dhariwal 2021, Sec. 4; Song, Meng & Ermon 2021, Sec. 4.2). The three rules in
use (as diffusers' schedulers name them; Lin et al. 2024, Table 2 compares them):
    "leading"  τ = k·⌊N/n⌋ + steps_offset,             k = n-1 … 0
    "trailing" τ = round(N - k·N/n) - 1,                k = 0 … n-1   (always starts at N-1)
    "linspace" τ = round(linspace(0, N-1, n)), reversed
Every step works on the table's ᾱ directly, so nothing is interpolated: with ᾱ_{-1} = 1 (the data),
    x̂_0 = (x_τ - √(1-ᾱ_τ) ε̂) / √ᾱ_τ                                        (Ho et al. 2020, eq. 15)
    ancestral, τ → τ' (the next timestep, -1 after the last):
        x_τ' = √ᾱ_τ' β'/(1-ᾱ_τ) x̂_0 + √α' (1-ᾱ_τ')/(1-ᾱ_τ) x_τ + σ z,  α' = ᾱ_τ/ᾱ_τ', β' = 1-α'   (eq. 7)
        σ² = β' ("beta", diffusers' fixed_large) or β̃ = (1-ᾱ_τ')/(1-ᾱ_τ) β' ("beta_tilde", fixed_small);
        no noise is added when τ = 0 (the chain's last step lands on the data).
    DDIM, τ → τ - ⌊N/n⌋ (diffusers' DDIMScheduler steps by ⌊N/n⌋ for every spacing; below 0 the
        previous ᾱ is 1 with `set_alpha_to_one`, else ᾱ_0):
        x_τ' = √ᾱ_τ' x̂_0 + √(1-ᾱ_τ' - σ_η²) ε̂ + σ_η z,  σ_η = η √β̃   (Song, Meng & Ermon 2021, eq. 12, 16)
ε̂ = -σ_τ score(x_τ, t_τ) at the chain's time t_τ = (τ+1)/N, where a chain-trained network sees label τ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .chain import DDPMChain
from .sde import ScoreFn

SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
NoiseSource = Callable[[Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ChainOptions:
    """How a sampler walks an exact chain's integer timesteps (module doc), as diffusers' schedulers
    name the options: which n of the N timesteps (`spacing`, None meaning "leading", and
    `steps_offset`), x̂_0 clipped to ±`clip_sample` (None: no clipping), and DDIM's ᾱ below timestep 0
    (1 with `set_alpha_to_one`, else ᾱ_0; ancestral steps land on the data and do not use it)."""

    spacing: str | None = None
    steps_offset: int = 0
    clip_sample: float | None = None
    set_alpha_to_one: bool = True

    @property
    def spacing_rule(self) -> str:
        """The spacing in force: "leading" when none is given."""
        return "leading" if self.spacing is None else self.spacing


def chain_timesteps(N: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> list[int]:
    """The n = `steps` decreasing integer timesteps of an N-step chain under `spacing` (see module doc)."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= N:
        raise ValueError(f"steps must be an int in [1, N={N}] on an {N}-step chain, got {steps!r}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}")
    if spacing == "leading":
        ratio = N // steps
        ts = [k * ratio + steps_offset for k in range(steps - 1, -1, -1)]
    elif spacing == "trailing":
        # numpy's float ramps and half-to-even rounding, so the integers agree with diffusers exactly.
        ts = [int(v) - 1 for v in np.round(np.arange(N, 0, -N / steps))]
    else:
        ts = [int(v) for v in np.linspace(0, N - 1, steps).round()[::-1]]
    if ts[0] > N - 1:
        raise ValueError(f"steps_offset={steps_offset} puts the first timestep at {ts[0]} > N-1 = {N - 1}")
    return ts


def check_chain_options(chain: DDPMChain, steps: int, options: ChainOptions) -> None:
    """ValueError for bad respacing options, before any score is evaluated."""
    chain_timesteps(chain.N, steps, options.spacing_rule, options.steps_offset)
    clip = options.clip_sample
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"clip_sample must be None or a positive range (x̂_0 clipped to ±range), "
                         f"got {clip!r}")
    if not isinstance(options.set_alpha_to_one, bool):
        raise ValueError(f"set_alpha_to_one must be a bool, got {options.set_alpha_to_one!r}")


def draw_noise(x: Tensor, generator: torch.Generator | None, noise: NoiseSource | None = None) -> Tensor:
    """One standard normal draw shaped like x: from `noise` (randn_like) when given, else `generator`."""
    if noise is not None:
        z = noise(x)
        if z.shape != x.shape:
            raise ValueError(f"noise(x) must return a tensor of shape {tuple(x.shape)}, got {tuple(z.shape)}")
        return z.to(device=x.device, dtype=x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _eps_and_x0(score_fn: ScoreFn, chain: DDPMChain, x: Tensor, tau: int,
                clip_sample: float | None) -> tuple[Tensor, Tensor, float]:
    """ε̂ and x̂_0 at timestep τ (one NFE); also ᾱ_τ."""
    ab = float(chain.alphas_cumprod[tau])
    t64 = chain.timestep_time(torch.tensor([tau]))
    sigma = float(chain.marginal_coeffs(t64)[1])
    score = score_fn(x, torch.full((x.shape[0],), float(t64), dtype=x.dtype, device=x.device))
    eps_hat = -sigma * score
    x0 = (x - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    return eps_hat, x0, ab


def sample_chain_ancestral(score_fn: ScoreFn, chain: DDPMChain, x_T: Tensor, *, steps: int,
                           generator: torch.Generator | None = None, noise: NoiseSource | None = None,
                           variance: str = "beta_tilde", options: ChainOptions = ChainOptions(),
                           callback: Callback | None = None) -> Tensor:
    """Ancestral sampling on the chain's respaced timesteps (Ho et al. 2020, Alg. 2; module doc)."""
    ts = chain_timesteps(chain.N, steps, options.spacing_rule, options.steps_offset)
    x = x_T
    for k, tau in enumerate(ts):
        prev = ts[k + 1] if k + 1 < len(ts) else -1
        _, x0, ab = _eps_and_x0(score_fn, chain, x, tau, options.clip_sample)
        ab_prev = float(chain.alphas_cumprod[prev]) if prev >= 0 else 1.0
        a_step = ab / ab_prev
        b_step = 1 - a_step
        c_x0, c_x = math.sqrt(ab_prev) * b_step / (1 - ab), math.sqrt(a_step) * (1 - ab_prev) / (1 - ab)
        x_new = c_x0 * x0 + c_x * x
        if tau > 0:
            # β̃ is floored at 1e-20 as diffusers does, so the final step from τ = steps_offset has σ ≈ 0.
            var = b_step if variance == "beta" else max((1 - ab_prev) / (1 - ab) * b_step, 1e-20)
            x_new = x_new + math.sqrt(var) * draw_noise(x, generator, noise)
        x = x_new
        if callback is not None:
            callback({"i": k, "t": float(chain.timestep_time(tau)), "x": x, "denoised": x0})
    return x


def sample_chain_ddim(score_fn: ScoreFn, chain: DDPMChain, x_T: Tensor, *, steps: int,
                      generator: torch.Generator | None = None, noise: NoiseSource | None = None,
                      eta: float = 0.0, options: ChainOptions = ChainOptions(),
                      callback: Callback | None = None) -> Tensor:
    """DDIM on the chain's respaced timesteps (Song, Meng & Ermon 2021, eq. 12; module doc)."""
    ts = chain_timesteps(chain.N, steps, options.spacing_rule, options.steps_offset)
    stride = chain.N // steps
    final = 1.0 if options.set_alpha_to_one else float(chain.alphas_cumprod[0])
    x = x_T
    for k, tau in enumerate(ts):
        prev = tau - stride
        eps_hat, x0, ab = _eps_and_x0(score_fn, chain, x, tau, options.clip_sample)
        ab_prev = float(chain.alphas_cumprod[prev]) if prev >= 0 else final
        var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        sigma_eta = eta * math.sqrt(max(var, 0.0))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma_eta**2, 0.0)) * eps_hat
        if eta > 0:
            x = x + sigma_eta * draw_noise(x, generator, noise)
        if callback is not None:
            callback({"i": k, "t": float(chain.timestep_time(tau)), "x": x, "denoised": x0})
    return x


__all__ = [
    "SPACINGS", "ChainOptions", "chain_timesteps", "check_chain_options", "draw_noise",
    "sample_chain_ancestral", "sample_chain_ddim",
]
