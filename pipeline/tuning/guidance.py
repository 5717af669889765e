"""Guidance sweep: classifier-free guidance weight w × sampler × NFE on one trained conditional
checkpoint, no retraining, each point a Ray Tune trial scored by FID and a precision proxy.

Every point draws the same samples: sample i starts from the x_T seeded by seed + i and is conditioned
on class i mod K (`evaluation.sampling`'s rules), so points differ only in w, sampler and steps. The
guided score is (1 + w) s(x, t, c) − w s(x, t, ∅) (Ho & Salimans 2022, eq. 6), which at w = 0 is the
conditional model itself. A point is scored by FID against the data's reference statistics in the
domain classifier's features, and by that classifier's accuracy on the labels the samples were
conditioned on (the precision proxy: guidance trades diversity for samples the classifier recognises).

Storage, under `out`: `sweep.json`, `tune/{name}*/` (Tune's own, never read back),
`points/{sampler}-s{steps}-w{w}/` (`samples.pt`: the float samples, their labels and seeds;
`score.json`, the record a restore reads), `fid-stats/` and the report
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

from .. import raykit, storage
from ..recipes import GUIDANCE_WEIGHTS

SWEEP_FILE = "sweep.json"
POINTS_DIR = "points"


@dataclass(frozen=True, kw_only=True)
class GuidanceSweep:
    """The settings of a sweep; saved as sweep.json so that a restore rebuilds it."""

    checkpoint: str
    data: str
    classifier: str
    out: str
    weights: tuple[float, ...] = GUIDANCE_WEIGHTS
    samplers: tuple[str, ...] = ("heun",)
    steps: tuple[int, ...] = (16,)
    # Where guidance acts, (σ_lo, σ_hi] in σ̃ = σ/α (None: ∞; Kynkäänniemi et al. 2024), and with what:
    # None is classifier-free guidance, a checkpoint URI autoguidance by that weaker model (Karras et al.
    # 2024; w is then the w of D_guide + w (D_main − D_guide)).
    intervals: tuple[tuple[float, float | None], ...] = ((0.0, None),)
    guides: tuple[str | None, ...] = (None,)
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
        for k in ("weights", "samplers", "steps", "guides"):
            d[k] = list(d[k])
        d["intervals"] = [list(i) for i in self.intervals]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuidanceSweep:
        d = dict(d)
        for k in ("weights", "samplers", "steps", "guides"):
            if k in d:
                d[k] = tuple(d[k])
        if "intervals" in d:
            d["intervals"] = tuple((float(lo), None if hi is None else float(hi))
                                   for lo, hi in d["intervals"])
        return cls(**d)

    def grid_size(self) -> int:
        dims = ("weights", "samplers", "steps", "intervals", "guides")
        return math.prod(len(getattr(self, k)) for k in dims)

    @property
    def gpus_per_trial(self) -> float:
        return 1.0 if self.device.startswith("cuda") else 0.0


def point_uri(out: str, sampler: str, steps: int, w: float, interval: int = 0, guide: int = 0) -> str:
    """The folder of one point; `interval` and `guide` are indices into the sweep's lists."""
    extra = (f"-i{interval}" if interval else "") + (f"-g{guide}" if guide else "")
    return storage.join(out, POINTS_DIR, f"{sampler}-s{steps}-w{w:g}{extra}")


