"""Schedule search: Ray Tune trials over noise processes and loss weightings, each trial a Ray Train run.

Follows Ray Train V2's pattern: a Tune trial function builds and fits a `TorchTrainer` (through
`training.ray_train.train`), whose rank-0 reports reach Tune through the report callback. At every
report the worker scores its EMA model on held-out data (`evaluation.scoring.TrialEvaluator`), and ASHA
(Li et al. 2020) stops trials whose chosen metric falls behind at a rung.

Settings and validation live in search.py, the storage layout in store.py, Ray in `pipeline.raykit`.

Concurrency: Tune places only the trial function (`trial_cpus`); each trial's Train workers take
`workers × (cpus_per_worker, gpus_per_worker)` from a placement group of their own. The number of
concurrent trials is derived from the cluster's GPUs (CPUs on CPU-only clusters) and enforced with
`max_concurrent_trials`; asking for more than fit is an error before any trial starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import raykit, storage
from ..config import TrainConfig
from . import spaces, store
from .search import ScheduleSearch, max_concurrent_trials, validate_search

# ---- the Tune trial -----------------------------------------------------------------------------


def schedule_trial(config: dict[str, Any], *, search: dict[str, Any]) -> None:
    """One Tune trial: build and fit a TorchTrainer for the point `config` (Ray Train V2's pattern)."""
    from ..evaluation.scoring import TrialEvaluator
    from ..training.ray_train import train

    s = ScheduleSearch.from_dict(search)
    trial_id = raykit.trial_id()
    out = store.trial_uri(s.out, trial_id)
    store.record_attempt(s.out, trial_id)
    cfg = spaces.trial_config(config, TrainConfig.from_dict(s.base))
    store.write_trial(s.out, trial_id, {"point": config, "resolved": spaces.resolve(config),
                                        "train_config": cfg.to_dict()})
    evaluator = TrialEvaluator(s.data, s.scoring(), classifier=s.classifier,
                               stats_cache=storage.join(s.out, store.STATS_DIR))
    res = train(cfg, data=s.data, out=out, options=s.run_options(), run_name=f"train-{trial_id}",
                callbacks=[raykit.train_report_callback()], evaluate=evaluator,
                on_step=raykit.PlacementGroupRecorder(storage.join(out, raykit.PLACEMENT_FILE)))
    store.write_result(s.out, trial_id, {"step": res.step, "metrics": _jsonable(res.metrics),
                                         "checkpoint": res.checkpoint, "ema": res.ema})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _release_all(out: str) -> None:
    for trial_id in store.trial_ids(out):
        raykit.release_placement_group(store.trial_uri(out, trial_id))


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


def search_schedules(space: dict[str, Any] | str, *, base: TrainConfig, data: str, out: str,
                     callbacks: Sequence[Any] = (), **options: Any) -> ScheduleSearchResult:
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
    search = ScheduleSearch(space=dict(space), base=base.to_dict(), data=raykit.absolute(data),
                            out=raykit.absolute(out), **options)
    parsed, _ = validate_search(search)
    with raykit.session():
        concurrent = max_concurrent_trials(search)
        if "fid" in search.evaluations:
            _prepare_reference(search)
        storage.write_json(storage.join(search.out, store.SEARCH_FILE), search.to_dict())
        results = raykit.tune_fit(
            _trainable(search), param_space=spaces.to_param_space(parsed), out=search.out, name=search.name,
            metric=search.metric, mode=search.mode, max_concurrent=concurrent, num_samples=search.num_samples,
            asha=_asha(search),
            callbacks=[raykit.release_callback(lambda tid: store.trial_uri(search.out, tid)), *callbacks])
        _release_all(search.out)
        return _finish(search, results)


def restore_schedules(out: str) -> ScheduleSearchResult:
    """Resume an interrupted search from its storage: unfinished trials run (continuing from their
    last Train checkpoint), errored ones restart, finished ones are kept as they are."""
    search, path, fs = raykit.restorable(raykit.absolute(out), store.SEARCH_FILE, ScheduleSearch.from_dict,
                                         "schedule search")
    with raykit.session():
        results = raykit.tune_restore(path, fs, _trainable(search))
        _release_all(search.out)
        return _finish(search, results)


def _asha(search: ScheduleSearch) -> dict[str, Any]:
    # A trial that reaches `steps` should end by itself, not be killed at its final report (before its
    # run exports the EMA weights): no forced stop at max_t, and no rung so late that the final report
    # is the first to reach it.
    grace = search.grace_period or search.report_every
    return {"max_t": max(grace, search.steps - search.report_every), "grace_period": grace,
            "reduction_factor": search.reduction_factor, "stop_last_trials": False}


def _prepare_reference(search: ScheduleSearch) -> None:
    """Compute (and cache on storage) the FID reference statistics once, before the trials read them."""
    from ..evaluation.features import build_extractor
    from ..evaluation.fid import reference_stats

    extractor = build_extractor("domain", weights=search.classifier)
    reference_stats(search.data, extractor, split="train",
                    cache_uri=storage.join(search.out, store.STATS_DIR))


def _trainable(search: ScheduleSearch) -> Any:
    return raykit.trainable(schedule_trial, {"CPU": search.trial_cpus}, search=search.to_dict())


def _finish(search: ScheduleSearch, results: Any) -> ScheduleSearchResult:
    from .report import best_row, schedule_rows, write_schedule_report

    rows = schedule_rows(search, raykit.trials_of(results))
    best = best_row(rows, search.metric, search.mode, steps=search.steps)
    # An interrupted search may not even have generated all its trials: count against the grid.
    expected = spaces.num_grid_points(spaces.parse_space(search.space)) * search.num_samples
    complete = results.num_terminated + results.num_errors == expected
    report = write_schedule_report(search, rows, best, complete=complete)
    if best is not None:
        storage.write_json(storage.join(search.out, store.BEST_FILE), best)
    return ScheduleSearchResult(rows=rows, best=best, metric=search.metric, mode=search.mode,
                                complete=complete, report=report,
                                experiment=raykit.experiment_path(search.out, search.name)[0])


__all__ = ["ScheduleSearchResult", "restore_schedules", "schedule_trial", "search_schedules"]
