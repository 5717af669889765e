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
import functools
import itertools
import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from .. import raykit, storage
from ..config import TrainConfig
from . import spaces, store
from .search import ScheduleSearch, max_concurrent_trials, validate_search

# ---- the Tune trial -----------------------------------------------------------------------------


def trial_point(config: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(point, folder) of a Tune trial's config: a restore sends {"restore": {"point", "folder"}} so that
    an unfinished trial continues in its own folder (from its last Train checkpoint); a fresh trial's
    config is the point itself and its folder is its Tune trial id."""
    r = config.get("restore")
    if isinstance(r, dict):
        return dict(r["point"]), r.get("folder")
    return dict(config), None


def schedule_trial(config: dict[str, Any], *, search: dict[str, Any]) -> None:
    """One Tune trial: build and fit a TorchTrainer for the point `config` (Ray Train V2's pattern)."""
    from ..evaluation.scoring import TrialEvaluator
    from ..training.ray_train import train

    s = ScheduleSearch.from_dict(search)
    config, folder = trial_point(config)
    trial_id = folder or raykit.trial_id()
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


def _trial_ended(out: str, trial_id: str, config: dict[str, Any], status: str, last: dict[str, Any]) -> None:
    """On the driver when Tune ends a trial: record it as done (or errored) and free its workers."""
    point, folder = trial_point(config)
    folder = folder or trial_id
    store.write_status(out, folder, status, point, last)
    raykit.release_placement_group(store.trial_uri(out, folder))


# ---- what a search still owes (its own JSON, never Tune's pickled state) --------------------------


def _grid_key(point: dict[str, Any], names: Sequence[str]) -> str:
    return json.dumps([point.get(n) for n in names])


def _tally(search: ScheduleSearch) -> tuple[dict[str, Any], Counter, Counter, dict[str, list]]:
    """Per grid combination (key → its values): trials finished, trials ended (finished or errored),
    and the unfinished ones as (folder, point), oldest first."""
    space = spaces.parse_space(search.space)
    names = [n for n, d in space.items() if d.kind == "grid"]
    combos = {_grid_key(dict(zip(names, c, strict=True)), names): dict(zip(names, c, strict=True))
              for c in itertools.product(*(space[n].values for n in names))}
    finished: Counter = Counter()
    ended: Counter = Counter()
    unfinished: dict[str, list] = defaultdict(list)
    for trial_id in sorted(store.trial_ids(search.out)):
        rec = store.load_trial(search.out, trial_id)
        if not isinstance(rec.get("point"), dict):
            continue  # a trial that was stopped before it recorded its point: its place is redrawn
        key, status = _grid_key(rec["point"], names), (rec["ended"] or {}).get("status")
        finished[key] += status == "TERMINATED"
        ended[key] += status in ("TERMINATED", "ERROR")
        if status != "TERMINATED":
            unfinished[key].append((trial_id, rec["point"]))
    return combos, finished, ended, unfinished


def pending_trials(search: ScheduleSearch, rng: random.Random | None = None) -> list[dict[str, Any]]:
    """The trials a search still owes, as restore configs {"point", "folder"}: per grid combination,
    `num_samples` minus the finished ones; unfinished trials continue in their folder (errored ones
    restart there), and trials that never started get a fresh draw of the non-grid dimensions."""
    space = spaces.parse_space(search.space)
    rng = rng or random.Random()
    combos, finished, _, unfinished = _tally(search)
    todo = []
    for key, grid in combos.items():
        need = max(search.num_samples - finished[key], 0)
        for folder, point in unfinished[key][:need]:
            todo.append({"point": point, "folder": folder})
        todo += [{"point": spaces.draw_point(space, grid, rng), "folder": None}
                 for _ in range(need - len(unfinished[key][:need]))]
    return todo


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
        raykit.tune_fit(
            _trainable(search), param_space=spaces.to_param_space(parsed), out=search.out, name=search.name,
            metric=search.metric, mode=search.mode, max_concurrent=concurrent, num_samples=search.num_samples,
            asha=_asha(search), callbacks=[*_callbacks(search), *callbacks])
        _release_all(search.out)
        return _finish(search)


def restore_schedules(out: str, callbacks: Sequence[Any] = ()) -> ScheduleSearchResult:
    """Finish an interrupted search under `out` (which wins over the `out` recorded in search.json)
    from the search's own JSON: unfinished trials continue from their last Train checkpoint, errored
    ones restart, finished ones are kept, never-started ones are drawn. Tune's pickled experiment
    state is never read (see `raykit.saved_settings`); ASHA's rungs start afresh for the re-run."""
    search = raykit.saved_settings(raykit.absolute(out), store.SEARCH_FILE, ScheduleSearch.from_dict,
                                   "schedule search")
    todo = pending_trials(search)
    if not todo:
        return _finish(search)
    validate_search(search)
    with raykit.session():
        concurrent = max_concurrent_trials(search)
        storage.write_json(storage.join(search.out, store.SEARCH_FILE), search.to_dict())
        raykit.tune_fit(
            _trainable(search), param_space={"restore": raykit.search_dim("grid", todo)}, out=search.out,
            name=raykit.restore_name(search.name), metric=search.metric, mode=search.mode,
            max_concurrent=concurrent, asha=_asha(search), callbacks=[*_callbacks(search), *callbacks])
        _release_all(search.out)
        return _finish(search)


def _callbacks(search: ScheduleSearch) -> list[Any]:
    return [raykit.trial_end_callback(functools.partial(_trial_ended, search.out))]


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


def _finish(search: ScheduleSearch) -> ScheduleSearchResult:
    """Rows from the search's own records on storage (every run and restore of it)."""
    from .report import best_row, schedule_rows, write_schedule_report

    trials = []
    for trial_id in store.trial_ids(search.out):
        rec = store.load_trial(search.out, trial_id)
        if isinstance(rec.get("point"), dict):
            ended = rec["ended"] or {}
            trials.append(SimpleNamespace(trial_id=trial_id, config=rec["point"],
                                          status=ended.get("status", "INTERRUPTED"),
                                          last_result=ended.get("last_result") or {}))
    rows = schedule_rows(search, trials)
    best = best_row(rows, search.metric, search.mode, steps=search.steps)
    # An interrupted search may not even have started all its trials: count against the grid.
    combos, _, ended, _ = _tally(search)
    complete = all(ended[key] >= search.num_samples for key in combos)
    report = write_schedule_report(search, rows, best, complete=complete)
    if best is not None:
        storage.write_json(storage.join(search.out, store.BEST_FILE), best)
    return ScheduleSearchResult(rows=rows, best=best, metric=search.metric, mode=search.mode,
                                complete=complete, report=report,
                                experiment=raykit.experiment_path(search.out, search.name)[0])


__all__ = ["ScheduleSearchResult", "pending_trials", "restore_schedules", "schedule_trial",
           "search_schedules", "trial_point"]
