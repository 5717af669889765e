"""Trial scoring: the numbers a search ranks trials by: a held-out denoising loss comparable across
noise processes, FID of a small sample with the domain classifier's precision, and bits/dim (continuous ELBO).

Trials of a schedule search train under different SDEs and loss weightings, so their training losses
are not comparable. The held-out loss here fixes everything but the model: the same held-out images,
the same EDM noise levels σ̃ = σ/α (the quantiles of EDM's log-normal training density, Karras et al.
2022, Table 1), the same noise draws, and one weighting, EDM's λ(σ̃) = (σ̃² + σ_d²)/(σ̃ σ_d)² on the
denoising error (eq. 2 and 8). For each level the model is queried at the time t with σ(t)/α(t) = σ̃
on x_t = α(t)(x_0 + σ̃ ε), and its score is read as the denoiser D = (x_t + σ(t)² s)/α(t) (Tweedie).
The Bayes-optimal D(x̃; σ̃) = E[x_0 | x_0 + σ̃ ε = x̃] depends on σ̃ alone, so the metric has the same
optimum under every SDE. A level outside a process's range [σ̃(eps), σ̃(T)] is queried at the nearest
end and scored at the requested σ̃: a schedule that never sees a noise level is charged for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..diffusion.sde import SDE, ScoreFn, expand_like

EDM_P_MEAN, EDM_P_STD, SIGMA_DATA = -1.2, 1.2, 0.5


def edm_levels(k: int = 8, *, P_mean: float = EDM_P_MEAN, P_std: float = EDM_P_STD) -> Tensor:
    """σ̃_j = exp(P_mean + P_std Φ⁻¹((j + ½)/k)), j < k: quantiles of EDM's log-normal σ density, float64."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"levels must be an integer >= 1, got {k!r}")
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    return torch.exp(P_mean + P_std * torch.special.ndtri(q))


