"""Implicit and sliced score matching for noise-conditional networks, trained NCSN-style at a set of
noise levels (Song & Ermon 2019), behind the loss interface of `losses.py`.

At one noise level, x_t = α x_0 + σ ε has density p_t, and for any score model s = s_θ(·, t)
integration by parts gives (Hyvärinen 2005, Thm. 1)
    E_pt ‖s − ∇log p_t‖² = E_pt [‖s‖² + 2 tr ∇_x s] + E_pt ‖∇log p_t‖²,                       (1)
so the Fisher divergence is, up to the θ-free constant C_t = E‖∇log p_t‖², the implicit objective
    ism:    λ(t) [‖s‖² + 2 tr ∇_x s]                              (Hyvärinen 2005, eq. 4, times 2)
Sliced score matching replaces the trace by random projections v with E[vvᵀ] = I (Song, Garg, Shi &
Ermon 2019, eqs. 6 and 8; M projections averaged):
    ssm:    λ(t) [(vᵀs)² + 2 vᵀ∇_x(vᵀs)]
    ssm-vr: λ(t) [‖s‖² + 2 vᵀ∇_x(vᵀs)]              (the variance-reduced form: E(vᵀs)² = ‖s‖² exactly)
vᵀ∇_x(vᵀs) is one vector-Jacobian product per projection, whatever the dimension.

The factor 2 (Hyvärinen writes ½‖s‖² + tr ∇s) puts these losses on DSM's scale: with λ = σ(t)² (NCSN's
λ(σ) = σ², DSMLoss's weighting="sigma2"), E[loss] = E[DSM loss] − λ(E‖∇log p_0t(x_t|x_0)‖² − C_t), so the
two have the same minimiser and the same expected gradient in θ (Vincent 2011). reduce="mean" divides
by the number of data dimensions, as in DSMLoss.

Noise levels: t is drawn uniformly from a fixed set of L times (NCSN's ladder: `n_levels` times evenly
spaced on [eps, T], which for the VE process are geometric σ's), or from `times` given explicitly.
The exact trace (ism) costs one backward pass per dimension and is refused above `ISM_MAX_DIM`.

Random draws happen in a fixed order from `generator`: the level index, the noise ε, the label-dropout
mask, then the projections v.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .likelihood import PROBES, draw_probes
from .losses import (
    DSM_PARAMETERIZATIONS,
    LOSS_BUILDERS,
    REDUCTIONS,
    _check_batch,
    _check_choice,
    _check_dropout,
    _compute_dtype,
    drop_labels,
)
from .param import NOISE_LABELS, Net, noise_label, output_to_score
from .sde import SDE, expand_like

SCORE_MATCHING_LOSSES: tuple[str, ...] = ("ism", "ssm", "ssm-vr")
# The exact Jacobian trace takes one backward pass per data dimension (and a second-order graph through
# each): beyond this it is the slowest part of training by far and SSM is the estimator to use.
ISM_MAX_DIM = 64


def _jacobian_trace(s: Tensor, x: Tensor) -> Tensor:
    """tr ∇_x s per sample [B], with a graph for θ (create_graph): one backward pass per dimension.
    (likelihood.exact_divergence is the no-graph version used inside ODE solves.)"""
    flat = s.reshape(s.shape[0], -1)
    tr = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    for i in range(flat.shape[1]):
        # Samples are independent, so one backward pass of Σ_b s_b,i gives ∂s_b,i/∂x_b,i for all b.
        grad = torch.autograd.grad(flat[:, i].sum(), x, create_graph=True)[0]
        tr = tr + grad.reshape(grad.shape[0], -1)[:, i]
    return tr


def _sliced_terms(s: Tensor, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(vᵀs)² and vᵀ∇_x(vᵀs) per sample, averaged over the M projections v [M, *x.shape]: [B], [B]."""
    sq, quad = [], []
    for m in range(v.shape[0]):
        vs = (v[m] * s).reshape(s.shape[0], -1).sum(1)
        grad = torch.autograd.grad(vs.sum(), x, create_graph=True)[0]  # ∇_x(vᵀs), one VJP
        sq.append(vs**2)
        quad.append((grad * v[m]).reshape(s.shape[0], -1).sum(1))
    return torch.stack(sq).mean(0), torch.stack(quad).mean(0)


