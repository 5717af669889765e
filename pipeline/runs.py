"""Per-run roots of scheduled runs: root templates, the `latest` pointer, and the continuation mode.

A deployment's root is a template resolved once per flow run, e.g. `s3://bucket/runs/{deployment}/{date}`
(fields: `ROOT_FIELDS`). The roots of one template form a *series*: the folder above the first path
component that changes from run to run (here `s3://bucket/runs/nightly-cifar10`). Each completed run
points `{series}/latest.json` at itself, so "the newest nightly" has a stable address.

Two modes (`MODES`):
- "fresh": train the recipe from scratch into this run's own root;
- "continue": advance the newest run of the series by N more optimiser steps from its last checkpoint,
  then evaluate it again (EDM2's `slice_nimg`: a long training advanced a slice per night). It writes
  into that run's root, never into a new one.

Nothing here talks to Prefect: the flow reads the run's identity from Prefect's runtime and hands it in.
"""

from __future__ import annotations

import datetime as dt
import re
import string
from dataclasses import dataclass
from typing import Any

from . import storage
from .config import TrainConfig
from .layout import RunLayout

MODES = ("fresh", "continue")
ROOT_FIELDS: dict[str, str] = {
    "date": "the scheduled start date, YYYY-MM-DD (UTC)",
    "time": "the scheduled start time of day, HHMMSS (UTC)",
    "datetime": "the scheduled start, YYYYMMDDTHHMMSSZ (UTC)",
    "flow_run_id": "the Prefect flow-run id (a UUID)",
    "deployment": "the deployment's name ('manual' for a run outside a deployment)",
}
# Fields whose value changes with the scheduled time or the run; `deployment` does not.
PER_RUN_FIELDS = ("date", "time", "datetime", "flow_run_id")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class RunIdentity:
    """Who this run is: its scheduled start (timezone-aware), flow-run id and deployment name (or None)."""

    scheduled_start: dt.datetime
    flow_run_id: str
    deployment: str | None = None

    def fields(self) -> dict[str, str]:
        """The values of `ROOT_FIELDS` for this run."""
        t = self.scheduled_start
        t = t.astimezone(dt.timezone.utc) if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
        name = _SLUG.sub("-", self.deployment).strip("-") if self.deployment else "manual"
        return {"date": t.strftime("%Y-%m-%d"), "time": t.strftime("%H%M%S"),
                "datetime": t.strftime("%Y%m%dT%H%M%SZ"), "flow_run_id": str(self.flow_run_id),
                "deployment": name or "manual"}


def template_fields(template: str) -> tuple[str, ...]:
    """The fields `template` uses, in order; ValueError naming an unknown one and listing the known."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # an unmatched brace
        raise ValueError(f"root template {template!r}: {e} (write a literal brace twice)") from e
    used = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in ROOT_FIELDS:
            shown = "{" + name + "}" if name else "{} (a field needs a name)"
            raise ValueError(f"root template {template!r}: unknown field {shown}; known fields: "
                             + ", ".join("{" + k + "}" for k in ROOT_FIELDS))
        if spec or conversion:
            raise ValueError(f"root template {template!r}: field {{{name}}} takes no format spec or "
                             "conversion")
        used.append(name)
    return tuple(used)


def resolve_root(template: str, run: RunIdentity) -> str:
    """This run's root: `template` with its fields filled in (a root without fields is kept as is)."""
    template_fields(template)
    return template.format(**run.fields())


def varies_per_run(template: str) -> bool:
    """Whether two runs at different scheduled times can get different roots from `template`."""
    return any(f in PER_RUN_FIELDS for f in template_fields(template))


def series_of(template: str, run: RunIdentity) -> str:
    """The folder holding the per-run roots of `template`: its path before the first component that
    uses a per-run field, with the other fields filled in. ValueError for a root without such a field."""
    if not varies_per_run(template):
        raise ValueError(f"root template {template!r} has no per-run field "
                         f"({', '.join('{' + f + '}' for f in PER_RUN_FIELDS)}): it is a single root")
    scheme, sep, path = template.rpartition("://") if "://" in template else ("", "", template)
    parts = path.split("/")
    cut = next(i for i, p in enumerate(parts) if any(f in PER_RUN_FIELDS for f in template_fields(p)))
    head = "/".join(parts[:cut]) or ("/" if path.startswith("/") else ".")
    return f"{scheme}{sep}{head}".format(**run.fields())


