"""Denoising score matching losses: DSM on any SDE (Vincent 2011; Song et al. 2021), EDM's loss, and
EDM2's learned uncertainty weighting around either (Karras et al. 2024, Sec. 5.1).

Both are small callables `loss(net, x0, class_labels=None, generator=None) -> [B]` returning one loss per
sample; the training loop reduces over the batch. Networks follow the contract
`net(x, noise_labels [B], class_labels [B] long | None) -> tensor like x` and are called through the
helpers of `param.py`, so training and sampling read a network's output the same way.

Random draws happen in a fixed order from `generator`: t (or EDM's σ), then the noise ε, then the
label-dropout mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import param
from .param import NOISE_LABELS, Net, edm_denoise, log_normal_sigma, noise_label, output_to_score
from .sde import SDE, expand_like

LOSSES: tuple[str, ...] = ("dsm", "edm", "ism", "ssm", "ssm-vr")  # the last three: score_matching.py
# The network outputs a score-matching loss (DSM here, ISM/SSM in score_matching.py) trains: every
# parameterisation but EDM's preconditioned denoiser, which has its own loss (EDMLoss).
DSM_PARAMETERIZATIONS: tuple[str, ...] = tuple(p for p in param.PARAMETERIZATIONS if p != "edm")
WEIGHTINGS: tuple[str, ...] = ("simple", "sigma2", "likelihood", "min_snr")
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
# Losses built elsewhere (name → builder(name, sde, **kwargs)); score_matching.py registers ism/ssm/ssm-vr.
LOSS_BUILDERS: dict[str, Callable[..., Any]] = {}

# Importance-sampling table for t: uniform points plus points geometric towards each end, so the 1/t
# peak of g²/σ² at small t (VP: σ² ≈ β(0) t), the blow-up of β(t) near T (cosine: β ~ 1/(1 − t)) and
# the bulk of [eps, T] are all resolved.
_IS_GRID_POINTS = 4097


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")


def _check_dropout(label_dropout: float, null_label: int | None) -> None:
    if not (0.0 <= label_dropout < 1.0):
        raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
    if label_dropout > 0 and null_label is None:
        raise ValueError(f"label_dropout={label_dropout} > 0 needs null_label (the class id meaning "
                         "'no label'), got null_label=None")


def _check_batch(x0: Tensor, class_labels: Tensor | None) -> None:
    if x0.ndim < 2:
        raise ValueError(f"x0 must have shape [B, ...] with at least one data dimension, "
                         f"got {tuple(x0.shape)}")
    if class_labels is not None and (class_labels.ndim != 1 or class_labels.shape[0] != x0.shape[0]):
        raise ValueError(f"class_labels must have one entry per sample of x0 (shape [{x0.shape[0]}]), "
                         f"got shape {tuple(class_labels.shape)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    # σ(t) at t = 1e-5 is ~3e-3 and the targets divide by it: never do the loss math in half precision.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _reduce(sq: Tensor, reduce: str) -> Tensor:
    flat = sq.flatten(1)
    return flat.sum(1) if reduce == "sum" else flat.mean(1)


def drop_labels(labels: Tensor, p: float, null_label: int,
                generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by `null_label` with probability p (classifier-free guidance training,
    Ho & Salimans 2022, Alg. 1)."""
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"p (label dropout probability) must lie in [0, 1], got {p}")
    if p == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


