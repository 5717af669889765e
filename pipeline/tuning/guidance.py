"""Guidance sweep: classifier-free guidance weight w × sampler × NFE on one trained conditional
checkpoint, no retraining, each point a Ray Tune trial scored by FID and a precision proxy.

Every point draws the same samples: sample i starts from the x_T seeded by seed + i and is conditioned
on class i mod K (`evaluation.sampling`'s rules), so points differ only in w, sampler and steps. The
guided score is (1 + w) s(x, t, c) − w s(x, t, ∅) (Ho & Salimans 2022, eq. 6), which at w = 0 is the
conditional model itself. A point is scored by FID against the data's reference statistics in the
domain classifier's features, and by that classifier's accuracy on the labels the samples were
conditioned on (the precision proxy: guidance trades diversity for samples the classifier recognises).

Storage, under `out`: `sweep.json`, `tune/{name}/` (restorable), `points/{sampler}-s{steps}-w{w}/`
(`samples.pt`: the float samples, their labels and seeds; `score.json`), `fid-stats/` and the report
(`report.md`, `report.json`, `fid_vs_w.png`, with the best w per sampler and NFE).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import storage
from .schedules import TUNE_DIR, _absolute, _experiment

SWEEP_FILE = "sweep.json"
POINTS_DIR = "points"


@dataclass(frozen=True, kw_only=True)
class GuidanceSweep:
    """The settings of a sweep; saved as sweep.json so that a restore rebuilds it."""

    checkpoint: str
    data: str
    classifier: str
    out: str
    weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    samplers: tuple[str, ...] = ("heun",)
    steps: tuple[int, ...] = (16,)
    n: int = 500
    seed: int = 0
    batch_size: int = 250
    reference_split: str = "train"
    device: str = "cpu"
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    name: str = "guidance"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("weights", "samplers", "steps"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuidanceSweep:
        d = dict(d)
        for k in ("weights", "samplers", "steps"):
            d[k] = tuple(d[k])
        return cls(**d)

    @property
    def gpus_per_trial(self) -> float:
        return 1.0 if self.device.startswith("cuda") else 0.0


def point_uri(out: str, sampler: str, steps: int, w: float) -> str:
    return storage.join(out, POINTS_DIR, f"{sampler}-s{steps}-w{w:g}")


def validate_sweep(sweep: GuidanceSweep) -> Any:
    """Check the sweep before any trial: weights, samplers and steps against the checkpoint's process,
    a conditional model, classifier and data of one resolution. Returns the loaded model."""
    from ..diffusion import samplers as core
    from ..evaluation.classifier import load_classifier
    from ..evaluation.sampling import load_model_for_sampling

    if not sweep.weights:
        raise ValueError("weights: give at least one guidance weight w")
    for w in sweep.weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights: every w must be a finite number >= 0, got {w!r}")
    if len(set(sweep.weights)) != len(sweep.weights):
        raise ValueError(f"weights: duplicates in {list(sweep.weights)}")
    if not sweep.samplers or not sweep.steps:
        raise ValueError("samplers and steps: give at least one of each")
    for name in ("n", "batch_size"):
        v = getattr(sweep, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "n" else 1):
            raise ValueError(f"{name} must be an integer >= {2 if name == 'n' else 1}, got {v!r}")
    if (
        sweep.device.startswith("cuda")
        and not torch.cuda.is_available()
        and not os.environ.get("RAY_ADDRESS")
    ):
        raise ValueError(f"device={sweep.device!r} but no CUDA device is visible and no RAY_ADDRESS is set")
    model = load_model_for_sampling(sweep.checkpoint)
    if model.num_classes is None:
        raise ValueError(
            f"checkpoint {sweep.checkpoint} is unconditional (preset {model.config.preset!r}): "
            "guidance needs a conditional model trained with label dropout"
        )
    for sampler in sweep.samplers:
        for steps in sweep.steps:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be integers >= 1, got {steps!r}")
            core.check_options(sampler, model.sde, steps, core.allowed_options(sampler))
    clf, _ = load_classifier(sweep.classifier)
    if clf.num_classes < model.num_classes:
        raise ValueError(
            f"classifier {sweep.classifier} knows {clf.num_classes} classes, the model {model.num_classes}"
        )
    from ..data.manifest import read_manifest

    H, W, C = read_manifest(sweep.data)["image"]["shape"]  # ValueError when there is no manifest
    if tuple(model.image_shape) != (C, H, W):
        raise ValueError(
            f"data={sweep.data} holds {C}×{H}×{W} images but the checkpoint's model makes "
            f"{'×'.join(map(str, model.image_shape))}: FID needs one resolution"
        )
    storage.check_writable(sweep.out)
    return model


def sweep_guidance(
    *, checkpoint: str, data: str, classifier: str, out: str, callbacks: Sequence[Any] = (), **options: Any
) -> dict[str, Any]:
    """Sweep w × sampler × steps on `checkpoint` with Ray Tune; `options` are `GuidanceSweep` fields.

    Returns {"rows": one per point, "best": the lowest-FID w per "sampler/steps" and "overall",
    "report": URIs, "complete": bool, "experiment": Tune's folder}.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(GuidanceSweep)})
    if unknown:
        raise ValueError(f"unknown sweep option(s) {unknown}")
    for k in ("weights", "samplers", "steps"):
        if k in options:
            options[k] = tuple(options[k])
    sweep = GuidanceSweep(
        checkpoint=_absolute(checkpoint),
        data=_absolute(data),
        classifier=_absolute(classifier),
        out=_absolute(out),
        **options,
    )
    validate_sweep(sweep)
    from .schedules import _connect, concurrent_trials

    started = _connect()
    try:
        concurrent = concurrent_trials(
            {"CPU": sweep.cpus_per_trial, "GPU": sweep.gpus_per_trial},
            requested=sweep.max_concurrent,
            detail="one guidance point",
        )
        _reference(sweep)  # computed once here and cached on storage; trials read the cache
        storage.write_json(storage.join(sweep.out, SWEEP_FILE), sweep.to_dict())
        results = _tuner(sweep, concurrent, callbacks).fit()
        return _finish(sweep, results)
    finally:
        if started:
            import ray

            ray.shutdown()


def restore_guidance(out: str) -> dict[str, Any]:
    """Finish an interrupted sweep from its storage; finished points are not redrawn."""
    from ray import tune

    from .schedules import _connect, _restorable

    sweep, path, fs = _restorable(_absolute(out), SWEEP_FILE, GuidanceSweep.from_dict, "guidance sweep")
    started = _connect()
    try:
        tuner = tune.Tuner.restore(
            path,
            trainable=_trainable(sweep),
            resume_unfinished=True,
            restart_errored=True,
            storage_filesystem=fs,
        )
        return _finish(sweep, tuner.fit())
    finally:
        if started:
            import ray

            ray.shutdown()


def _reference(sweep: GuidanceSweep, device: str = "cpu") -> tuple[Any, Any]:
    from ..evaluation.features import build_extractor
    from ..evaluation.fid import reference_stats

    extractor = build_extractor("domain", weights=sweep.classifier, device=device)
    cache = storage.join(sweep.out, "fid-stats")
    return extractor, reference_stats(sweep.data, extractor, split=sweep.reference_split, cache_uri=cache)


def _trainable(sweep: GuidanceSweep) -> Any:
    from ray import tune

    resources = {"CPU": sweep.cpus_per_trial}
    if sweep.gpus_per_trial:
        resources["GPU"] = sweep.gpus_per_trial
    return tune.with_resources(tune.with_parameters(guidance_trial, sweep=sweep.to_dict()), resources)


def _tuner(sweep: GuidanceSweep, concurrent: int, callbacks: Sequence[Any]) -> Any:
    from ray import tune

    from ..training.ray_train import ray_storage

    storage_path, fs = ray_storage(storage.join(sweep.out, TUNE_DIR))
    space = {
        "sampler": tune.grid_search(list(sweep.samplers)),
        "steps": tune.grid_search(list(sweep.steps)),
        "w": tune.grid_search(list(sweep.weights)),
    }
    return tune.Tuner(
        _trainable(sweep),
        param_space=space,
        tune_config=tune.TuneConfig(metric="fid", mode="min", max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            callbacks=list(callbacks) or None,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


# ---- one point ----------------------------------------------------------------------------------


@torch.no_grad()
def draw_point(
    model: Any, *, sampler: str, steps: int, w: float, n: int, seed: int, batch_size: int, levels: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n samples (float, [-1, 1], CPU) of one point, their labels and the NFE per sample."""
    from ..evaluation.sampling import SamplingPlan, generate

    plan = SamplingPlan(
        n=n,
        method=sampler,
        steps=steps,
        guidance=float(w),
        base_seed=seed,
        batch_size=min(batch_size, n),
        levels=levels,
    )
    plan.validate(model)
    xs, labels, nfe = [], [], []
    for b in range(plan.num_blocks()):
        idx = list(plan.block(b))
        x, k = generate(model, plan, idx, noise_seed=plan.block_noise_seed(b))
        xs.append(x.float().cpu())
        labels.append(plan.labels(idx, model.num_classes))
        nfe.append(k)
    return torch.cat(xs), torch.cat(labels), sum(nfe) / len(nfe)


def guidance_trial(config: dict[str, Any], *, sweep: dict[str, Any]) -> None:
    """One Tune trial: draw and score the samples of (sampler, steps, w)."""
    from ray import tune

    from ..evaluation.bpd import dataset_levels
    from ..evaluation.sampling import load_model_for_sampling
    from .metrics import fid_and_precision

    s = GuidanceSweep.from_dict(sweep)
    device = s.device if s.device.startswith("cuda") else "cpu"
    sampler, steps, w = str(config["sampler"]), int(config["steps"]), float(config["w"])
    model = load_model_for_sampling(s.checkpoint, device=device)
    extractor, reference = _reference(s, device)
    levels = dataset_levels(s.data)
    x, labels, nfe = draw_point(
        model, sampler=sampler, steps=steps, w=w, n=s.n, seed=s.seed, batch_size=s.batch_size, levels=levels
    )
    if torch.isfinite(x).all():
        scores = fid_and_precision(
            x, labels, extractor=extractor, reference=reference, levels=levels, classifier=extractor.model
        )
    else:
        scores = {"fid": math.inf, "precision": 0.0}
    uri = point_uri(s.out, sampler, steps, w)
    buf = io.BytesIO()
    torch.save(
        {
            "x": x,
            "labels": labels,
            "seeds": [s.seed, s.seed + s.n - 1],
            "sampler": sampler,
            "steps": steps,
            "w": w,
            "checkpoint_sha256": model.checkpoint_sha256,
        },
        buf,
    )
    storage.write_bytes(storage.join(uri, "samples.pt"), buf.getvalue())
    result = {
        **scores,
        "sampler": sampler,
        "steps": steps,
        "w": w,
        "nfe": nfe,
        "n": int(x.shape[0]),
        "samples": storage.join(uri, "samples.pt"),
    }
    storage.write_json(storage.join(uri, "score.json"), result)
    tune.report(result)


# ---- results --------------------------------------------------------------------------------------


def best_weights(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The lowest-FID row per "sampler/steps", and "overall"."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("fid") is None or not math.isfinite(r["fid"]):
            continue
        for key in (f"{r['sampler']}/{r['steps']}", "overall"):
            if key not in best or r["fid"] < best[key]["fid"]:
                best[key] = r
    return best


def _finish(sweep: GuidanceSweep, results: Any) -> dict[str, Any]:
    from .report import write_guidance_report

    rows = []
    # ResultGrid keeps the Tune trials (status, config, last result) in its experiment analysis.
    for trial in results._experiment_analysis.trials:
        m = trial.last_result or {}
        rows.append(
            {
                "sampler": trial.config["sampler"],
                "steps": int(trial.config["steps"]),
                "w": float(trial.config["w"]),
                "status": str(trial.status),
                **{k: m.get(k) for k in ("fid", "precision", "nfe", "n", "samples")},
                "trial_id": trial.trial_id,
            }
        )
    rows.sort(key=lambda r: (r["sampler"], r["steps"], r["w"]))
    best = best_weights(rows)
    settings = {**sweep.to_dict(), "checkpoint": sweep.checkpoint}
    report = write_guidance_report(sweep.out, rows, best, settings)
    # An interrupted sweep may not even have generated all its points: count against the grid.
    expected = len(sweep.weights) * len(sweep.samplers) * len(sweep.steps)
    complete = results.num_terminated + results.num_errors == expected
    return {
        "rows": rows,
        "best": best,
        "report": report,
        "complete": complete,
        "experiment": _experiment(sweep)[0],
    }


__all__ = [
    "GuidanceSweep",
    "best_weights",
    "draw_point",
    "guidance_trial",
    "point_uri",
    "restore_guidance",
    "sweep_guidance",
    "validate_sweep",
]
