"""Schedule-search settings and their validation (before Ray or any trial starts).

A `ScheduleSearch` is saved as `search.json` so that a restore rebuilds it; the trials share its
`base` TrainConfig (with the space's point applied) and its `run_options()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import RunOptions, TrainConfig, check_int
from ..evaluation.scoring import TrialScoring
from . import spaces

METRIC_MODES: dict[str, str] = {"heldout_loss": "min", "fid": "min", "bpd": "min", "precision": "max",
                                "loss": "min"}
EVALUATIONS: tuple[str, ...] = ("heldout_loss", "fid", "bpd")


@dataclass(frozen=True, kw_only=True)
class ScheduleSearch:
    """Everything a schedule search needs; saved as search.json so that a restore rebuilds it."""

    space: dict[str, Any]
    base: dict[str, Any]  # TrainConfig.to_dict() of what the trials share (preset, steps, batch, lr, ...)
    data: str
    out: str
    metric: str = "heldout_loss"
    evaluations: tuple[str, ...] = ("heldout_loss",)
    num_samples: int = 1
    report_every: int = 50
    checkpoint_every: int | None = None  # None: at every report
    grace_period: int | None = None  # steps before ASHA may stop a trial; None: report_every
    reduction_factor: float = 2.0
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    trial_cpus: float = 0.1
    max_concurrent: int | None = None
    heldout_n: int = 256
    heldout_levels: int = 8
    fid_n: int = 256
    fid_sampler: str = "heun"
    fid_steps: int = 16
    bpd_samples: int = 4
    classifier: str | None = None
    eval_seed: int = 0
    shuffle_buffer: int = 1000
    max_failures: int = 1
    name: str = "schedules"

    def run_options(self) -> RunOptions:
        """The run options every trial shares (trials resume their own folder)."""
        return RunOptions(workers=self.workers, gpus_per_worker=self.gpus_per_worker,
                          cpus_per_worker=self.cpus_per_worker, report_every=self.report_every,
                          checkpoint_every=self.checkpoint_every or self.report_every, keep_last=2,
                          max_failures=self.max_failures, resume=True, shuffle_buffer=self.shuffle_buffer,
                          progress=False)

    def scoring(self) -> TrialScoring:
        return TrialScoring(evaluations=tuple(self.evaluations), seed=self.eval_seed,
                            heldout_n=self.heldout_n, heldout_levels=self.heldout_levels, fid_n=self.fid_n,
                            fid_sampler=self.fid_sampler, fid_steps=self.fid_steps,
                            bpd_samples=self.bpd_samples)

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]

    @property
    def steps(self) -> int:
        return int(self.base.get("steps", TrainConfig().steps))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["evaluations"] = list(self.evaluations)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScheduleSearch:
        d = dict(d)
        d["evaluations"] = tuple(d.get("evaluations", ()))
        if "flip" in d:  # searches saved before augmentation moved into the TrainConfig (xflip)
            d["base"] = {**d["base"], "xflip": bool(d.pop("flip"))}
        return cls(**d)


def reported_metrics(evaluations: Sequence[str], *, conditional: bool) -> list[str]:
    """The metric names every trial reports (training loss plus the evaluations)."""
    names = ["loss", *evaluations]
    if "fid" in evaluations and conditional:
        names.append("precision")
    return names


def validate_search(search: ScheduleSearch) -> tuple[dict[str, spaces.Dim], TrainConfig]:
    """Check a search before Ray or any trial starts; ValueError naming the field otherwise."""
    from ..diffusion import samplers as core
    from ..models import preset_config
    from ..training.ray_train import validate_run

    space = spaces.parse_space(search.space)
    base = TrainConfig.from_dict(search.base)
    spaces.check_space_with(space, base)
    bad = sorted(set(search.evaluations) - set(EVALUATIONS))
    if bad:
        raise ValueError(f"evaluations: unknown {bad}; allowed: {list(EVALUATIONS)}")
    conditional = preset_config(base.preset, **base.model_overrides).get("num_classes") is not None
    names = reported_metrics(search.evaluations, conditional=conditional)
    if search.metric not in names:
        raise ValueError(f"metric {search.metric!r} is reported by no trial: with evaluations "
                         f"{list(search.evaluations)} trials report {names}")
    for name in ("num_samples", "report_every", "heldout_n", "heldout_levels", "fid_n", "fid_steps",
                 "bpd_samples"):
        check_int(name, getattr(search, name), 1)
    check_int("eval_seed", search.eval_seed, 0)
    grace = search.grace_period or search.report_every
    check_int("grace_period", grace, 1)
    if grace > search.steps:
        raise ValueError(f"grace_period={grace} exceeds steps={search.steps}: ASHA could never stop a trial")
    if not search.reduction_factor > 1:
        raise ValueError(f"reduction_factor must be > 1, got {search.reduction_factor}")
    if not search.trial_cpus > 0:
        raise ValueError("trial_cpus must be > 0 (Tune cannot place a trial without resources), "
                         f"got {search.trial_cpus}")
    if search.max_concurrent is not None:
        check_int("max_concurrent", search.max_concurrent, 1)
    if "fid" in search.evaluations:
        if not search.classifier:
            raise ValueError("evaluations include 'fid': pass classifier (the domain classifier's URI, "
                             "from `diffusion-pipeline classifier`) for its features")
        from ..evaluation.classifier import load_classifier

        load_classifier(search.classifier)  # ValueError when missing or corrupt
        core.allowed_options(search.fid_sampler)  # ValueError for an unknown sampler
    corner = next(spaces.corner_points(space))
    validate_run(spaces.trial_config(corner, base), data=search.data, out=search.out,
                 options=search.run_options())
    if {"heldout_loss", "bpd"} & set(search.evaluations):
        from ..data.manifest import read_manifest, shard_entries

        shard_entries(read_manifest(search.data), "test")  # held-out metrics read the test split
    return space, base


def max_concurrent_trials(search: ScheduleSearch, resources: dict[str, float] | None = None) -> int:
    """Concurrent schedule trials the cluster holds: each takes its trial function's CPUs plus its
    Train workers' CPUs and GPUs (the Train controller takes none), so GPUs bound it on GPU clusters
    and CPUs on CPU-only ones."""
    from .. import raykit

    w = search.workers
    need = {"CPU": search.trial_cpus + w * search.cpus_per_worker, "GPU": w * search.gpus_per_worker}
    detail = (f"trial_cpus={search.trial_cpus:g} + workers={w} × "
              f"(cpus_per_worker={search.cpus_per_worker:g}, gpus_per_worker={search.gpus_per_worker:g})")
    return raykit.concurrent_trials(need, requested=search.max_concurrent, resources=resources, detail=detail)


__all__ = ["EVALUATIONS", "METRIC_MODES", "ScheduleSearch", "max_concurrent_trials", "reported_metrics",
           "validate_search"]
