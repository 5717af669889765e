"""One function per pipeline stage, URIs in and small JSON-able dicts out.

This is what the Prefect flows (flows/) and `diffusion-pipeline run` call: a flow task is one call
here, so the whole pipeline also runs, and is tested, without Prefect. Every stage writes its
artifacts under the URI it is given, and a rerun skips or resumes what is already complete. A stage's
result carries a "markdown" entry: what the flows publish to the UI for it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import Any

from . import reports, storage
from .config import RunOptions, TrainConfig
from .layout import RunLayout
from .recipes import GUIDANCE_WEIGHTS

EXTRACTORS = ("auto", "domain", "inception")


def shard_stage(source: str, data: str, *, shard_size: int = 1000, test_fraction: float | None = None,
                seed: int = 0, parallel: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Shard `source` into WebDataset tars under `data` (complete shards are kept)."""
    from .data.shard import shard_dataset

    report = shard_dataset(source, data, shard_size=shard_size, test_fraction=test_fraction, seed=seed,
                           parallel=parallel, progress=progress)
    m = report.manifest
    res = {"data": data.rstrip("/"), "manifest": report.manifest_uri,
           "manifest_sha256": manifest_sha256(data), "counts": m["counts"], "levels": m["levels"],
           "image_shape": m["image"]["shape"],
           "num_classes": m.get("num_classes"), "written": len(report.written), "kept": len(report.kept)}
    res["markdown"] = f"### Dataset `{data}`\n\n" + reports.table([
        ("source", source), ("train images", res["counts"]["train"]), ("test images", res["counts"]["test"]),
        ("image shape", "×".join(map(str, res["image_shape"]))), ("levels", res["levels"]),
        ("shards written / kept", f"{res['written']} / {res['kept']}"),
        ("manifest sha256", res["manifest_sha256"][:16] + "…")])
    return res


def manifest_sha256(data: str) -> str:
    from .data.manifest import manifest_uri

    return hashlib.sha256(storage.read_bytes(manifest_uri(data))).hexdigest()


