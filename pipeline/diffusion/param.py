"""Network parameterisations and the one helper that turns a network into `score_fn(x, t)`.

With x_t = α x_0 + σ ε (α, σ from `SDE.marginal_coeffs`) the four common network outputs are
interchangeable:
    ε-prediction  (Ho et al. 2020)            score = -ε̂ / σ
    x₀-prediction                             score = (α x̂₀ - x_t) / σ²
    v-prediction  (Salimans & Ho 2022)        v = α ε - σ x_0,  x̂₀ = (α x_t - σ v̂)/(α²+σ²) ...
    score         (Song & Ermon 2019)         the output itself
v is defined for α² + σ² = 1 in the paper; we use the general form v = α ε - σ x₀, which gives
x₀ = (α x_t - σ v)/(α² + σ²) and ε = (σ x_t + α v)/(α² + σ²).

"edm" is Karras et al. 2022's preconditioned denoiser D(x̃; σ̃) on x̃ = x_t/α with σ̃ = σ/α
(Table 1, eq. 7): D = c_skip x̃ + c_out F(c_in x̃, c_noise), valid for every SDE here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from .sde import SDE, ScoreFn, expand_like

Parameterization = Literal["eps", "x0", "v", "score", "edm"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)  # the one list of names: the type's
NoiseLabel = Literal["time", "log_sigma"]
NOISE_LABELS: tuple[str, ...] = get_args(NoiseLabel)

# A network: net(x, noise_label [B], class_labels [B] long or None) -> tensor shaped like x.
Net = Callable[..., Tensor]


def check_parameterization(name: str) -> None:
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {name!r}")


def noise_label(sde: SDE, t: Tensor, kind: NoiseLabel = "log_sigma") -> Tensor:
    """What the network is conditioned on: 999·t (DDPM/score_sde VP convention; a discrete chain's own
    integer timestep i via `sde.time_label`) or ¼ ln σ̃ (EDM)."""
    if kind == "time":
        time_label = getattr(sde, "time_label", None)
        return time_label(t) if time_label is not None else t * 999.0
    if kind == "log_sigma":
        return 0.25 * torch.log(sde.edm_sigma(t))
    raise ValueError(f"noise_label must be one of {NOISE_LABELS}, got {kind!r}")


def edm_coeffs(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """c_skip, c_out, c_in, c_noise of Karras et al. 2022, Table 1 (per sample, [B])."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + d2)
    c_in = 1 / torch.sqrt(s2 + d2)
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


def edm_denoise(net: Net, x_tilde: Tensor, sigma: Tensor, sigma_data: float,
                class_labels: Tensor | None = None) -> Tensor:
    """D(x̃; σ̃) = c_skip x̃ + c_out F(c_in x̃, c_noise) (Karras et al. 2022, eq. 7)."""
    c_skip, c_out, c_in, c_noise = edm_coeffs(sigma, sigma_data)
    F = net(expand_like(c_in, x_tilde) * x_tilde, c_noise, class_labels)
    return expand_like(c_skip, x_tilde) * x_tilde + expand_like(c_out, x_tilde) * F.to(x_tilde.dtype)


def output_to_score(out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, parameterization: str) -> Tensor:
    """Convert a network's raw output (non-EDM parameterisations) into ∇ log p_t(x_t)."""
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    if parameterization == "score":
        return out
    if parameterization == "eps":
        return -out / s
    if parameterization == "x0":
        return (a * out - x_t) / s**2
    if parameterization == "v":
        eps = (s * x_t + a * out) / (a**2 + s**2)
        return -eps / s
    check_parameterization(parameterization)
    raise ValueError("the 'edm' parameterisation is converted by edm_denoise, not output_to_score")


def make_score_fn(net: Net, sde: SDE, parameterization: Parameterization = "eps", *,
                  class_labels: Tensor | None = None, noise_label_kind: NoiseLabel = "log_sigma",
                  sigma_data: float = 0.5) -> ScoreFn:
    """Wrap a network into `score_fn(x, t) -> ∇ log p_t(x)` for samplers and likelihoods.

    `class_labels` ([B] long, or None for an unconditional or null-label call) is fixed for the
    lifetime of the returned function; guidance builds one score_fn per label set.
    """
    check_parameterization(parameterization)
    if noise_label_kind not in NOISE_LABELS:
        raise ValueError(f"noise_label_kind must be one of {NOISE_LABELS}, got {noise_label_kind!r}")

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = sde.marginal_coeffs(t)
        labels = class_labels
        if labels is not None and labels.shape[0] != x.shape[0]:
            if labels.shape[0] == 1:
                labels = labels.expand(x.shape[0])
            else:
                raise ValueError(f"class_labels has {labels.shape[0]} entries for a batch of {x.shape[0]}")
        if parameterization == "edm":
            a = expand_like(alpha, x)
            D = edm_denoise(net, x / a, sigma / alpha, sigma_data, labels)
            return (a * D - x) / expand_like(sigma, x) ** 2
        out = net(x, noise_label(sde, t, noise_label_kind), labels)
        return output_to_score(out.to(x.dtype), x, alpha, sigma, parameterization)

    return score_fn


def log_normal_sigma(n: int, P_mean: float = -1.2, P_std: float = 1.2,
                     generator: torch.Generator | None = None, device=None) -> Tensor:
    """ln σ ~ N(P_mean, P_std²), EDM's training noise distribution (Karras et al. 2022, Table 1)."""
    return torch.exp(P_mean + P_std * torch.randn(n, generator=generator, device=device))


__all__ = [
    "NOISE_LABELS", "PARAMETERIZATIONS", "check_parameterization", "edm_coeffs", "edm_denoise",
    "log_normal_sigma", "make_score_fn", "noise_label", "output_to_score",
]
