"""Schedule search: Ray Tune trials over noise processes and loss weightings, each trial a Ray Train run.

Follows Ray Train V2's pattern: a Tune trial function builds and fits a `TorchTrainer` (through
`training.ray_train.train`), whose rank-0 reports reach Tune through `TuneReportCallback`. At every
report the worker scores its EMA model on held-out data (`TrialEvaluator`: the SDE-independent held-out
denoising loss, FID of a small sample with the domain classifier's precision, bits/dim from the
continuous ELBO), and ASHA (Li et al. 2020) stops trials whose chosen metric falls behind at a rung.

Storage, under `out`: `search.json` (the settings, so the search can be restored), `tune/{name}/`
(Tune's experiment, restorable with `Tuner.restore`), `trials/{trial_id}/` (the Train run: checkpoints,
history, the trial's config, one `attempts/` marker per start and `result.json` once it finishes),
`fid-stats/` (the FID reference statistics) and the report (`report.md`, `report.json`, `best.json`,
`pareto.png`).

Concurrency: Tune places only the trial function (`trial_cpus`); each trial's Train workers take
`workers × (cpus_per_worker, gpus_per_worker)` from a placement group of their own. The number of
concurrent trials is therefore derived from the cluster's GPUs (CPUs on CPU-only clusters) and
enforced with `max_concurrent_trials`; asking for more than fit is an error before any trial starts.

A trial that ASHA stops is killed with its Train controller, which cannot remove its workers'
placement group; Ray Train's cleaner needs the dashboard's state API to notice. So every trial records
its placement group, and the driver removes it when Tune reports the trial finished.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import storage
from ..config import TrainConfig
from . import spaces

METRIC_MODES: dict[str, str] = {
    "heldout_loss": "min",
    "fid": "min",
    "bpd": "min",
    "precision": "max",
    "loss": "min",
}
EVALUATIONS: tuple[str, ...] = ("heldout_loss", "fid", "bpd")
SEARCH_FILE = "search.json"
TRIALS_DIR = "trials"
TUNE_DIR = "tune"
ATTEMPTS_DIR = "attempts"
RESULT_FILE = "result.json"
TRIAL_FILE = "trial.json"
PLACEMENT_FILE = "placement_group.json"
STATS_DIR = "fid-stats"  # the FID reference statistics, computed once by the driver


# ---- settings -------------------------------------------------------------------------------------


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
    flip: bool = True
    max_failures: int = 1
    name: str = "schedules"

    def run_options(self) -> dict[str, Any]:
        """The `train` / `validate_run` options every trial shares (trials resume their own folder)."""
        return {"workers": self.workers, "gpus_per_worker": self.gpus_per_worker,
                "cpus_per_worker": self.cpus_per_worker, "report_every": self.report_every,
                "checkpoint_every": self.checkpoint_every or self.report_every, "keep_last": 2,
                "max_failures": self.max_failures, "resume": True, "shuffle_buffer": self.shuffle_buffer}

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
        raise ValueError(
            f"metric {search.metric!r} is reported by no trial: with evaluations "
            f"{list(search.evaluations)} trials report {names}"
        )
    for name in (
        "num_samples",
        "report_every",
        "heldout_n",
        "heldout_levels",
        "fid_n",
        "fid_steps",
        "bpd_samples",
    ):
        _check_int(name, getattr(search, name), 1)
    _check_int("eval_seed", search.eval_seed, 0)
    grace = search.grace_period or search.report_every
    _check_int("grace_period", grace, 1)
    if grace > search.steps:
        raise ValueError(f"grace_period={grace} exceeds steps={search.steps}: ASHA could never stop a trial")
    if not search.reduction_factor > 1:
        raise ValueError(f"reduction_factor must be > 1, got {search.reduction_factor}")
    if not search.trial_cpus > 0:
        raise ValueError(
            f"trial_cpus must be > 0 (Tune cannot place a trial without resources), got {search.trial_cpus}"
        )
    if search.max_concurrent is not None:
        _check_int("max_concurrent", search.max_concurrent, 1)
    if "fid" in search.evaluations:
        if not search.classifier:
            raise ValueError(
                "evaluations include 'fid': pass classifier (the domain classifier's URI, "
                "from `diffusion-pipeline classifier`) for its features"
            )
        from ..evaluation.classifier import load_classifier

        load_classifier(search.classifier)  # ValueError when missing or corrupt
        core.allowed_options(search.fid_sampler)  # ValueError for an unknown sampler
    corner = next(spaces.corner_points(space))
    validate_run(spaces.trial_config(corner, base), data=search.data, out=search.out, **search.run_options())
    if {"heldout_loss", "bpd"} & set(search.evaluations):
        from ..data.manifest import read_manifest, shard_entries

        shard_entries(read_manifest(search.data), "test")  # held-out metrics read the test split
    return space, base


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def concurrent_trials(
    need: dict[str, float],
    *,
    requested: int | None = None,
    resources: dict[str, float] | None = None,
    detail: str = "",
) -> int:
    """How many trials needing `need` (e.g. {"CPU": 1.1, "GPU": 1}) fit the cluster's `resources`
    (default: the connected Ray cluster's) at once; `requested` above that is a ValueError."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    need = {r: float(n) for r, n in need.items() if n > 0}
    if not need:
        raise ValueError("a trial must need some resource (CPU or GPU)")
    fits = {r: math.floor(float(resources.get(r, 0.0)) / n + 1e-9) for r, n in need.items()}
    allowed = min(fits.values())
    have = ", ".join(f"{float(resources.get(r, 0.0)):g} {r}" for r in need)
    want = ", ".join(f"{n:g} {r}" for r, n in need.items()) + (f" ({detail})" if detail else "")
    if allowed < 1:
        raise ValueError(f"one trial needs {want} but the Ray cluster has {have}")
    if requested is not None and requested > allowed:
        raise ValueError(
            f"max_concurrent={requested} trials, each needing {want}, do not fit the Ray "
            f"cluster's {have}: at most {allowed} do"
        )
    return requested or allowed


def max_concurrent_trials(
    *,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
    trial_cpus: float,
    requested: int | None = None,
    resources: dict[str, float] | None = None,
) -> int:
    """Concurrent schedule trials the cluster holds: each takes its trial function's CPUs plus its
    Train workers' CPUs and GPUs (the Train controller takes none), so GPUs bound it on GPU clusters
    and CPUs on CPU-only ones."""
    need = {"CPU": trial_cpus + workers * cpus_per_worker, "GPU": workers * gpus_per_worker}
    detail = (
        f"trial_cpus={trial_cpus:g} + workers={workers} × (cpus_per_worker={cpus_per_worker:g}, "
        f"gpus_per_worker={gpus_per_worker:g})"
    )
    return concurrent_trials(need, requested=requested, resources=resources, detail=detail)


# ---- in the Train worker: scoring the EMA model -----------------------------------------------------


def sampling_model(trainer: Any) -> Any:
    """The trainer's EMA network as a `SamplingModel` (read as the checkpoint loader would read it)."""
    from ..evaluation.sampling import SamplingModel

    cfg: TrainConfig = trainer.config
    lk = dict(cfg.loss_kwargs)
    net = trainer.ema.module
    return SamplingModel(
        net=net,
        sde=trainer.sde,
        config=cfg,
        parameterization="edm" if cfg.loss == "edm" else lk.get("parameterization", "eps"),
        noise_label_kind=lk.get("noise_label_kind", "log_sigma"),
        sigma_data=float(lk.get("sigma_data", 0.5)),
        num_classes=getattr(net, "num_classes", None),
        image_shape=(int(net.in_channels), int(net.image_size), int(net.image_size)),
        checkpoint_uri="<in-memory EMA>",
        checkpoint_sha256="",
        step=trainer.position.step,
        weights="ema",
    )


@dataclass
class TrialEvaluator:
    """Runs on rank 0 at each report: held-out loss, FID (+ precision) of a small sample, bits/dim."""

    data: str
    evaluations: tuple[str, ...]
    seed: int = 0
    heldout_n: int = 256
    heldout_levels: int = 8
    fid_n: int = 256
    fid_sampler: str = "heun"
    fid_steps: int = 16
    bpd_samples: int = 4
    classifier: str | None = None
    batch_size: int = 256
    stats_cache: str | None = None  # where the FID reference statistics are cached
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}  # data and models load in the worker, not on the driver

    def _setup(self, device: torch.device) -> dict[str, Any]:
        c = self._cache
        if c:
            return c
        from ..evaluation.bpd import dataset_levels
        from ..evaluation.classifier import load_split

        c["levels"] = dataset_levels(self.data)
        if {"heldout_loss", "bpd"} & set(self.evaluations):
            x, y = load_split(self.data, "test")
            c["x"], c["y"] = x[: self.heldout_n], y[: self.heldout_n]
        if "fid" in self.evaluations:
            from ..evaluation.features import build_extractor
            from ..evaluation.fid import reference_stats

            c["extractor"] = build_extractor("domain", weights=self.classifier, device=device)
            c["reference"] = reference_stats(
                self.data, c["extractor"], split="train", cache_uri=self.stats_cache
            )
        return c

    @torch.no_grad()
    def __call__(self, trainer: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        c = self._setup(trainer.device)
        model = sampling_model(trainer)
        conditional = model.num_classes is not None
        out: dict[str, float] = {}
        if "heldout_loss" in self.evaluations:
            from .metrics import batched_heldout_loss

            out["heldout_loss"] = batched_heldout_loss(
                lambda labels: model.score_fn(labels if conditional else None),
                model.sde,
                c["x"],
                c["y"],
                levels=self.heldout_levels,
                seed=self.seed,
                batch_size=self.batch_size,
                device=trainer.device,
            )
        if "fid" in self.evaluations:
            out.update(self._fid(model, c))
        if "bpd" in self.evaluations:
            out["bpd"] = self._bpd(model, c, trainer.device)
        out["eval_seconds"] = time.perf_counter() - t0
        return {k: (v if math.isfinite(v) else math.inf) for k, v in out.items()}

    def _fid(self, model: Any, c: dict[str, Any]) -> dict[str, float]:
        from ..evaluation.sampling import SamplingPlan, generate
        from .metrics import fid_and_precision

        plan = SamplingPlan(
            n=self.fid_n,
            method=self.fid_sampler,
            steps=self.fid_steps,
            base_seed=self.seed,
            batch_size=min(self.fid_n, self.batch_size),
            levels=c["levels"],
        )
        xs, labels = [], []
        for b in range(plan.num_blocks()):
            idx = list(plan.block(b))
            x, _ = generate(model, plan, idx, noise_seed=plan.block_noise_seed(b))
            xs.append(x.float().cpu())
            labels.append(plan.labels(idx, model.num_classes))
        x = torch.cat(xs)
        if not torch.isfinite(x).all():
            return {"fid": math.inf, **({"precision": 0.0} if model.num_classes is not None else {})}
        y = None if labels[0] is None else torch.cat(labels)
        return fid_and_precision(
            x,
            y,
            extractor=c["extractor"],
            reference=c["reference"],
            levels=c["levels"],
            classifier=c["extractor"].model if y is not None else None,
        )

    def _bpd(self, model: Any, c: dict[str, Any], device: torch.device) -> float:
        from ..diffusion.elbo import continuous_elbo

        x, y = c["x"], c["y"]
        g = torch.Generator().manual_seed(self.seed)  # CPU draws: the same on every device
        total = 0.0
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i : i + self.batch_size].to(device)
            labels = y[i : i + self.batch_size].to(device) if model.num_classes is not None else None
            res = continuous_elbo(
                model.score_fn(labels),
                model.sde,
                xb,
                n_samples=self.bpd_samples,
                dequantize={"levels": c["levels"]},
                generator=g,
            )
            total += float(res.bpd.double().sum())
        return total / x.shape[0]


