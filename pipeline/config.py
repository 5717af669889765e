"""Frozen, keyword-only configuration objects for the edges (CLI, flows, Ray entry points).

Config objects stop at the edges: library functions take plain keyword arguments, and `to_dict()`
is what checkpoints and reports record.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("adam", "adamw")
MODELS = ("unet", "autoencoder")  # what `preset` names (the autoencoder: latent diffusion, issue 18)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that defines a DSM training run (model, process, loss, optimisation)."""

    preset: str = "tiny-digits"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    sde: str = "vp"
    sde_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "dsm"  # dsm | edm
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # parameterization, weighting, ...
    label_dropout: float = 0.1
    optimizer: str = "adam"
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0  # ≤ 0 disables clipping
    ema_halflife_kimg: float = 50.0
    ema_rampup_ratio: float | None = 0.05
    batch_size: int = 128
    steps: int = 1000
    precision: str = "auto"  # auto → bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    # Random horizontal flips of the training images. Off by default, as EDM's opt-in --xflip: a
    # mirrored digit or letter is not that class. The data's manifest says when mirroring is unsafe.
    xflip: bool = False
    # Post-hoc EMA (EDM2): power-function profiles kept during training and snapshotted to {out}/phema/
    # every `phema_every` steps (0: never), so that `tune ema` can rebuild any EMA length afterwards.
    phema_sigma_rels: tuple[float, ...] = ()
    phema_every: int = 0
    # "autoencoder": train the autoencoder preset `preset` with the same loop (pipeline.models.autoencoder).
    model: str = "unet"
    # Stop with an error after this many consecutive steps skipped for a non-finite loss or gradient
    # (checked at report time on CUDA, at once on the CPU): a diverged run must not end "trained".
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "max_consecutive_skips"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0)
        _check_positive("lr", self.lr)
        _check_finite("weight_decay", self.weight_decay, low=0.0)
        _check_finite("grad_clip", self.grad_clip)
        betas = self.adam_betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        if self.ema_rampup_ratio is not None:
            _check_positive("ema_rampup_ratio", self.ema_rampup_ratio)
        if not _is_number(self.label_dropout) or not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check_positive("ema_halflife_kimg", self.ema_halflife_kimg)
        check_int("phema_every", self.phema_every, 0)
        for i, s_rel in enumerate(self.phema_sigma_rels):
            if not _is_number(s_rel) or not 0 < s_rel < 0.3:
                raise ValueError(f"phema_sigma_rels[{i}] must be a number in (0, 0.3), got {s_rel!r}")
        if self.phema_every and len(set(self.phema_sigma_rels)) < 2:
            raise ValueError("phema_every > 0 needs at least two distinct phema_sigma_rels (e.g. 0.05, "
                             "0.10): reconstruction solves over the profiles")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["phema_sigma_rels"] = list(self.phema_sigma_rels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        for key in ("adam_betas", "phema_sigma_rels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a training run is executed (not what it learns): workers, cadence, resume, data feed.

    One value for the options `train`, `validate_run`, the schedule search and the CLI share."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    report_every: int = 100
    checkpoint_every: int = 1000
    keep_last: int = 3
    max_failures: int = 3  # -1: retry forever, as Ray's FailureConfig
    resume: bool = False
    split: str = "train"
    shuffle_buffer: int = 1000
    loader_workers: int = 0
    progress: bool = True
    health_check_interval_s: float | None = 0.5

    def validate(self) -> None:
        """ValueError naming the field."""
        for name, low in (("workers", 1), ("report_every", 1), ("checkpoint_every", 1), ("keep_last", 1),
                          ("max_failures", -1), ("shuffle_buffer", 0), ("loader_workers", 0)):
            check_int(name, getattr(self, name), low)
        if not self.gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.health_check_interval_s is not None and not self.health_check_interval_s > 0:
            raise ValueError(f"health_check_interval_s must be > 0, got {self.health_check_interval_s}")

    def replace(self, **changes: Any) -> RunOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_int(name: str, value: Any, low: int) -> int:
    """`value` if it is an integer (not a bool) >= `low`; else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_positive(name: str, value: float) -> None:
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_finite(name: str, value: float, low: float = -math.inf) -> None:
    if not _is_number(value) or not value >= low:
        bound = f" >= {low:g}" if low > -math.inf else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")