class DSMLoss:
    """Denoising score matching on x_t = α(t) x0 + σ(t) ε, t ~ U[eps, T] (Vincent 2011; Song et al. 2021,
    eq. 7), per sample.

    weighting:
      "simple"      the MSE of the network's own target (Ho et al. 2020): ε, x0, v = αε − σx0, or for
                    "score" σ²‖s_θ + ε/σ‖² (= the ε-MSE).
      "sigma2"      λ(t) = σ(t)² in score space, σ²‖s_θ(x_t, t) + ε/σ‖², for every parameterisation
                    (Song & Ermon 2019).
      "likelihood"  λ(t) = g(t)², g²‖s_θ − ∇log p_0t(x_t | x0)‖² with ∇log p_0t = −ε/σ (Song, Durkan,
                    Murray & Ermon 2021, Thm. 1). With importance_sampling=True, t is drawn from
                    p(t) ∝ g²/σ² and multiplied by w(t) = 1/((T − eps) p(t)), so the estimator has the same
                    expectation, (T − eps)⁻¹ ∫ g² E‖·‖² dt, with a much smaller variance.
      "min_snr"     Min-SNR-γ (Hang et al. 2023, eq. 7): min(SNR, γ) ‖x̂_0 − x0‖² with SNR = α²/σ², i.e.
                    λ(t) = σ² min(1, γ/SNR) in score space, for every parameterisation. γ = min_snr_gamma
                    (5 in the paper); γ = ∞ is "sigma2" (the ε-MSE) exactly.

    Relation to the likelihood: with weighting="likelihood" and reduce="sum", (T − eps)/2 · E_t[loss] =
    ½ ∫_eps^T g(t)² E‖s_θ(x_t, t) − ∇log p_0t(x_t | x0)‖² dt, the only θ-dependent term of the
    continuous-time bound −log p_θ(x0) ≤ −E log π(x_T) + ½∫ g² E‖s_θ − ∇log p_0t‖² dt
    − ½∫ E[g² ‖∇log p_0t‖² + 2 ∇·f] dt (Song, Durkan, Murray & Ermon 2021), in nats per sample.
    reduce="mean" divides every loss by the number of data dimensions.
    """

    def __init__(self, sde: SDE, *, parameterization: str = "eps", weighting: str = "simple",
                 importance_sampling: bool = False, eps: float = 1e-5, noise_label_kind: str = "log_sigma",
                 reduce: str = "mean", label_dropout: float = 0.0, null_label: int | None = None,
                 min_snr_gamma: float = 5.0) -> None:
        _check_choice("parameterization", parameterization, DSM_PARAMETERIZATIONS)
        _check_choice("weighting", weighting, WEIGHTINGS)
        if isinstance(min_snr_gamma, bool) or not isinstance(min_snr_gamma, (int, float)) \
                or not min_snr_gamma > 0:  # also rejects NaN
            raise ValueError(f"min_snr_gamma must be a number > 0 (inf: no clamp), got {min_snr_gamma!r}")
        _check_choice("reduce", reduce, REDUCTIONS)
        _check_choice("noise_label_kind", noise_label_kind, NOISE_LABELS)
        if importance_sampling and weighting != "likelihood":
            raise ValueError(f"importance_sampling=True needs weighting='likelihood' (the only weighting "
                             f"whose time density ∝ g²/σ² it samples), got weighting={weighting!r}")
        if not (0.0 < eps < sde.T):
            raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
        _check_dropout(label_dropout, null_label)
        self.sde, self.parameterization, self.weighting = sde, parameterization, weighting
        self.importance_sampling, self.eps = bool(importance_sampling), float(eps)
        self.noise_label_kind = noise_label_kind
        self.reduce, self.label_dropout, self.null_label = reduce, float(label_dropout), null_label
        self.min_snr_gamma = float(min_snr_gamma)
        self._table: dict[torch.device, tuple[Tensor, Tensor]] = {}
        if self.importance_sampling:
            self._table[torch.device("cpu")] = self._tabulate_is_density()

    # ---- time sampling ----------------------------------------------------------------------------

    def _tabulate_is_density(self) -> tuple[Tensor, Tensor]:
        """Grid t_k on [eps, T] and the unnormalised CDF C_k of q(t) = g(t)²/σ(t)², float64."""
        T, eps = self.sde.T, self.eps
        n, f64 = _IS_GRID_POINTS, torch.float64
        geometric = torch.logspace(math.log10(eps), math.log10(T), n, dtype=f64)
        grid = torch.cat([torch.linspace(eps, T, n, dtype=f64), geometric, T + eps - geometric])
        grid = torch.unique(grid.clamp(eps, T))  # sorted
        _, g = self.sde.sde(torch.zeros(grid.shape[0], 1, dtype=torch.float64), grid)
        _, sigma = self.sde.marginal_coeffs(grid)
        q = g.double() ** 2 / sigma.double() ** 2
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                         torch.cumsum(0.5 * (q[1:] + q[:-1]) * (grid[1:] - grid[:-1]), 0)])
        return grid, cdf

    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """t [n] on [eps, T] and the importance weight w(t) [n] (ones unless importance_sampling), float64.

        Importance sampling inverts the tabulated CDF of q ∝ g²/σ² by linear interpolation, so t has
        the piecewise-constant density p_k = ΔC_k / (C_K Δt_k) on grid cell k; w = 1/((T − eps) p(t))
        uses that same density, which makes E_p[w h(t)] = (T − eps)⁻¹ ∫ h dt exact for any h.
        """
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        T, eps = self.sde.T, self.eps
        if not self.importance_sampling:
            return eps + (T - eps) * u, torch.ones_like(u)
        if u.device not in self._table:
            grid, cdf = self._table[torch.device("cpu")]
            self._table[u.device] = (grid.to(u.device), cdf.to(u.device))
        grid, cdf = self._table[u.device]
        target = u * cdf[-1]
        k = (torch.searchsorted(cdf, target, right=True) - 1).clamp(0, grid.shape[0] - 2)
        dt, dC = grid[k + 1] - grid[k], cdf[k + 1] - cdf[k]
        t = (grid[k] + (target - cdf[k]) / dC * dt).clamp(eps, T)
        density = dC / (cdf[-1] * dt)
        return t, 1.0 / ((T - eps) * density)

    # ---- the loss -----------------------------------------------------------------------------------

    def __call__(self, net: Net, x0: Tensor, class_labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Per-sample DSM loss [B]."""
        return self.forward_with_noise(net, x0, class_labels, generator)[0]

    def forward_with_noise(self, net: Net, x0: Tensor, class_labels: Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample loss [B] and the EDM noise level σ̃ = σ(t)/α(t) [B] of each sample, for
        per-noise-level loss monitoring comparable across SDEs and with EDMLoss."""
        _check_batch(x0, class_labels)
        dtype = _compute_dtype(x0)
        x0 = x0.to(dtype)
        B = x0.shape[0]
        t, w = self.sample_t(B, generator, x0.device)
        t, w = t.to(dtype), w.to(dtype)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=dtype)
        labels = class_labels
        if labels is not None and self.label_dropout > 0:
            labels = drop_labels(labels, self.label_dropout, self.null_label, generator)

        alpha, sigma = self.sde.marginal_coeffs(t)
        a, s = expand_like(alpha, x0), expand_like(sigma, x0)
        x_t = a * x0 + s * noise
        out = net(x_t, noise_label(self.sde, t, self.noise_label_kind), labels).to(dtype)

        if self.weighting == "simple":
            if self.parameterization == "eps":
                residual = out - noise
            elif self.parameterization == "x0":
                residual = out - x0
            elif self.parameterization == "v":
                residual = out - (a * noise - s * x0)  # Salimans & Ho 2022, general-α form (param.py)
            else:  # σ (s_θ − ∇log p_0t) = σ s_θ + ε
                residual = s * out + noise
            return _reduce(residual**2, self.reduce), sigma / alpha

        # Score space: σ (s_θ − ∇log p_0t(x_t | x0)) = σ s_θ + ε, since ∇log p_0t = −ε/σ.
        score = output_to_score(out, x_t, alpha, sigma, self.parameterization)
        sq = _reduce((s * score + noise) ** 2, self.reduce)
        if self.weighting == "sigma2":
            return sq, sigma / alpha
        if self.weighting == "min_snr":
            # σ² min(1, γ/SNR): the clamp bites at low noise, where SNR = α²/σ² > γ.
            clamp = torch.clamp(self.min_snr_gamma * sigma**2 / alpha**2, max=1.0)
            return clamp * sq, sigma / alpha
        _, g = self.sde.sde(x_t, t)
        return w * (g.to(dtype) / sigma) ** 2 * sq, sigma / alpha