class PlacementGroupRecorder:
    """Step hook: rank 0 writes its worker group's placement group id under the trial folder once."""

    def __init__(self, uri: str) -> None:
        self.uri, self._done = uri, False

    def __call__(self, trainer: Any, x: Any, labels: Any) -> None:
        if self._done or trainer.rank != 0:
            return
        self._done = True
        from ray.util import get_current_placement_group

        pg = get_current_placement_group()
        if pg is not None:
            storage.write_json(self.uri, {"placement_group": pg.id.hex(), "pid": os.getpid()})


def release_placement_group(trial_uri: str) -> bool:
    """Remove the trial's recorded Train placement group if it is still there; True when removed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    uri = storage.join(trial_uri, PLACEMENT_FILE)
    if not storage.exists(uri):
        return False
    pg = PlacementGroup(PlacementGroupID.from_hex(storage.read_json(uri)["placement_group"]))
    try:
        if placement_group_table(pg).get("state", "REMOVED") == "REMOVED":
            return False
        remove_placement_group(pg)
    except Exception:  # already gone, or removed concurrently by its controller
        return False
    return True


# ---- the Tune trial -----------------------------------------------------------------------------


def trial_uri(out: str, trial_id: str) -> str:
    return storage.join(out, TRIALS_DIR, trial_id)


def schedule_trial(config: dict[str, Any], *, search: dict[str, Any]) -> None:
    """One Tune trial: build and fit a TorchTrainer for the point `config` (Ray Train V2's pattern)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..training.ray_train import train

    s = ScheduleSearch.from_dict(search)
    trial_id = tune.get_context().get_trial_id()
    out = trial_uri(s.out, trial_id)
    storage.write_json(
        storage.join(out, ATTEMPTS_DIR, f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"),
        {"trial_id": trial_id, "pid": os.getpid(), "started": time.time()},
    )
    cfg = spaces.trial_config(config, TrainConfig.from_dict(s.base))
    storage.write_json(
        storage.join(out, TRIAL_FILE),
        {
            "trial_id": trial_id,
            "point": config,
            "resolved": spaces.resolve(config),
            "train_config": cfg.to_dict(),
        },
    )
    evaluator = TrialEvaluator(
        data=s.data,
        evaluations=tuple(s.evaluations),
        seed=s.eval_seed,
        heldout_n=s.heldout_n,
        heldout_levels=s.heldout_levels,
        fid_n=s.fid_n,
        fid_sampler=s.fid_sampler,
        fid_steps=s.fid_steps,
        bpd_samples=s.bpd_samples,
        classifier=s.classifier,
        stats_cache=storage.join(s.out, STATS_DIR),
    )
    res = train(
        cfg,
        data=s.data,
        out=out,
        **s.run_options(),
        flip=s.flip,
        progress=False,
        run_name=f"train-{trial_id}",
        callbacks=[TuneReportCallback()],
        evaluate=evaluator,
        on_step=PlacementGroupRecorder(storage.join(out, PLACEMENT_FILE)),
    )
    storage.write_json(
        storage.join(out, RESULT_FILE),
        {
            "trial_id": trial_id,
            "step": res.step,
            "metrics": _jsonable(res.metrics),
            "checkpoint": res.checkpoint,
            "ema": res.ema,
        },
    )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _release_callback(out: str) -> Any:
    from ray import tune

    class ReleaseTrainResources(tune.Callback):
        """Frees the Train placement group of every trial Tune finished, stopped or lost."""

        def __init__(self, root: str) -> None:
            self.root = root

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release_placement_group(trial_uri(self.root, trial.trial_id))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            release_placement_group(trial_uri(self.root, trial.trial_id))

    return ReleaseTrainResources(out)


def _release_all(out: str) -> None:
    root = storage.join(out, TRIALS_DIR)
    if storage.exists(root):
        for trial_id in storage.listdir(root):
            release_placement_group(storage.join(root, trial_id))


# ---- the driver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSearchResult:
    """A finished (or interrupted) search: one row per trial, the best one, where the report is."""

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    metric: str
    mode: str
    complete: bool
    experiment: str
    report: dict[str, str]


def search_schedules(
    space: dict[str, Any] | str,
    *,
    base: TrainConfig,
    data: str,
    out: str,
    callbacks: Sequence[Any] = (),
    **options: Any,
) -> ScheduleSearchResult:
    """Run a schedule search (ASHA over Ray Train trials); `options` are `ScheduleSearch` fields.

    Everything is checked before Ray starts a trial: the space, the metric against what trials report,
    the data, the output, and how many trials the cluster can run at once. `callbacks` are extra Tune
    callbacks (progress, interruption in tests).
    """
    if isinstance(space, str):
        space = spaces.space_to_json(spaces.parse_space(space))
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ScheduleSearch)})
    if unknown:
        raise ValueError(f"unknown search option(s) {unknown}")
    options = {k: tuple(v) if k == "evaluations" else v for k, v in options.items()}
    search = ScheduleSearch(
        space=dict(space), base=base.to_dict(), data=_absolute(data), out=_absolute(out), **options
    )
    parsed, _ = validate_search(search)
    started = _connect()
    try:
        concurrent = max_concurrent_trials(
            workers=search.workers,
            gpus_per_worker=search.gpus_per_worker,
            cpus_per_worker=search.cpus_per_worker,
            trial_cpus=search.trial_cpus,
            requested=search.max_concurrent,
        )
        if "fid" in search.evaluations:
            _prepare_reference(search)
        storage.write_json(storage.join(search.out, SEARCH_FILE), search.to_dict())
        tuner = _tuner(search, parsed, concurrent, callbacks)
        results = tuner.fit()
        _release_all(search.out)
        return _finish(search, results)
    finally:
        if started:
            import ray

            ray.shutdown()


