"""Prefect tasks: each calls one `pipeline.stages` function and publishes what it made to the UI.

Tasks return small dicts of URIs and numbers, never tensors or models. Storage and network errors
are retried with exponential backoff; bad input (ValueError) fails at once, since retrying cannot
fix it.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import INPUTS
from prefect.tasks import exponential_backoff

from pipeline import reports, stages
from pipeline.config import RunOptions

RETRIES = int(os.environ.get("PIPELINE_TASK_RETRIES", "3"))
RETRY_BASE_S = float(os.environ.get("PIPELINE_RETRY_BASE_S", "2"))
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts, throttling: an OSError that is not a missing or forbidden object."""
    return isinstance(exc, OSError) and not isinstance(exc, PERMANENT)


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


RETRY = {"retries": RETRIES, "retry_delay_seconds": exponential_backoff(backoff_factor=RETRY_BASE_S),
         "retry_jitter_factor": 0.2, "retry_condition_fn": _retry_transient}


def _key(name: str) -> str:
    # Artifact keys: lowercase letters, digits and dashes.
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _link(uri: str, text: str, key: str) -> None:
    link = uri if "://" in uri else "file://" + os.path.abspath(uri)
    create_link_artifact(link=link, link_text=text, key=_key(key))


def publish(res: dict[str, Any], key: str, description: str | None = None) -> dict[str, Any]:
    """Publish a stage result's markdown as the artifact `key`; return the result without it (task
    results stay small: URIs and numbers)."""
    res = dict(res)
    markdown = res.pop("markdown", None)
    if markdown:
        create_markdown_artifact(markdown, key=_key(key), description=description)
    return res


@task(name="shard", cache_policy=INPUTS, persist_result=True, **RETRY)
def shard_task(source: str, data: str, shard_size: int = 1000, test_fraction: float | None = None,
               seed: int = 0) -> dict[str, Any]:
    res = stages.shard_stage(source, data, shard_size=shard_size, test_fraction=test_fraction, seed=seed)
    return publish(res, "dataset", "WebDataset shards and manifest")


class LiveBar:
    """A progress artifact in the Prefect UI, fed {"step", "total"}; it is written only when the whole
    percentage changes (a 500-step sampler makes at most 100 API calls, not 500)."""

    def __init__(self, key: str, description: str) -> None:
        self.key, self.description = key, description
        self.bar: Any = None
        self.shown = -1

    def __call__(self, p: dict[str, Any]) -> None:
        done = 100.0 * p["step"] / max(p["total"], 1)
        if int(done) == self.shown:
            return
        self.shown = int(done)
        if self.bar is None:
            self.bar = create_progress_artifact(done, key=self.key, description=self.description)
        else:
            update_progress_artifact(self.bar, done)


class _LiveTraining:
    """Progress bar and live metrics table of a training run in the Prefect UI, updated at each report."""

    def __init__(self) -> None:
        self.bar = LiveBar("training-progress", "training steps done / total (%)")

    def __call__(self, p: dict[str, Any]) -> None:
        self.bar(p)
        create_markdown_artifact(reports.progress_markdown(p), key="training-live",
                                 description="training metrics at the latest report")


@task(name="train", **RETRY)
def train_task(config: dict[str, Any], data: str, out: str, options: dict[str, Any]) -> dict[str, Any]:
    res = stages.train_stage(config, data, out, options=RunOptions(**options), on_progress=_LiveTraining())
    res = publish(res, "training", "DSM training")
    _link(res["ema"], "EMA weights", "ema-weights")
    if res.get("ray_path"):
        _link(res["ray_path"], "Ray Train run storage", "ray-run")
    return res


@task(name="domain-classifier", **RETRY)
def classifier_task(data: str, out: str, epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    return publish(stages.classifier_stage(data, out, epochs=epochs, seed=seed), "domain-classifier")


@task(name="sample", **RETRY)
def sample_task(checkpoint: str, out: str, n: int, method: str = "heun", steps: int = 32,
                guidance: float = 0.0, seed: int = 0, workers: int = 0, levels: int = 256) -> dict[str, Any]:
    res = publish(stages.sample_stage(checkpoint, out, n=n, method=method, steps=steps, guidance=guidance,
                                      seed=seed, workers=workers, levels=levels), "samples")
    _link(res["grid"], "sample grid (PNG)", "sample-grid")
    return res


@task(name="fid", **RETRY)
def fid_task(samples: str, data: str, out: str, classifier: str | None = None,
             kid_subset_size: int = 1000) -> dict[str, Any]:
    res = stages.fid_stage(samples, data, out, classifier=classifier, kid_subset_size=kid_subset_size)
    return publish(res, "fid", "FID/KID with provenance")


@task(name="likelihood", **RETRY)
def likelihood_task(checkpoint: str, data: str, out: str, max_samples: int = 256,
                    elbo_samples: int = 16) -> dict[str, Any]:
    res = stages.likelihood_stage(checkpoint, data, out, max_samples=max_samples, elbo_samples=elbo_samples)
    return publish(res, "likelihood", "bits/dim: probability-flow ODE and ELBO")


@task(name="guidance-sweep", **RETRY)
def guidance_task(checkpoint: str, data: str, classifier: str, out: str, weights: list[float],
                  steps: int = 16, n: int = 200, seed: int = 0) -> dict[str, Any]:
    res = stages.guidance_stage(checkpoint, data, classifier, out, weights=tuple(weights), steps=(steps,),
                                n=n, seed=seed)
    res = publish(res, "guidance-sweep", "FID versus w")
    _link(res["report"]["plot"], "FID versus w (PNG)", "fid-vs-w")
    return res


@task(name="schedule-search", **RETRY)
def schedule_search_task(space: dict[str, Any], base: dict[str, Any], data: str, out: str,
                         options: dict[str, Any]) -> dict[str, Any]:
    res = stages.schedule_search_stage(space, base, data, out, **options)
    return publish(res, "schedule-search", "noise schedules and weightings: report, Pareto, learning curves")


@task(name="ema-search", **RETRY)
def ema_task(run: str, data: str, classifier: str, out: str, options: dict[str, Any]) -> dict[str, Any]:
    return publish(stages.ema_search_stage(run, data, classifier, out, **options), "ema-search",
                   "post-hoc EMA: FID versus σ_rel")


@task(name="report")
def summary_task(summary: dict[str, Any]) -> dict[str, Any]:
    return publish(stages.summary_stage(summary), "pipeline-report", "the run at a glance")