def train_stage(config: TrainConfig | dict[str, Any], data: str, out: str, *,
                options: RunOptions | None = None,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Ray Train DSM training; resumes from `out`'s latest checkpoint, and returns at once when the run
    already reached `config.steps`. `on_progress(progress)` is called at each report while it runs
    (`training.progress`); the result's markdown embeds the loss curves."""
    from .training.checkpoint import EMA_EXPORT, list_checkpoints
    from .training.progress import watch_progress
    from .training.ray_train import train

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    options = options or RunOptions(progress=False)
    done = list_checkpoints(out)
    ema_uri = storage.join(out, EMA_EXPORT)
    if done and done[-1][0] >= cfg.steps and storage.exists(ema_uri):
        res = {"ema": ema_uri, "checkpoint": done[-1][1], "step": done[-1][0], "skipped": True,
               "metrics": _last_history(out)}
    else:
        with watch_progress(out, on_progress) if on_progress else contextlib.nullcontext():
            result = train(cfg, data=data, out=out, options=options.replace(resume=bool(done)))
        res = {"ema": result.ema, "checkpoint": result.checkpoint, "step": result.step, "skipped": False,
               "metrics": result.history[-1] if result.history else result.metrics,
               "seconds": result.seconds, "ray_path": storage.join(out, "ray")}
    m = res.get("metrics") or {}
    rows = [("preset", cfg.preset), ("loss", cfg.loss), ("sde", cfg.sde), ("step", res["step"]),
            ("workers × GPUs", f"{options.workers} × {options.gpus_per_worker:g}")]
    rows += [(k, m[k]) for k in ("loss", "grad_norm", "lr", "img_per_s", "skipped_steps") if k in m]
    if res["skipped"]:
        rows.append(("note", "already trained to this step: skipped"))
    res["markdown"] = "### Training\n\n" + reports.table(rows) + _loss_curves(out)
    return res


def _loss_curves(out: str) -> str:
    """The run's loss curves (total and per-σ̃ bucket) as train/loss.png, embedded."""
    from .plots import loss_curves

    uri = RunLayout.history(out)
    history = storage.read_json(uri) if storage.exists(uri) else []
    if not history:
        return ""
    png = loss_curves(history)
    storage.write_bytes(RunLayout.loss_curve(out), png)
    return "\n\n" + reports.embed_png(png, "loss curves", link=RunLayout.loss_curve(out))


def _last_history(out: str) -> dict[str, Any]:
    uri = RunLayout.history(out)
    hist = storage.read_json(uri) if storage.exists(uri) else []
    return hist[-1] if hist else {}


def classifier_stage(data: str, out: str, *, epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    """The domain classifier (FID features for data where Inception says little); kept if already trained
    on this dataset."""
    from .evaluation.classifier import META_FILE, train_domain_classifier

    meta_uri = storage.join(out, META_FILE)
    res = None
    if storage.exists(meta_uri):
        from .data.manifest import read_manifest

        meta = storage.read_json(meta_uri)
        fingerprint = read_manifest(data).get("source", {}).get("fingerprint")
        if meta.get("source", {}) == {"data": data, "fingerprint": fingerprint}:
            res = {"classifier": out, "test_accuracy": meta["test_accuracy"], "skipped": True}
    if res is None:
        metrics = train_domain_classifier(data, out, epochs=epochs, seed=seed)
        res = {"classifier": out, "test_accuracy": metrics["test_accuracy"], "skipped": False}
    res["markdown"] = "### Domain classifier\n\n" + reports.table([("test accuracy", res["test_accuracy"])])
    return res


def sample_stage(checkpoint: str, out: str, *, n: int, method: str = "heun", steps: int = 32,
                 guidance: float = 0.0, seed: int = 0, batch_size: int = 256, workers: int = 0,
                 levels: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """N samples as shards + grid.png + a manifest recording every seed."""
    from .evaluation.generate import SamplingPlan
    from .evaluation.sampling import Execution, run_sampling

    plan = SamplingPlan(n=n, method=method, steps=steps, guidance=guidance, base_seed=seed,
                        batch_size=batch_size, levels=levels or 256)
    m = run_sampling(checkpoint, out, plan, execution=Execution(workers=workers, device=device))
    rec = m["sampling"]
    res = {"samples": out.rstrip("/"), "grid": RunLayout.grid(out), "n": m["counts"]["samples"],
           "method": rec["sampler"], "steps": rec["steps"], "nfe_per_sample": rec["nfe_per_sample"]["mean"],
           "guidance_w": rec["guidance_w"], "seconds": rec["seconds"]}
    res["markdown"] = "### Samples\n\n" + reports.table(
        [(k, res[k]) for k in ("n", "method", "steps", "nfe_per_sample", "guidance_w", "seconds")])
    if storage.exists(res["grid"]):
        grid = storage.read_bytes(res["grid"])
        res["markdown"] += "\n\n" + reports.embed_png(grid, "samples", link=res["grid"])
    return res


def fid_stage(samples: str, data: str, out: str, *, extractor: str = "auto", classifier: str | None = None,
              kid_subset_size: int = 1000) -> dict[str, Any]:
    """FID/KID of `samples` against `data`'s train split, with full provenance, in `out`.

    extractor="auto" uses the domain classifier when one is given and Inception otherwise."""
    from .evaluation.features import build_extractor
    from .evaluation.report import evaluate_samples, markdown_report

    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
    if extractor == "auto":
        extractor = "domain" if classifier else "inception"
    weights = classifier if extractor == "domain" else None
    if extractor == "domain" and not weights:
        raise ValueError("extractor 'domain' needs classifier= the domain classifier's folder URI")
    res = evaluate_samples(samples, data, build_extractor(extractor, weights=weights), out_uri=out,
                           kid_subset_size=kid_subset_size)
    keep = ("fid", "kid", "kid_note", "floor", "class_accuracy", "n", "report_uris")
    return {**{k: res[k] for k in keep if k in res}, "markdown": markdown_report(res)}


def likelihood_stage(checkpoint: str, data: str, out: str, *, max_samples: int = 256, batch_size: int = 64,
                     rtol: float = 1e-5, atol: float = 1e-5, elbo_samples: int = 16, seed: int = 0,
                     split: str = "test", workers: int = 0) -> dict[str, Any]:
    """Bits/dim through the probability-flow ODE and the continuous ELBO on `data`'s `split` (and, for
    a network trained on an exact discrete chain, DDPM's own variational bound, the figure the DDPM paper
    reports), written to `out`/likelihood.json and .md. workers ≥ 1 splits the ODE over Ray tasks."""
    import functools

    from .diffusion.chain import DDPMChain
    from .diffusion.elbo import eps_fn_from_score
    from .evaluation.bpd import evaluate_bpd, evaluate_bpd_ray, evaluate_ddpm_elbo, evaluate_elbo
    from .training.checkpoint import load_model, unconditional_score_fn

    model = load_model(checkpoint)
    # Unconditional likelihood: a conditional model is evaluated with the null label (its p(x)).
    score_fn = model.score_fn(None)
    common = {"batch_size": batch_size, "seed": seed, "split": split, "max_samples": max_samples}
    if workers:
        make = functools.partial(unconditional_score_fn, checkpoint)  # built again on each worker
        ode = evaluate_bpd_ray(make, model.sde.config(), data, num_workers=workers, use_gpu=_cuda(),
                               rtol=rtol, atol=atol, **common)
    else:
        ode = evaluate_bpd(score_fn, model.sde, data, rtol=rtol, atol=atol, **common)
    elbo = evaluate_elbo(score_fn, model.sde, data, n_samples=elbo_samples, **common)
    result = {"checkpoint": model.describe(), "data": data, "split": split, "ode": ode, "elbo": elbo}
    if isinstance(model.sde, DDPMChain):
        eps_fn = eps_fn_from_score(score_fn, model.sde)  # ε at the chain's own ᾱ_i, label i
        result["ddpm_elbo"] = evaluate_ddpm_elbo(eps_fn, model.sde.ddpm_schedule(), data, **common)
    markdown = reports.likelihood_markdown(result)
    storage.write_json(RunLayout.likelihood(out), result)
    storage.write_bytes(RunLayout.likelihood(out, "md"), markdown.encode())
    return {"report": RunLayout.likelihood(out), "bpd_ode": ode["bpd"], "bpd_ode_stderr": ode["bpd_stderr"],
            "bpd_elbo": elbo["bpd"], "bpd_elbo_stderr": elbo["bpd_stderr"], "nfe_mean": ode["nfe_mean"],
            "n": ode["n"], "markdown": markdown}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def guidance_stage(checkpoint: str, data: str, classifier: str, out: str, *,
                   weights: tuple[float, ...] = GUIDANCE_WEIGHTS, samplers: tuple[str, ...] = ("heun",),
                   steps: tuple[int, ...] = (16,), n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Ray Tune sweep of the guidance weight w (× sampler × NFE) scored by FID and classifier precision;
    an interrupted or finished sweep under `out` is restored, not redrawn."""
    from .tuning.guidance import SWEEP_FILE, restore_guidance, sweep_guidance

    if storage.exists(storage.join(out, SWEEP_FILE)):
        res = restore_guidance(out)
    else:
        res = sweep_guidance(checkpoint=checkpoint, data=data, classifier=classifier, out=out,
                             weights=tuple(weights), samplers=tuple(samplers), steps=tuple(steps), n=n,
                             seed=seed)
    cols = ("sampler", "steps", "w", "interval", "guide", "fid", "precision", "nfe", "n", "floor",
            "floor_min", "floor_max")
    out_res = {"best": res["best"].get("overall"), "rows": [{k: r.get(k) for k in cols} for r in res["rows"]],
               "report": res["report"], "complete": res["complete"]}
    plot = res["report"].get("plot")
    out_res["markdown"] = reports.guidance_markdown(out_res) + (
        "\n\n" + reports.embed_png(storage.read_bytes(plot), "FID versus w", link=plot) if plot else "")
    return out_res


def schedule_search_stage(space: dict[str, Any] | str, base: TrainConfig | dict[str, Any], data: str,
                          out: str, **options: Any) -> dict[str, Any]:
    """Ray Tune schedule search (`tuning.schedules`), or the restore of one under `out`; its markdown
    embeds the FID-versus-bits/dim Pareto plot and the trials' learning curves."""
    from .tuning.schedules import restore_schedules, search_schedules
    from .tuning.store import SEARCH_FILE

    if storage.exists(storage.join(out, SEARCH_FILE)):
        res = restore_schedules(out)
    else:
        cfg = base if isinstance(base, TrainConfig) else TrainConfig.from_dict(base)
        res = search_schedules(space, base=cfg, data=data, out=out, **options)
    # report.md links the PNGs beside it; the UI needs them inline.
    lines = storage.read_bytes(res.report["markdown"]).decode().splitlines()
    markdown = "\n".join(line for line in lines if not line.startswith("!["))
    for key, alt in (("pareto", "FID versus bits/dim"), ("learning_curves", f"{res.metric} by trial")):
        if key in res.report:
            png = storage.read_bytes(res.report[key])
            markdown += "\n\n" + reports.embed_png(png, alt, link=res.report[key])
    return {"best": res.best, "complete": res.complete, "report": res.report, "metric": res.metric,
            "markdown": markdown}


def interpolation_stage(checkpoint: str, data: str, out: str, *, pairs: int = 4,
                        n: int = 8) -> dict[str, Any]:
    """Latent interpolation through the PF-ODE: grid PNG (embedded in the markdown) and round-trip error."""
    from .evaluation.interpolation import InterpolationPlan, interpolation_markdown, run_interpolation

    res = run_interpolation(checkpoint, data, out, InterpolationPlan(pairs=pairs, n=n))
    markdown = interpolation_markdown(res)
    return {**{k: v for k, v in res.items() if k not in ("png", "checkpoint")}, "markdown": markdown}


def inverse_stage(checkpoint: str, data: str, out: str, *, classifier: str | None = None,
                  on_progress: Callable[[dict[str, Any]], None] | None = None, **task: Any) -> dict[str, Any]:
    """An inverse problem solved with a model trained without y, scored by PSNR/SSIM (and, with the domain
    classifier, class accuracy and FID of the completions). `task`: the fields of `InverseTask`;
    `on_progress({"step", "total"})` after each sampler step."""
    from .evaluation.inverse_problems import InverseTask, inverse_markdown, run_inverse

    known = set(InverseTask.__dataclass_fields__)
    if set(task) - known:
        raise ValueError(f"unknown inverse-problem options {sorted(set(task) - known)}; "
                         f"allowed: {sorted(known)}")
    res = run_inverse(checkpoint, data, out, InverseTask(**task), classifier=classifier,
                      on_progress=on_progress)
    markdown = inverse_markdown(res)
    return {**{k: v for k, v in res.items() if k not in ("png", "checkpoint")}, "markdown": markdown}


def ema_search_stage(run: str, data: str, classifier: str, out: str, **options: Any) -> dict[str, Any]:
    """The post-hoc EMA search (`tuning.ema`) on a finished run; its markdown embeds FID versus σ_rel."""
    from .tuning.ema import sweep_ema

    res = sweep_ema(run=run, data=data, classifier=classifier, out=out, **options)
    best = res["best"]
    rows = [(f"σ_rel {r['sigma_rel']:.3f}", f"FID {reports.fmt(r.get('fid'), 3)} "
             f"(floor {reports.fmt(r.get('floor'), 3)})") for r in res["rows"]]
    lines = ["### Post-hoc EMA search (EDM2)", "", reports.table(rows)]
    if best:
        lines += ["", f"best σ_rel = {best['sigma_rel']:.3f}: FID {best['fid']:.3f}; EMA `{best['ema']}`"]
    plot = res["report"]["plot"]
    lines += ["", reports.embed_png(storage.read_bytes(plot), "FID versus sigma_rel", link=plot)]
    return {"best": best, "rows": res["rows"], "report": res["report"], "complete": res["complete"],
            "markdown": "\n".join(lines)}


def summary_stage(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's report.md and summary.json under its root (stage results without their markdown), with
    the quality gates' verdicts (`gates.py`)."""
    from . import gates

    layout = RunLayout(summary["root"])
    clean = _without_markdown(summary)
    verdicts = gates.judge(clean, levels=(clean.get("data") or {}).get("levels"))
    clean["verdicts"] = gates.as_dicts(verdicts)
    text = reports.run_markdown(clean) + "\n" + gates.markdown(verdicts)
    markdown = text
    grid = ((clean.get("evaluate") or {}).get("samples") or {}).get("grid")
    if grid and storage.exists(grid):  # the UI shows it inline; report.md (read in a terminal) links it
        markdown += "\n" + reports.embed_png(storage.read_bytes(grid), "samples", link=grid) + "\n"
        text += f"\n![samples]({grid})\n"
    storage.write_bytes(layout.report, text.encode())
    storage.write_json(layout.summary, clean)
    return {"report": layout.report, "markdown": markdown, "summary": clean}


def _without_markdown(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _without_markdown(x) for k, x in v.items() if k != "markdown"}
    return v


__all__ = [
    "EXTRACTORS",
    "classifier_stage",
    "fid_stage",
    "guidance_stage",
    "interpolation_stage",
    "inverse_stage",
    "likelihood_stage",
    "manifest_sha256",
    "sample_stage",
    "schedule_search_stage",
    "shard_stage",
    "summary_stage",
    "train_stage",
]