def restore_schedules(out: str, *, callbacks: Sequence[Any] = ()) -> ScheduleSearchResult:
    """Resume an interrupted search from its storage: unfinished trials run (continuing from their
    last Train checkpoint), errored ones restart, finished ones are kept as they are."""
    from ray import tune

    search, path, fs = _restorable(_absolute(out), SEARCH_FILE, ScheduleSearch.from_dict, "schedule search")
    started = _connect()
    try:
        if callbacks:
            raise ValueError("callbacks cannot change on restore: Tune restores the experiment's own")
        tuner = tune.Tuner.restore(
            path,
            trainable=_trainable(search),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=True,
            storage_filesystem=fs,
        )
        results = tuner.fit()
        _release_all(search.out)
        return _finish(search, results)
    finally:
        if started:
            import ray

            ray.shutdown()


def _absolute(uri: str) -> str:
    # Tune and Train run the trial in other working directories: local paths must be absolute.
    return storage.split_scheme(uri)[1] if storage.is_local(uri) else uri


def _connect() -> bool:
    """Connect to `RAY_ADDRESS` or start a local cluster; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    env = storage.worker_env()
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False,
        runtime_env={"env_vars": env} if env else None,
    )
    return True


def _prepare_reference(search: ScheduleSearch) -> None:
    """Compute (and cache on storage) the FID reference statistics once, before the trials read them."""
    from ..evaluation.features import build_extractor
    from ..evaluation.fid import reference_stats

    extractor = build_extractor("domain", weights=search.classifier)
    reference_stats(search.data, extractor, split="train", cache_uri=storage.join(search.out, STATS_DIR))


def _experiment(settings: Any) -> tuple[str, Any]:
    """Tune's experiment folder (and filesystem) of a search or sweep: `{out}/tune/{name}`."""
    from ..training.ray_train import ray_storage

    storage_path, fs = ray_storage(storage.join(settings.out, TUNE_DIR))
    return f"{storage_path.rstrip('/')}/{settings.name}", fs


