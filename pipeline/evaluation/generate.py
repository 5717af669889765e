"""The one way samples are drawn from a model: a `SamplingPlan` and `generate(model, plan)`, the iterator
over its sample blocks, built on the core dispatcher `samplers.sample`.

Sampling at scale, the guidance sweep and trial scoring all call `generate`, so a sample is the same
whichever of them drew it.

Reproducibility: every sample has its own random streams. Sample i starts from x_T drawn by a CPU
generator seeded with seed(i) = base_seed + i, and the normal draws a stochastic sampler makes along
its trajectory come from a second generator of sample i alone, seeded from (base_seed, i). So sample i
depends neither on how samples are batched nor on how they are spread over workers, and it can be
regenerated alone, equal to the batch run up to the round-off of batched versus single network
evaluations (≈1e-6 in float32 on CPU). Exceptions, by construction of the samplers: the adaptive ODE
solver chooses its steps for the whole batch (equal up to its tolerance), and `pc` with
`snr_norm="batch"` (score_sde's rule) averages the corrector's step over the batch; `snr_norm="sample"`
removes that coupling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import check_int
from ..diffusion import samplers as core
from ..training.checkpoint import SamplingModel

# Options of the core samplers that a recorded plan cannot carry (objects, not values).
_NOT_SETTABLE = frozenset({"callback", "progress", "dtype"})


@dataclass(frozen=True)
class SamplingPlan:
    """Everything that decides the samples (recorded verbatim in the samples' manifest)."""

    n: int
    method: str
    steps: int
    guidance: float = 0.0
    base_seed: int = 0
    batch_size: int = 256
    options: dict[str, Any] = field(default_factory=dict)
    class_label: int | None = None  # None: sample i gets class i mod K (conditional models)
    levels: int = 256
    # Guidance applies where σ̃ = σ/α lies in (sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024; None: ∞).
    sigma_lo: float = 0.0
    sigma_hi: float | None = None
    # Autoguidance: the checkpoint of a weaker model of the same data (Karras et al. 2024); `guidance`
    # is then the w of D_guide + w (D_main − D_guide).
    guide: str | None = None

    @property
    def interval(self) -> tuple[float, float]:
        return (float(self.sigma_lo), math.inf if self.sigma_hi is None else float(self.sigma_hi))

    def validate(self, model: SamplingModel | None = None) -> None:
        """ValueError naming the field before any sampling work."""
        for name in ("n", "steps", "batch_size"):
            check_int(name, getattr(self, name), 1)
        allowed = core.allowed_options(self.method)  # ValueError naming the methods for an unknown one
        settable = sorted(set(allowed) - _NOT_SETTABLE)
        unknown = sorted(set(self.options) - set(settable))
        if unknown:
            raise ValueError(f"unknown sampler option(s) {unknown} for {self.method!r}; allowed: {settable}")
        if isinstance(self.base_seed, bool) or not isinstance(self.base_seed, int) or self.base_seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.base_seed!r}")
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not 2 <= self.levels <= 256:
            raise ValueError(f"levels must be an integer in 2..256, got {self.levels!r}")
        from ..diffusion.guidance import check_interval

        check_interval(*self.interval)
        if model is None:
            return
        if self.guide is None:
            model.check_guidance(self.guidance)
        if self.class_label is not None:
            if model.num_classes is None:
                raise ValueError(f"class_label={self.class_label}: the model is unconditional")
            if not 0 <= self.class_label < model.num_classes:
                raise ValueError(f"class_label must lie in [0, {model.num_classes}), got {self.class_label}")
        # The core's own value checks (eps range, eta, snr, solver ...), before any network call.
        core.check_options(self.method, model.sde, self.steps, {**allowed, **self.options})

    @property
    def deterministic(self) -> bool:
        """True when a sample depends on its own x_T only (no noise drawn along the trajectory)."""
        return not core.draws_noise(self.method, self.options)

    def num_blocks(self) -> int:
        return -(-self.n // self.batch_size)

    def block(self, b: int) -> range:
        return range(b * self.batch_size, min((b + 1) * self.batch_size, self.n))

    def seed(self, i: int) -> int:
        """seed(i) = base_seed + i: the seed of sample i's starting noise x_T."""
        return self.base_seed + i

    def noise_seed(self, i: int) -> int:
        """Seed of sample i's in-trajectory noise stream, derived from (base_seed, i)."""
        state = np.random.SeedSequence((self.base_seed, i, 0x5A3D)).generate_state(2, dtype=np.uint32)
        return int(state[0]) << 31 | int(state[1]) >> 1

    def labels(self, indices: Sequence[int], num_classes: int | None) -> Tensor | None:
        if num_classes is None:
            return None
        if self.class_label is not None:
            return torch.full((len(indices),), self.class_label, dtype=torch.long)
        return torch.as_tensor([i % num_classes for i in indices], dtype=torch.long)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Block:
    """Samples `indices` ([-1, 1] floats, on the model's device, before quantisation)."""

    indices: list[int]
    x: Tensor
    labels: Tensor | None
    nfe: int
    seconds: float


def initial_noise(model: SamplingModel, plan: SamplingPlan, indices: Sequence[int]) -> Tensor:
    """x_T [len(indices), C, H, W]: row j from its own CPU generator seeded with seed(indices[j])."""
    gens = [torch.Generator().manual_seed(plan.seed(i)) for i in indices]
    return core.per_sample_prior(model.sde, (len(indices), *model.image_shape), gens)


@torch.no_grad()
def _draw(model: SamplingModel, plan: SamplingPlan, indices: list[int],
          guide: SamplingModel | None = None) -> Block:
    device = next(model.net.parameters()).device
    opts = {**plan.options, "progress": False}
    dtype = {**core.allowed_options(plan.method), **opts}.get("dtype", torch.float32)
    x_T = initial_noise(model, plan, indices).to(device=device, dtype=dtype)
    noise = None
    if not plan.deterministic:
        noise = core.per_sample_noise(
            [torch.Generator(device=device).manual_seed(plan.noise_seed(i)) for i in indices])
    labels = plan.labels(indices, model.num_classes)
    score_fn = model.score_fn(None if labels is None else labels.to(device), plan.guidance,
                              interval=plan.interval, guide=guide)
    t0 = time.perf_counter()
    x, nfe = core.sample(plan.method, score_fn, model.sde, tuple(x_T.shape), steps=plan.steps, x_T=x_T,
                         noise=noise, device=device, **opts)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return Block(indices=list(indices), x=x, labels=labels, nfe=nfe, seconds=time.perf_counter() - t0)


def generate(model: SamplingModel, plan: SamplingPlan, *, blocks: Sequence[int] | None = None,
             indices: Sequence[int] | None = None) -> Iterator[Block]:
    """Draw the plan's samples block by block (`blocks`: which of the plan's blocks; default all), or,
    with `indices`, just those samples as one batch (to regenerate them alone)."""
    plan.validate(model)
    guide = None
    if plan.guide is not None:
        from ..training.checkpoint import load_model

        guide = load_model(plan.guide, device=next(model.net.parameters()).device)
        model.score_fn(None, plan.guidance, interval=plan.interval, guide=guide)  # mismatches fail here
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < plan.n]
        if bad:
            raise ValueError(f"indices {bad[:5]} lie outside the plan's {plan.n} samples")
        yield _draw(model, plan, list(indices), guide)
        return
    for b in range(plan.num_blocks()) if blocks is None else blocks:
        yield _draw(model, plan, list(plan.block(b)), guide)


def draw_all(model: SamplingModel, plan: SamplingPlan) -> tuple[Tensor, Tensor | None, float]:
    """Every sample of the plan on the CPU ([-1, 1] floats), their labels, and the mean NFE per block."""
    xs, labels, nfe = [], [], []
    for blk in generate(model, plan):
        xs.append(blk.x.float().cpu())
        labels.append(blk.labels)
        nfe.append(blk.nfe)
    y = None if labels[0] is None else torch.cat(labels)
    return torch.cat(xs), y, sum(nfe) / len(nfe)


__all__ = ["Block", "SamplingPlan", "draw_all", "generate", "initial_noise"]