@dataclass(frozen=True)
class RunPlan:
    """Where a flow run writes and how: the resolved `root`, its `mode`, and `warnings` for the log."""

    template: str
    root: str
    mode: str
    run: RunIdentity
    series: str | None
    warnings: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        return {"template": self.template, "root": self.root, "mode": self.mode,
                "flow_run_id": self.run.flow_run_id, "deployment": self.run.deployment,
                "scheduled_start": _iso(self.run.scheduled_start)}


def _iso(t: dt.datetime) -> str:
    t = t.astimezone(dt.timezone.utc) if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_run(template: str, run: RunIdentity, *, mode: str = "fresh") -> RunPlan:
    """Resolve this run's root (fresh) or the newest run's (continue), before any stage runs.

    ValueError for an unknown mode or template field, or a continuation with no run to continue."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    per_run = varies_per_run(template)
    series = series_of(template, run) if per_run else None
    warnings: list[str] = []
    if mode == "continue":
        root = read_latest(series)["root"] if series else resolve_root(template, run)
        return RunPlan(template, root, mode, run, series)
    root = resolve_root(template, run)
    if run.deployment and not per_run:
        warnings.append(
            f"root {template!r} resolves to the same root {root} for every scheduled time: a later run "
            "finds this one's finished stages and adds nothing new. Put {datetime} or {date} in the root, "
            "or use mode='continue' to advance one run on purpose.")
    return RunPlan(template, root, mode, run, series, tuple(warnings))


def read_latest(series: str) -> dict[str, Any]:
    """The newest completed run of `series` (its `latest.json`); ValueError when there is none."""
    uri = RunLayout.latest(series)
    if not storage.exists(uri):
        raise ValueError(f"mode='continue': no completed run under {series} ({uri} is missing); "
                         "start the series with mode='fresh'")
    return storage.read_json(uri)


def record_start(plan: RunPlan) -> list[str]:
    """Append this run to its root's runs.json (call it holding the root's lease); returns a warning
    when a fresh run lands in a root that an earlier scheduled time already used."""
    uri = RunLayout(plan.root).runs_log
    runs = storage.read_json(uri) if storage.exists(uri) else []
    mine = plan.record()
    warnings = []
    earlier = [r for r in runs if r.get("scheduled_start") != mine["scheduled_start"]]
    if plan.mode == "fresh" and earlier:
        last = earlier[-1]
        warnings.append(
            f"root {plan.root} (from {plan.template!r}) was already used by the run scheduled at "
            f"{last['scheduled_start']} (flow run {last['flow_run_id']}): this run resumes or skips its "
            "finished stages instead of starting anew. Make the root vary per run ({datetime} or "
            "{flow_run_id}), or use mode='continue' to advance that run on purpose.")
    storage.write_json(uri, [*runs, mine])
    return warnings


def write_latest(plan: RunPlan) -> str | None:
    """Point `{series}/latest.json` at this completed run, unless a run scheduled later already is;
    returns the pointer's URI (None for a root that is not a series)."""
    if plan.series is None:
        return None
    uri = RunLayout.latest(plan.series)
    mine = {**plan.record(), "completed": _iso(dt.datetime.now(dt.timezone.utc))}
    if storage.exists(uri) and storage.read_json(uri).get("scheduled_start", "") > mine["scheduled_start"]:
        return uri
    storage.write_json(uri, mine)
    return uri


def continuation_config(train_dir: str, more_steps: int) -> tuple[TrainConfig, int]:
    """(the newest run's training config with `steps` = its last checkpoint step + `more_steps`, that
    step): continuing it resumes from that checkpoint and stops exactly `more_steps` later."""
    from .training.checkpoint import list_checkpoints, load_checkpoint

    if isinstance(more_steps, bool) or not isinstance(more_steps, int) or more_steps < 1:
        raise ValueError(f"train.slice_steps must be an integer >= 1, got {more_steps!r}")
    found = list_checkpoints(train_dir)
    if not found:
        raise ValueError(f"mode='continue': {train_dir} holds no checkpoint to continue from; start the "
                         "run with mode='fresh'")
    step, uri = found[-1]
    config = TrainConfig.from_dict(load_checkpoint(uri)["config"])
    return config.replace(steps=step + more_steps), step


__all__ = ["MODES", "PER_RUN_FIELDS", "ROOT_FIELDS", "RunIdentity", "RunPlan", "continuation_config",
           "plan_run", "read_latest", "record_start", "resolve_root", "series_of", "template_fields",
           "varies_per_run", "write_latest"]