def _restorable(out: str, settings_file: str, from_dict: Callable[[dict], Any],
                kind: str) -> tuple[Any, str, Any]:
    """The saved settings of the search or sweep under `out`, and its restorable Tune experiment."""
    from ray import tune

    uri = storage.join(out, settings_file)
    if not storage.exists(uri):
        raise ValueError(f"out={out}: no {settings_file}; is it the folder of a {kind}?")
    settings = from_dict(storage.read_json(uri))
    path, fs = _experiment(settings)
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise ValueError(f"out={out}: no restorable Tune experiment at {path}")
    return settings, path, fs


def _trainable(search: ScheduleSearch) -> Any:
    from ray import tune

    fn = tune.with_parameters(schedule_trial, search=search.to_dict())
    return tune.with_resources(fn, {"CPU": search.trial_cpus})


def _tuner(
    search: ScheduleSearch, space: dict[str, spaces.Dim], concurrent: int, callbacks: Sequence[Any]
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from ..training.ray_train import ray_storage

    storage_path, fs = ray_storage(storage.join(search.out, TUNE_DIR))
    # A trial that reaches `steps` should end by itself, not be killed at its final report (before its
    # run exports the EMA weights): no forced stop at max_t, and no rung so late that the final report
    # is the first to reach it.
    grace = search.grace_period or search.report_every
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=max(grace, search.steps - search.report_every),
        grace_period=grace,
        reduction_factor=search.reduction_factor,
        stop_last_trials=False,
    )
    return tune.Tuner(
        _trainable(search),
        param_space=spaces.to_param_space(space),
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            scheduler=scheduler,
            num_samples=search.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=search.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            callbacks=[_release_callback(search.out), *callbacks],
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def _finish(search: ScheduleSearch, results: Any) -> ScheduleSearchResult:
    from .report import best_row, schedule_rows, write_schedule_report

    rows = schedule_rows(search, results)
    best = best_row(rows, search.metric, search.mode, steps=search.steps)
    # An interrupted search may not even have generated all its trials: count against the grid.
    expected = spaces.num_grid_points(spaces.parse_space(search.space)) * search.num_samples
    complete = results.num_terminated + results.num_errors == expected
    path, _ = _experiment(search)
    report = write_schedule_report(search, rows, best, complete=complete)
    if best is not None:
        storage.write_json(storage.join(search.out, "best.json"), best)
    return ScheduleSearchResult(
        rows=rows,
        best=best,
        metric=search.metric,
        mode=search.mode,
        complete=complete,
        experiment=path,
        report=report,
    )


def load_trial(out: str, trial_id: str) -> dict[str, Any]:
    """A trial's record (point, resolved point, TrainConfig) and its attempts, from storage."""
    uri = trial_uri(out, trial_id)
    rec = (
        storage.read_json(storage.join(uri, TRIAL_FILE))
        if storage.exists(storage.join(uri, TRIAL_FILE))
        else {"trial_id": trial_id}
    )
    attempts = storage.join(uri, ATTEMPTS_DIR)
    rec["attempts"] = len(storage.listdir(attempts)) if storage.exists(attempts) else 0
    result = storage.join(uri, RESULT_FILE)
    rec["finished"] = storage.read_json(result) if storage.exists(result) else None
    return rec


__all__ = [
    "EVALUATIONS",
    "METRIC_MODES",
    "ScheduleSearch",
    "ScheduleSearchResult",
    "TrialEvaluator",
    "concurrent_trials",
    "load_trial",
    "max_concurrent_trials",
    "reported_metrics",
    "restore_schedules",
    "schedule_trial",
    "search_schedules",
    "validate_search",
]
