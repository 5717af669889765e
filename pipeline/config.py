"""Frozen, keyword-only configuration objects for the edges (CLI, flows, Ray entry points).

Config objects stop at the edges: library functions take plain keyword arguments, and `to_dict()`
is what checkpoints and reports record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("adam", "adamw")
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

    def __post_init__(self) -> None:
        _check_positive("batch_size", self.batch_size)
        _check_positive("steps", self.steps)
        _check_positive("lr", self.lr)
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.ema_halflife_kimg <= 0:
            raise ValueError(f"ema_halflife_kimg must be > 0, got {self.ema_halflife_kimg}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
