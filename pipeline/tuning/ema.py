"""`tune ema`: search the EMA length σ_rel of a finished run with no retraining (EDM2's post-hoc EMA,
Karras et al. 2024, Sec. 3), each σ_rel a Ray Tune trial: the EMA is reconstructed from the run's
power-function snapshots (`training.phema_store`), sampled through `generate` and scored by FID (with its
floor at the same N) and, for conditional models, the domain classifier's accuracy.

State is the project's own JSON: `{out}/ema_sweep.json` (the settings) and one
`{out}/points/sigma-{σ_rel}/score.json` per finished point. A rerun scores only the points that have no
score yet; nothing is unpickled from storage. Report: `report.md`, `report.json`, `fid_vs_sigma_rel.png`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .. import raykit, storage

SETTINGS_FILE = "ema_sweep.json"
POINTS_DIR = "points"


@dataclass(frozen=True, kw_only=True)
class EMASweep:
    """The settings of a σ_rel search; saved so that a rerun finishes the same search."""

    run: str  # the training run folder (its phema/ snapshots and ema-final.pt)
    data: str
    classifier: str
    out: str
    sigma_rels: tuple[float, ...] = (0.03, 0.05, 0.07, 0.10, 0.13, 0.17)
    n: int = 200
    sampler: str = "heun"
    steps: int = 16
    guidance: float = 0.0
    seed: int = 0
    cpus_per_trial: float = 1.0
    name: str = "ema"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sigma_rels": list(self.sigma_rels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EMASweep:
        return cls(**{**d, "sigma_rels": tuple(d["sigma_rels"])})


def point_uri(out: str, sigma_rel: float) -> str:
    return storage.join(out, POINTS_DIR, f"sigma-{sigma_rel:.4f}")


def validate_ema_sweep(sweep: EMASweep) -> None:
    """Every σ_rel in (0, 0.3), enough snapshots, a writable out, a sampler plan that validates."""
    from ..diffusion import samplers as core
    from ..models.phema import SIGMA_REL_RANGE
    from ..training.phema_store import PHEMA_DIR, list_snapshots

    lo, hi = SIGMA_REL_RANGE
    if not sweep.sigma_rels:
        raise ValueError("sigma_rels: give at least one σ_rel")
    for i, s in enumerate(sweep.sigma_rels):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not lo < s < hi:
            raise ValueError(f"sigma_rels[{i}] must be a number in ({lo}, {hi}), got {s!r}")
    snaps = list_snapshots(sweep.run)
    if len({(s.step, s.sigma_rel) for s in snaps}) < 2:
        raise ValueError(f"run={sweep.run}: {len(snaps)} post-hoc EMA snapshot(s) under {PHEMA_DIR}/; "
                         "the search needs at least 2 (train with phema_every > 0)")
    if isinstance(sweep.n, bool) or not isinstance(sweep.n, int) or sweep.n < 2:
        raise ValueError(f"n must be an integer >= 2, got {sweep.n!r}")
    core.allowed_options(sweep.sampler)
    storage.check_writable(sweep.out)


def ema_trial(config: dict[str, Any], *, sweep: dict[str, Any]) -> None:
    """One Tune trial: reconstruct σ_rel, draw the samples, score them, write score.json."""
    from ..evaluation.bpd import dataset_levels
    from ..evaluation.features import build_extractor
    from ..evaluation.fid import reference_stats
    from ..evaluation.generate import SamplingPlan, draw_all
    from ..evaluation.scoring import score_samples
    from ..training.checkpoint import load_model
    from ..training.phema_store import reconstruct_export

    s = EMASweep.from_dict(sweep)
    sigma_rel = float(config["sigma_rel"])
    folder = point_uri(s.out, sigma_rel)
    rebuilt = reconstruct_export(s.run, sigma_rel, storage.join(folder, "ema.pt"))
    model = load_model(rebuilt["uri"])
    levels = dataset_levels(s.data)
    plan = SamplingPlan(n=s.n, method=s.sampler, steps=s.steps, guidance=s.guidance, base_seed=s.seed,
                        batch_size=min(250, s.n), levels=levels)
    x, labels, nfe = draw_all(model, plan)
    extractor = build_extractor("domain", weights=s.classifier)
    reference = reference_stats(s.data, extractor, split="train", cache_uri=storage.join(s.out, "fid-stats"))
    scores = score_samples(x, labels, extractor=extractor, reference=reference, levels=levels)
    result = {**scores, "sigma_rel": sigma_rel, "nfe": nfe, "n": s.n, "ema": rebuilt["uri"]}
    storage.write_json(storage.join(folder, "score.json"), result)
    raykit.report(result)


def sweep_ema(*, run: str, data: str, classifier: str, out: str, **options: Any) -> dict[str, Any]:
    """Search σ_rel on `run` (no retraining); `options` are `EMASweep` fields. Finished points (their
    score.json) are kept; the others run as Ray Tune trials. Returns rows, best and report URIs."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(EMASweep)})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} of the EMA search")
    if "sigma_rels" in options:
        options["sigma_rels"] = tuple(options["sigma_rels"])
    settings = storage.join(raykit.absolute(out), SETTINGS_FILE)
    sweep = EMASweep(run=raykit.absolute(run), data=raykit.absolute(data),
                     classifier=raykit.absolute(classifier), out=raykit.absolute(out), **options)
    validate_ema_sweep(sweep)
    storage.write_json(settings, sweep.to_dict())
    done = {s for s in sweep.sigma_rels
            if storage.exists(storage.join(point_uri(sweep.out, s), "score.json"))}
    todo = [s for s in sweep.sigma_rels if s not in done]
    if todo:
        with raykit.session():
            concurrent = raykit.concurrent_trials({"CPU": sweep.cpus_per_trial}, detail="one σ_rel point")
            trainable = raykit.trainable(ema_trial, {"CPU": sweep.cpus_per_trial}, sweep=sweep.to_dict())
            # A fresh experiment per rerun (named by how many points were done): nothing is restored.
            raykit.tune_fit(trainable, param_space={"sigma_rel": raykit.search_dim("grid", todo)},
                            out=sweep.out, name=f"{sweep.name}-{len(done)}", metric="fid", mode="min",
                            max_concurrent=concurrent)
    return _finish(sweep)


