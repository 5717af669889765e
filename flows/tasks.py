"""Prefect tasks: each calls one `pipeline.stages` function and publishes what it made to the UI.

Tasks return small dicts of URIs and numbers, never tensors or models. Storage and network errors
are retried with exponential backoff; bad input (ValueError) fails at once, since retrying cannot
fix it.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import INPUTS
from prefect.tasks import exponential_backoff

from pipeline import stages, storage

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


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _link(uri: str, text: str, key: str) -> None:
    link = uri if "://" in uri else "file://" + os.path.abspath(uri)
    create_link_artifact(link=link, link_text=text, key=_key(key))


@task(name="shard", cache_policy=INPUTS, persist_result=True, **RETRY)
def shard_task(source: str, data: str, shard_size: int = 1000, test_fraction: float | None = None,
               seed: int = 0) -> dict[str, Any]:
    res = stages.shard_stage(source, data, shard_size=shard_size, test_fraction=test_fraction, seed=seed)
    create_markdown_artifact(
        f"### Dataset `{data}`\n\n" + _table([
            ("source", source), ("train images", res["counts"]["train"]),
            ("test images", res["counts"]["test"]),
            ("image shape", "×".join(map(str, res["image_shape"]))), ("levels", res["levels"]),
            ("shards written / kept", f"{res['written']} / {res['kept']}"),
            ("manifest sha256", res["manifest_sha256"][:16] + "…")]),
        key="dataset", description="WebDataset shards and manifest")
    return res


@task(name="train", **RETRY)
def train_task(config: dict[str, Any], data: str, out: str, workers: int = 1, gpus_per_worker: float = 0.0,
               report_every: int = 100, checkpoint_every: int = 500) -> dict[str, Any]:
    res = stages.train_stage(config, data, out, workers=workers, gpus_per_worker=gpus_per_worker,
                             report_every=report_every, checkpoint_every=checkpoint_every)
    m = res.get("metrics") or {}
    rows = [("preset", config.get("preset")), ("loss", config.get("loss")), ("sde", config.get("sde")),
            ("step", res["step"]), ("workers × GPUs", f"{workers} × {gpus_per_worker:g}")]
    rows += [(k, m[k]) for k in ("loss", "grad_norm", "lr", "img_per_s", "skipped_steps") if k in m]
    if res.get("skipped"):
        rows.append(("note", "already trained to this step: skipped"))
    create_markdown_artifact("### Training\n\n" + _table(rows), key="training", description="DSM training")
    _link(res["ema"], "EMA weights", "ema-weights")
    if res.get("ray_path"):
        _link(res["ray_path"], "Ray Train run storage", "ray-run")
    return res


@task(name="domain-classifier", **RETRY)
def classifier_task(data: str, out: str, epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    res = stages.classifier_stage(data, out, epochs=epochs, seed=seed)
    create_markdown_artifact(f"### Domain classifier\n\n{_table([('test accuracy', res['test_accuracy'])])}",
                             key="domain-classifier")
    return res


@task(name="sample", **RETRY)
def sample_task(checkpoint: str, out: str, n: int, method: str = "heun", steps: int = 32,
                guidance: float = 0.0, seed: int = 0, workers: int = 0) -> dict[str, Any]:
    res = stages.sample_stage(checkpoint, out, n=n, method=method, steps=steps, guidance=guidance, seed=seed,
                              workers=workers)
    create_markdown_artifact(
        "### Samples\n\n" + _table([(k, res[k]) for k in ("n", "method", "steps", "nfe_per_sample",
                                                         "guidance_w", "seconds")]), key="samples")
    _link(res["grid"], "sample grid (PNG)", "sample-grid")
    return res


@task(name="fid", **RETRY)
def fid_task(samples: str, data: str, out: str, classifier: str | None = None,
             kid_subset_size: int = 1000) -> dict[str, Any]:
    res = stages.fid_stage(samples, data, out, classifier=classifier, kid_subset_size=kid_subset_size)
    from pipeline.evaluation.report import markdown_report

    create_markdown_artifact(markdown_report(res), key="fid", description="FID/KID with provenance")
    return {k: res[k] for k in ("fid", "kid", "floor", "n", "report_uris") if k in res}


@task(name="likelihood", **RETRY)
def likelihood_task(checkpoint: str, data: str, out: str, max_samples: int = 256, batch_size: int = 64,
                    elbo_samples: int = 16, rtol: float = 1e-5, atol: float = 1e-5) -> dict[str, Any]:
    res = stages.likelihood_stage(checkpoint, data, out, max_samples=max_samples, batch_size=batch_size,
                                  elbo_samples=elbo_samples, rtol=rtol, atol=atol)
    create_markdown_artifact(storage.read_bytes(storage.join(out, "likelihood.md")).decode(),
                             key="likelihood", description="bits/dim: probability-flow ODE and ELBO")
    return res


@task(name="guidance-sweep", **RETRY)
def guidance_task(checkpoint: str, data: str, classifier: str, out: str, weights: list[float],
                  steps: int = 16, n: int = 200, seed: int = 0) -> dict[str, Any]:
    res = stages.guidance_stage(checkpoint, data, classifier, out, weights=tuple(weights), steps=(steps,),
                                n=n, seed=seed)
    lines = ["### Guidance sweep (FID and classifier precision versus w)", "",
             "| sampler | steps | w | FID | precision | NFE |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['w']:g} | {r['fid']:.3f} | {r['precision']:.3f} | "
              f"{r['nfe']} |" for r in res["rows"] if r["fid"] is not None]
    lines += ["", f"best w = {res['best']['w']:g} (FID {res['best']['fid']:.3f})"]
    create_markdown_artifact("\n".join(lines), key="guidance-sweep", description="FID versus w")
    _link(res["report"]["plot"], "FID versus w (PNG)", "fid-vs-w")
    return res