class ScoreMatchingLoss:
    """ISM / SSM / SSM-VR at NCSN's noise levels, per sample, λ(t) = σ(t)² (see the module docstring).

    Same call contract as DSMLoss: `loss(net, x0, class_labels=None, generator=None) -> [B]` and
    `forward_with_noise(...) -> (loss [B], σ̃ = σ/α [B])`; `forward_at(net, x0, t, ...)` evaluates the
    objective at given per-sample times (for checks at one level).
    """

    def __init__(self, sde: SDE, kind: str = "ssm", *, parameterization: str = "eps", n_levels: int = 10,
                 times: Sequence[float] | None = None, eps: float = 1e-5, projections: str = "rademacher",
                 n_projections: int = 1, noise_label_kind: str = "log_sigma", reduce: str = "mean",
                 label_dropout: float = 0.0, null_label: int | None = None) -> None:
        _check_choice("loss name", kind, SCORE_MATCHING_LOSSES)
        _check_choice("parameterization", parameterization, DSM_PARAMETERIZATIONS)
        _check_choice("projections", projections, PROBES)
        _check_choice("noise_label_kind", noise_label_kind, NOISE_LABELS)
        _check_choice("reduce", reduce, REDUCTIONS)
        _check_dropout(label_dropout, null_label)
        if not (0.0 < eps < sde.T):
            raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
        if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
            raise ValueError(f"n_projections must be an integer >= 1, got {n_projections!r}")
        if times is None:
            if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 1:
                raise ValueError(f"n_levels must be an integer >= 1, got {n_levels!r}")
            levels = torch.linspace(eps, sde.T, n_levels, dtype=torch.float64)
        else:
            levels = torch.as_tensor(list(times), dtype=torch.float64)
            inside = bool(((levels >= eps) & (levels <= sde.T)).all()) if levels.ndim == 1 else False
            if levels.numel() < 1 or not inside:
                raise ValueError(f"times must be a non-empty list of noise times in [eps={eps}, T={sde.T}], "
                                 f"got {list(times)}")
        self.sde, self.kind, self.parameterization = sde, kind, parameterization
        self.levels, self.eps = levels, float(eps)
        self.projections, self.n_projections = projections, n_projections
        self.noise_label_kind, self.reduce = noise_label_kind, reduce
        self.label_dropout, self.null_label = float(label_dropout), null_label

    def _check_dim(self, x0: Tensor) -> None:
        D = x0[0].numel()
        if self.kind == "ism" and D > ISM_MAX_DIM:
            raise ValueError(
                f"loss 'ism' takes the exact Jacobian trace (one backward pass per dimension) and allows at "
                f"most ISM_MAX_DIM={ISM_MAX_DIM} data dimensions, got {D} (sample shape "
                f"{tuple(x0.shape[1:])}); use 'ssm' or 'ssm-vr' (sliced score matching) instead")

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """n times drawn uniformly from the noise levels, float64 [n]."""
        idx = torch.randint(0, self.levels.numel(), (n,), generator=generator, device=device)
        return self.levels.to(idx.device)[idx]

    def __call__(self, net: Net, x0: Tensor, class_labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss [B]."""
        return self.forward_with_noise(net, x0, class_labels, generator)[0]

    def forward_with_noise(self, net: Net, x0: Tensor, class_labels: Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample loss [B] and the EDM noise level σ̃ = σ(t)/α(t) [B] each sample was trained at."""
        _check_batch(x0, class_labels)
        self._check_dim(x0)
        t = self.sample_t(x0.shape[0], generator, x0.device)
        return self.forward_at(net, x0, t, class_labels, generator)

    def forward_at(self, net: Net, x0: Tensor, t: Tensor, class_labels: Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The objective at per-sample times t [B]: (loss [B], σ̃ [B]). Draws ε, dropout, then v."""
        _check_batch(x0, class_labels)
        self._check_dim(x0)
        dtype = _compute_dtype(x0)
        x0 = x0.to(dtype)
        t = t.to(dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=dtype)
        labels = class_labels
        if labels is not None and self.label_dropout > 0:
            labels = drop_labels(labels, self.label_dropout, self.null_label, generator)
        alpha, sigma = self.sde.marginal_coeffs(t)
        # Fused attention kernels (flash / memory-efficient) have no double backward; the math kernel does.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            x_t = (expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise).requires_grad_(True)
            out = net(x_t, noise_label(self.sde, t, self.noise_label_kind), labels).to(dtype)
            s = output_to_score(out, x_t, alpha, sigma, self.parameterization)
            if self.kind == "ism":
                total = s.flatten(1).pow(2).sum(1) + 2 * _jacobian_trace(s, x_t)
            else:
                v = draw_probes(self.projections, (self.n_projections, *x0.shape), x0, generator)
                sq, quad = _sliced_terms(s, x_t, v)
                first = s.flatten(1).pow(2).sum(1) if self.kind == "ssm-vr" else sq
                total = first + 2 * quad
            # reduce="mean" divides by the number of dimensions, as DSMLoss's mean over them does.
            if self.reduce == "mean":
                total = total / x0[0].numel()
            return sigma**2 * total, sigma / alpha


def build_score_matching_loss(name: str, sde: SDE | None = None, **kwargs) -> ScoreMatchingLoss:
    """'ism', 'ssm' or 'ssm-vr' on `sde`'s noise levels (keyword options as ScoreMatchingLoss)."""
    _check_choice("loss name", name, SCORE_MATCHING_LOSSES)
    if sde is None:
        raise ValueError(f"loss {name!r} needs an sde (got sde=None) for its noise levels")
    return ScoreMatchingLoss(sde, name, **kwargs)


LOSS_BUILDERS.update(dict.fromkeys(SCORE_MATCHING_LOSSES, build_score_matching_loss))

__all__ = ["ISM_MAX_DIM", "SCORE_MATCHING_LOSSES", "ScoreMatchingLoss",
           "build_score_matching_loss"]