class EDMLoss:
    """Karras et al. 2022 (Table 1; eqs. 2 and 8): ln σ ~ N(P_mean, P_std²), y + n with n ~ N(0, σ² I),
    per-sample λ(σ) ‖D_θ(y + n; σ) − y‖² with λ(σ) = (σ² + σ_d²)/(σ σ_d)², D the preconditioned denoiser.

    λ(σ) c_out(σ)² = 1, so the raw network F sees a unit-weighted target (eq. 8). The loss is on EDM's
    x̃ = x_t/α scale and does not depend on an SDE; sample with `make_score_fn(..., "edm")` on any SDE.
    """

    def __init__(self, *, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 reduce: str = "mean", label_dropout: float = 0.0, null_label: int | None = None) -> None:
        if not (P_std > 0):
            raise ValueError(f"P_std must be > 0, got {P_std}")
        if not (sigma_data > 0):
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        _check_choice("reduce", reduce, REDUCTIONS)
        _check_dropout(label_dropout, null_label)
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.reduce, self.label_dropout, self.null_label = reduce, float(label_dropout), null_label

    def weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = (σ² + σ_d²)/(σ σ_d)² (Karras et al. 2022, Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net: Net, x0: Tensor, class_labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Per-sample EDM loss [B]."""
        return self.forward_with_noise(net, x0, class_labels, generator)[0]

    def forward_with_noise(self, net: Net, x0: Tensor, class_labels: Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample EDM loss [B] and the noise level σ [B] each sample was trained at."""
        _check_batch(x0, class_labels)
        dtype = _compute_dtype(x0)
        y = x0.to(dtype)
        sigma = log_normal_sigma(y.shape[0], self.P_mean, self.P_std, generator, y.device).to(dtype)
        n = torch.randn(y.shape, generator=generator, device=y.device, dtype=dtype) * expand_like(sigma, y)
        labels = class_labels
        if labels is not None and self.label_dropout > 0:
            labels = drop_labels(labels, self.label_dropout, self.null_label, generator)
        D = edm_denoise(net, y + n, sigma, self.sigma_data, labels)
        return self.weight(sigma) * _reduce((D - y) ** 2, self.reduce), sigma


class UncertaintyWeightedLoss(nn.Module):
    """EDM2's learned uncertainty weighting (Karras et al. 2024, Sec. 5.1 and eq. 21) around a loss:
        L = loss(σ)/e^{u(σ)} + u(σ),    loss(σ) = λ(σ) ‖D_θ − y‖² of `base` (per sample),
    with u a small MLP of c_noise = ¼ ln σ̃ (fixed Fourier features → hidden → 1, last layer zero so
    u = 0 at the start). For each σ the optimum is e^u = E[loss | σ], which makes every noise level's
    contribution to the gradient about equal; for fixed u the weight 1/e^u is just another positive
    λ(σ), so the optimal D_θ is unchanged.

    It is an nn.Module: optimise `self.parameters()` jointly with the network (same optimiser), move it
    with `.to(device)` and checkpoint `state_dict()` beside the network's. The base loss keeps its
    draws, weighting and reduction; with reduce="sum" u is counted once per data dimension, as EDM2
    adds it to every element.
    """

    def __init__(self, base: DSMLoss | EDMLoss, *, channels: int = 64, hidden: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        if not isinstance(base, (DSMLoss, EDMLoss)):
            raise ValueError(f"base must be a DSMLoss or EDMLoss, got {type(base).__name__}")
        for field, v in (("channels", channels), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{field} must be an int >= 1, got {v!r}")
        self.base = base
        g = torch.Generator().manual_seed(seed)
        # Random Fourier features of c_noise (EDM2's MPFourier): fixed, saved with the state_dict.
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def log_variance(self, sigma: Tensor) -> Tensor:
        """u(σ̃) [B] for noise levels σ̃ [B]."""
        c_noise = 0.25 * torch.log(sigma.float())
        features = math.sqrt(2) * torch.cos(c_noise[:, None] * self.freqs + self.phases)
        return self.mlp(features).squeeze(1)

    def forward(self, net: Net, x0: Tensor, class_labels: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Per-sample weighted loss [B]."""
        return self.forward_with_noise(net, x0, class_labels, generator)[0]

    def forward_with_noise(self, net: Net, x0: Tensor, class_labels: Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample loss [B] and noise level σ̃ [B], as the base loss's."""
        loss, sigma = self.base.forward_with_noise(net, x0, class_labels, generator)
        u = self.log_variance(sigma).to(loss.dtype)
        dims = x0[0].numel() if self.base.reduce == "sum" else 1
        return loss / torch.exp(u) + dims * u, sigma


def build_loss(name: str, sde: SDE | None = None, *, learned_uncertainty: bool = False,
               **kwargs) -> DSMLoss | EDMLoss | UncertaintyWeightedLoss:
    """Build a loss by name: 'dsm' (needs `sde`) or 'edm' (SDE-free; `sde` is ignored).
    learned_uncertainty=True wraps it in EDM2's `UncertaintyWeightedLoss` (an nn.Module to optimise)."""
    _check_choice("loss name", name, LOSSES)
    if not isinstance(learned_uncertainty, bool):
        raise ValueError(f"learned_uncertainty must be a bool, got {learned_uncertainty!r}")
    if name in LOSS_BUILDERS:  # registered by modules of their own (score_matching.py)
        if learned_uncertainty:
            raise ValueError(f"learned_uncertainty applies to 'dsm' and 'edm', not {name!r}")
        return LOSS_BUILDERS[name](name, sde, **kwargs)
    if name == "dsm":
        if sde is None:
            raise ValueError("loss 'dsm' needs an sde (got sde=None); 'edm' is the SDE-free loss")
        loss: DSMLoss | EDMLoss = DSMLoss(sde, **kwargs)
    else:
        loss = EDMLoss(**kwargs)
    return UncertaintyWeightedLoss(loss) if learned_uncertainty else loss


__all__ = ["DSM_PARAMETERIZATIONS", "LOSSES", "REDUCTIONS", "WEIGHTINGS", "DSMLoss", "EDMLoss",
           "UncertaintyWeightedLoss", "build_loss", "drop_labels"]