def validate_sweep(sweep: GuidanceSweep) -> Any:
    """Check the sweep before any trial: weights, samplers and steps against the checkpoint's process,
    a conditional model, classifier and data of one resolution. Returns the loaded model."""
    from ..diffusion import samplers as core
    from ..evaluation.classifier import load_classifier
    from ..training.checkpoint import load_model

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
    from ..diffusion.guidance import check_interval

    model = load_model(sweep.checkpoint)
    if not sweep.intervals or not sweep.guides:
        raise ValueError("intervals and guides: give at least one of each ((0, None) and None: plain CFG)")
    for lo, hi in sweep.intervals:
        check_interval(lo, float("inf") if hi is None else hi)
    if model.num_classes is None and None in sweep.guides:
        raise ValueError(
            f"checkpoint {sweep.checkpoint} is unconditional (preset {model.config.preset!r}): "
            "classifier-free guidance needs a conditional model trained with label dropout "
            "(autoguidance, guides=[a weaker checkpoint], does not)"
        )
    for guide in sweep.guides:
        if guide is not None:  # another image shape or conditioning: refused here, before any point
            model.score_fn(None, 1.0, guide=load_model(guide))
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
    sweep = GuidanceSweep(checkpoint=raykit.absolute(checkpoint), data=raykit.absolute(data),
                          classifier=raykit.absolute(classifier), out=raykit.absolute(out), **options)
    validate_sweep(sweep)
    return _run(sweep, grid_points(sweep), sweep.name, callbacks)


def restore_guidance(out: str) -> dict[str, Any]:
    """Finish an interrupted sweep: re-run only the points without a `score.json`, under `out` (which
    wins over the `out` recorded in sweep.json). Nothing of Tune's pickled state is read (see
    `raykit.saved_settings`); finished points are not redrawn."""
    sweep = raykit.saved_settings(raykit.absolute(out), SWEEP_FILE, GuidanceSweep.from_dict, "guidance sweep")
    missing = missing_points(sweep)
    if not missing:
        return _finish(sweep, None)
    validate_sweep(sweep)
    return _run(sweep, missing, raykit.restore_name(sweep.name))


def grid_points(sweep: GuidanceSweep) -> list[dict[str, Any]]:
    """Every (sampler, steps, guide, interval, w) of the sweep, in report order; interval and guide are
    indices into the sweep's lists."""
    return [{"sampler": a, "steps": int(s), "guide": g, "interval": i, "w": float(w)}
            for a in sweep.samplers for s in sweep.steps for g in range(len(sweep.guides))
            for i in range(len(sweep.intervals)) for w in sweep.weights]


def _key(p: dict[str, Any]) -> tuple[Any, ...]:
    return p["sampler"], int(p["steps"]), int(p.get("guide", 0)), int(p.get("interval", 0)), float(p["w"])


def _point_folder(sweep: GuidanceSweep, p: dict[str, Any]) -> str:
    return point_uri(sweep.out, p["sampler"], p["steps"], p["w"], p.get("interval", 0), p.get("guide", 0))


def missing_points(sweep: GuidanceSweep) -> list[dict[str, Any]]:
    """The points of the grid that have no score on storage yet."""
    return [p for p in grid_points(sweep)
            if not storage.exists(storage.join(_point_folder(sweep, p), "score.json"))]