def _finish(sweep: EMASweep) -> dict[str, Any]:
    from ..plots import png, pyplot

    rows = []
    for s in sweep.sigma_rels:
        uri = storage.join(point_uri(sweep.out, s), "score.json")
        rows.append(storage.read_json(uri) if storage.exists(uri) else {"sigma_rel": s, "fid": None})
    scored = [r for r in rows if r.get("fid") is not None and math.isfinite(r["fid"])]
    best = min(scored, key=lambda r: r["fid"]) if scored else None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["sigma_rel"] for r in scored], [r["fid"] for r in scored], "o-", label="FID")
    floors = [r["floor"] for r in scored if r.get("floor") is not None]
    if floors:
        ax.axhline(sum(floors) / len(floors), color="tab:gray", ls=":",
                   label=f"real-vs-real floor at N={sweep.n}")
    ax.set_xlabel("EMA length σ_rel")
    ax.set_ylabel("FID")
    ax.set_title("FID versus post-hoc EMA length")
    ax.legend()
    plot = storage.join(sweep.out, "fid_vs_sigma_rel.png")
    storage.write_bytes(plot, png(fig))
    lines = ["# Post-hoc EMA search", "",
             f"Run `{sweep.run}`, {sweep.n} samples per point ({sweep.sampler}, {sweep.steps} steps, "
             f"w={sweep.guidance:g}).", "",
             "| σ_rel | FID | floor at N | class accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['sigma_rel']:.4f} | {_f(r.get('fid'))} | {_f(r.get('floor'))} | "
              f"{_f(r.get('precision'))} |" for r in rows]
    if best:
        lines += ["", f"Best σ_rel = {best['sigma_rel']:.4f} (FID {best['fid']:.3f}); EMA `{best['ema']}`."]
    report = {"markdown": storage.join(sweep.out, "report.md"),
              "json": storage.join(sweep.out, "report.json"), "plot": plot}
    storage.write_bytes(report["markdown"], ("\n".join(lines) + "\n").encode())
    storage.write_json(report["json"], {"settings": sweep.to_dict(), "rows": rows, "best": best})
    return {"rows": rows, "best": best, "report": report,
            "complete": len(scored) == len(sweep.sigma_rels)}


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}"


__all__ = ["EMASweep", "ema_trial", "point_uri", "sweep_ema", "validate_ema_sweep"]