def edm_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ σ_d)² (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@torch.no_grad()
def heldout_denoising_loss(
    score_fn: ScoreFn,
    sde: SDE,
    x0: Tensor,
    noise: Tensor,
    sigmas: Tensor,
    *,
    eps: float = 1e-5,
    sigma_data: float = SIGMA_DATA,
) -> Tensor:
    """Per-sample EDM-weighted denoising error [B], averaged over the levels `sigmas` [K].

    `noise` [K, B, ...] holds one fixed ε per level and sample, so every trial sees the same draws.
    """
    if noise.shape[0] != sigmas.shape[0] or tuple(noise.shape[1:]) != tuple(x0.shape):
        raise ValueError(
            f"noise must have shape [K={sigmas.shape[0]}, *x0.shape={tuple(x0.shape)}], "
            f"got {tuple(noise.shape)}"
        )
    B = x0.shape[0]
    total = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for j in range(sigmas.shape[0]):
        s_tilde = torch.full((B,), float(sigmas[j]), dtype=x0.dtype, device=x0.device)
        t = sde.edm_sigma_inv(s_tilde.double()).clamp(eps, sde.T).to(x0.dtype)
        alpha, sigma = sde.marginal_coeffs(t)
        a = expand_like(alpha, x0)
        x_t = a * (x0 + expand_like(s_tilde, x0) * noise[j])
        denoised = (x_t + expand_like(sigma, x0) ** 2 * score_fn(x_t, t)) / a
        err = (denoised - x0).double().pow(2).flatten(1).mean(1)
        total += edm_weight(s_tilde.double(), sigma_data) * err
    return total / sigmas.shape[0]


def batched_heldout_loss(
    score_fn_for: Callable[[Tensor | None], ScoreFn],
    sde: SDE,
    x0: Tensor,
    labels: Tensor | None,
    *,
    levels: int = 8,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Mean of `heldout_denoising_loss` over x0 in batches; `score_fn_for(labels)` gives the model's score
    for a batch's labels (None: unconditional). The noise is drawn on the CPU from `seed`, batch by
    batch, so it does not depend on the device."""
    sigmas = edm_levels(levels)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((levels, *x0.shape), generator=g, dtype=torch.float32)
    total, n = 0.0, 0
    for i in range(0, x0.shape[0], batch_size):
        xb = x0[i : i + batch_size].to(device)
        lb = None if labels is None else labels[i : i + batch_size].to(device)
        nb = noise[:, i : i + batch_size].to(device=device, dtype=xb.dtype)
        total += float(heldout_denoising_loss(score_fn_for(lb), sde, xb, nb, sigmas).sum())
        n += xb.shape[0]
    if n == 0:
        raise ValueError("held-out data is empty")
    return total / n


def fid_and_precision(
    x: Tensor,
    labels: Tensor | None,
    *,
    extractor: Any,
    reference: Any,
    levels: int,
    classifier: torch.nn.Module | None = None,
) -> dict[str, float]:
    """FID of samples x ([-1, 1], [N, C, H, W]) against `reference` stats; with a classifier and the
    labels the samples were conditioned on, its accuracy on them (the precision proxy)."""
    from ..diffusion.dequantize import snap_to_levels
    from ..evaluation.fid import feature_stats, frechet_distance, matched_floor

    if x.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples, got {x.shape[0]}")
    feats = extractor.extract(x, levels=levels)
    gen = feature_stats(feats)
    out = {"fid": frechet_distance(gen.mu, gen.sigma, reference.mu, reference.sigma)}
    if reference.features is not None:
        floor = matched_floor(reference, x.shape[0])
        out.update(floor=floor["fid"], floor_min=floor["min"], floor_max=floor["max"])
    if classifier is not None and labels is not None:
        from ..evaluation.classifier import accuracy

        device = next(classifier.parameters()).device
        # The classifier reads images as stored: on the data's grid of levels.
        out["precision"] = accuracy(classifier, snap_to_levels(x, levels).to(device), labels.cpu())
    return out


# ---- in the Train worker: scoring a trial's EMA model at each report --------------------------------


@dataclass(frozen=True)
class TrialScoring:
    """What a trial is scored by and on how much data (the schedule search's evaluation settings)."""

    evaluations: tuple[str, ...]
    seed: int = 0
    heldout_n: int = 256
    heldout_levels: int = 8
    fid_n: int = 256
    fid_sampler: str = "heun"
    fid_steps: int = 16
    bpd_samples: int = 4
    batch_size: int = 256


class TrialEvaluator:
    """Runs on rank 0 at each report: held-out loss, FID (+ precision) of a small sample, bits/dim.
    Data, classifier and reference statistics load in the worker at the first call, never on the driver."""

    def __init__(self, data: str, scoring: TrialScoring, *, classifier: str | None = None,
                 stats_cache: str | None = None) -> None:
        self.data, self.scoring, self.classifier, self.stats_cache = data, scoring, classifier, stats_cache
        self._cache: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def _setup(self, device: torch.device) -> dict[str, Any]:
        c, sc = self._cache, self.scoring
        if c:
            return c
        from .bpd import dataset_levels
        from .classifier import load_split

        c["levels"] = dataset_levels(self.data)
        if {"heldout_loss", "bpd"} & set(sc.evaluations):
            x, y = load_split(self.data, "test")
            c["x"], c["y"] = x[: sc.heldout_n], y[: sc.heldout_n]
        if "fid" in sc.evaluations:
            from .features import build_extractor
            from .fid import reference_stats

            c["extractor"] = build_extractor("domain", weights=self.classifier, device=device)
            c["reference"] = reference_stats(self.data, c["extractor"], split="train",
                                             cache_uri=self.stats_cache)
        return c

    @torch.no_grad()
    def __call__(self, trainer: Any) -> dict[str, float]:
        from ..training.checkpoint import SamplingModel

        t0 = time.perf_counter()
        sc = self.scoring
        c = self._setup(trainer.device)
        model = SamplingModel.from_trainer(trainer)
        conditional = model.num_classes is not None
        out: dict[str, float] = {}
        if "heldout_loss" in sc.evaluations:
            out["heldout_loss"] = batched_heldout_loss(
                lambda labels: model.score_fn(labels if conditional else None), model.sde, c["x"], c["y"],
                levels=sc.heldout_levels, seed=sc.seed, batch_size=sc.batch_size, device=trainer.device)
        if "fid" in sc.evaluations:
            out.update(self._fid(model, c))
        if "bpd" in sc.evaluations:
            out["bpd"] = self._bpd(model, c, trainer.device)
        out["eval_seconds"] = time.perf_counter() - t0
        return {k: (v if math.isfinite(v) else math.inf) for k, v in out.items()}

    def _fid(self, model: Any, c: dict[str, Any]) -> dict[str, float]:
        from .generate import SamplingPlan, draw_all

        sc = self.scoring
        plan = SamplingPlan(n=sc.fid_n, method=sc.fid_sampler, steps=sc.fid_steps, base_seed=sc.seed,
                            batch_size=min(sc.fid_n, sc.batch_size), levels=c["levels"])
        x, y, _ = draw_all(model, plan)
        return score_samples(x, y, extractor=c["extractor"], reference=c["reference"], levels=c["levels"])

    def _bpd(self, model: Any, c: dict[str, Any], device: torch.device) -> float:
        from ..diffusion.elbo import continuous_elbo

        x, y, bs = c["x"], c["y"], self.scoring.batch_size
        g = torch.Generator().manual_seed(self.scoring.seed)  # CPU draws: the same on every device
        total = 0.0
        for i in range(0, x.shape[0], bs):
            xb = x[i : i + bs].to(device)
            labels = y[i : i + bs].to(device) if model.num_classes is not None else None
            res = continuous_elbo(model.score_fn(labels), model.sde, xb, n_samples=self.scoring.bpd_samples,
                                  dequantize={"levels": c["levels"]}, generator=g)
            total += float(res.bpd.double().sum())
        return total / x.shape[0]


def score_samples(x: Tensor, labels: Tensor | None, *, extractor: Any, reference: Any,
                  levels: int) -> dict[str, float]:
    """FID (and, for conditional samples, the domain classifier's precision) of float samples; a
    non-finite sample scores FID = inf, precision 0."""
    if not torch.isfinite(x).all():
        from .fid import matched_floor

        floor = matched_floor(reference, x.shape[0])["fid"] if reference.features is not None else None
        return {"fid": math.inf, "floor": floor, **({"precision": 0.0} if labels is not None else {})}
    return fid_and_precision(x, labels, extractor=extractor, reference=reference, levels=levels,
                             classifier=extractor.model if labels is not None else None)


__all__ = ["TrialEvaluator", "TrialScoring", "batched_heldout_loss", "edm_levels", "edm_weight",
           "fid_and_precision", "heldout_denoising_loss", "score_samples"]