def _run(sweep: GuidanceSweep, points: list[dict[str, Any]], name: str,
         callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Draw and score `points` as one Tune experiment `name` under `{out}/tune/`."""
    with raykit.session():
        concurrent = raykit.concurrent_trials({"CPU": sweep.cpus_per_trial, "GPU": sweep.gpus_per_trial},
                                              requested=sweep.max_concurrent, detail="one guidance point")
        _reference(sweep)  # computed once here and cached on storage; trials read the cache
        storage.write_json(storage.join(sweep.out, SWEEP_FILE), sweep.to_dict())
        space = {"point": raykit.search_dim("grid", points)}
        results = raykit.tune_fit(_trainable(sweep), param_space=space, out=sweep.out, name=name,
                                  metric="fid", mode="min", max_concurrent=concurrent, callbacks=callbacks)
        return _finish(sweep, results)


def _reference(sweep: GuidanceSweep, device: str = "cpu") -> tuple[Any, Any]:
    from ..evaluation.features import build_extractor
    from ..evaluation.fid import reference_stats

    extractor = build_extractor("domain", weights=sweep.classifier, device=device)
    cache = storage.join(sweep.out, "fid-stats")
    return extractor, reference_stats(sweep.data, extractor, split=sweep.reference_split, cache_uri=cache)


def _trainable(sweep: GuidanceSweep) -> Any:
    return raykit.trainable(guidance_trial, {"CPU": sweep.cpus_per_trial, "GPU": sweep.gpus_per_trial},
                            sweep=sweep.to_dict())


# ---- one point ----------------------------------------------------------------------------------


def guidance_trial(config: dict[str, Any], *, sweep: dict[str, Any]) -> None:
    """One Tune trial: draw and score the samples of (sampler, steps, w)."""
    from ..evaluation.bpd import dataset_levels
    from ..evaluation.generate import SamplingPlan, draw_all
    from ..evaluation.scoring import score_samples
    from ..training.checkpoint import load_model

    s = GuidanceSweep.from_dict(sweep)
    device = s.device if s.device.startswith("cuda") else "cpu"
    config = config.get("point", config)  # the driver sends the grid as a list of points
    sampler, steps, w = str(config["sampler"]), int(config["steps"]), float(config["w"])
    i, g = int(config.get("interval", 0)), int(config.get("guide", 0))
    (lo, hi), guide = s.intervals[i], s.guides[g]
    model = load_model(s.checkpoint, device=device)
    extractor, reference = _reference(s, device)
    levels = dataset_levels(s.data)
    plan = SamplingPlan(n=s.n, method=sampler, steps=steps, guidance=w, base_seed=s.seed,
                        batch_size=min(s.batch_size, s.n), levels=levels, sigma_lo=lo, sigma_hi=hi,
                        guide=guide)
    x, labels, nfe = draw_all(model, plan)
    scores = score_samples(x, labels, extractor=extractor, reference=reference, levels=levels)
    uri = point_uri(s.out, sampler, steps, w, i, g)
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
        "interval": [lo, hi],
        "guide": guide,
        "nfe": nfe,
        "n": int(x.shape[0]),
        "samples": storage.join(uri, "samples.pt"),
        "trial_id": raykit.trial_id(),
    }
    storage.write_json(storage.join(uri, "score.json"), result)
    raykit.report(result)


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
    """Rows from the points' own `score.json` files (every run and restore of the sweep), with the
    latest run's Tune status for points that have no score."""
    from .report import write_guidance_report

    status = {}
    for trial in raykit.trials_of(results) if results is not None else ():
        p = trial.config.get("point", trial.config)
        status[_key(p)] = (str(trial.status), trial.trial_id)
    rows, complete = [], True
    for p in grid_points(sweep):
        uri = storage.join(_point_folder(sweep, p), "score.json")
        if storage.exists(uri):
            m, st = storage.read_json(uri), "TERMINATED"
        else:
            m, (st, _) = {}, status.get(_key(p), ("MISSING", None))
            complete = complete and st == "ERROR"  # an errored point is finished; a missing one is not
        rows.append({**p, "interval": list(sweep.intervals[p["interval"]]), "guide": sweep.guides[p["guide"]],
                     "status": st,
                     **{k: m.get(k) for k in ("fid", "precision", "nfe", "n", "samples", "floor", "floor_min",
                                              "floor_max")},
                     "trial_id": m.get("trial_id") or status.get(_key(p), (None, None))[1]})
    best = best_weights(rows)
    settings = {**sweep.to_dict(), "checkpoint": sweep.checkpoint}
    report = write_guidance_report(sweep.out, rows, best, settings)
    return {
        "rows": rows,
        "best": best,
        "report": report,
        "complete": complete,
        "experiment": raykit.experiment_path(sweep.out, sweep.name)[0],
    }


__all__ = [
    "GuidanceSweep",
    "best_weights",
    "grid_points",
    "guidance_trial",
    "missing_points",
    "point_uri",
    "restore_guidance",
    "sweep_guidance",
    "validate_sweep",
]
