"""One function per pipeline stage, URIs in and small JSON-able dicts out.

This is what the Prefect flows (flows/) and `diffusion-pipeline run` call: a flow task is one call
here, so the whole pipeline also runs, and is tested, without Prefect. Every stage writes its
artifacts under the URI it is given, and a rerun skips or resumes what is already complete.
"""

from __future__ import annotations

import hashlib
from typing import Any

from . import storage
from .config import TrainConfig

EXTRACTORS = ("auto", "domain", "inception")


def shard_stage(source: str, data: str, *, shard_size: int = 1000, test_fraction: float | None = None,
                seed: int = 0, parallel: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Shard `source` into WebDataset tars under `data` (complete shards are kept)."""
    from .data.shard import shard_dataset

    report = shard_dataset(source, data, shard_size=shard_size, test_fraction=test_fraction, seed=seed,
                           parallel=parallel, progress=progress)
    m = report.manifest
    return {"data": data.rstrip("/"), "manifest": report.manifest_uri,
            "manifest_sha256": manifest_sha256(data),
            "counts": m["counts"], "levels": m["levels"], "image_shape": m["image"]["shape"],
            "num_classes": m.get("num_classes"), "written": len(report.written), "kept": len(report.kept)}


def manifest_sha256(data: str) -> str:
    from .data.manifest import manifest_uri

    return hashlib.sha256(storage.read_bytes(manifest_uri(data))).hexdigest()


def train_stage(config: TrainConfig | dict[str, Any], data: str, out: str, *, workers: int = 1,
                gpus_per_worker: float = 0.0, report_every: int = 100, checkpoint_every: int = 500,
                progress: bool = False) -> dict[str, Any]:
    """Ray Train DSM training; resumes from `out`'s latest checkpoint, and returns at once when the run
    already reached `config.steps`."""
    from .training.checkpoint import EMA_EXPORT, list_checkpoints
    from .training.ray_train import train

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    done = list_checkpoints(out)
    ema_uri = storage.join(out, EMA_EXPORT)
    if done and done[-1][0] >= cfg.steps and storage.exists(ema_uri):
        return {"ema": ema_uri, "checkpoint": done[-1][1], "step": done[-1][0], "skipped": True,
                "metrics": _last_history(out)}
    result = train(cfg, data=data, out=out, workers=workers, gpus_per_worker=gpus_per_worker,
                   report_every=report_every, checkpoint_every=checkpoint_every, resume=bool(done),
                   progress=progress)
    return {"ema": result.ema, "checkpoint": result.checkpoint, "step": result.step, "skipped": False,
            "metrics": result.history[-1] if result.history else result.metrics, "seconds": result.seconds,
            "ray_path": result.ray_path}


def _last_history(out: str) -> dict[str, Any]:
    uri = storage.join(out, "history.json")
    hist = storage.read_json(uri) if storage.exists(uri) else []
    return hist[-1] if hist else {}


def classifier_stage(data: str, out: str, *, epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    """The domain classifier (FID features for data where Inception says little); kept if already trained
    on this dataset."""
    from .evaluation.classifier import train_domain_classifier

    meta_uri = storage.join(out, "classifier.json")
    if storage.exists(meta_uri):
        from .data.manifest import read_manifest

        meta = storage.read_json(meta_uri)
        fingerprint = read_manifest(data).get("source", {}).get("fingerprint")
        if meta.get("source", {}) == {"data": data, "fingerprint": fingerprint}:
            return {"classifier": out, "test_accuracy": meta["test_accuracy"], "skipped": True}
    metrics = train_domain_classifier(data, out, epochs=epochs, seed=seed)
    return {"classifier": out, "test_accuracy": metrics["test_accuracy"], "skipped": False}


def sample_stage(checkpoint: str, out: str, *, n: int, method: str = "heun", steps: int = 32,
                 guidance: float = 0.0, seed: int = 0, batch_size: int = 256, workers: int = 0,
                 levels: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """N samples as shards + grid.png + a manifest recording every seed."""
    from .evaluation.sampling import run_sampling

    m = run_sampling(checkpoint, out, n=n, method=method, steps=steps, guidance=guidance, seed=seed,
                     batch_size=batch_size, workers=workers, levels=levels, device=device)
    rec = m["sampling"]
    return {"samples": out.rstrip("/"), "grid": storage.join(out, "grid.png"), "n": m["counts"]["samples"],
            "method": rec["sampler"], "steps": rec["steps"], "nfe_per_sample": rec["nfe_per_sample"]["mean"],
            "guidance_w": rec["guidance_w"], "seconds": rec["seconds"]}


def fid_stage(samples: str, data: str, out: str, *, extractor: str = "auto", classifier: str | None = None,
              kid_subset_size: int = 1000) -> dict[str, Any]:
    """FID/KID of `samples` against `data`'s train split, with full provenance, in `out`.

    extractor="auto" uses the domain classifier when one is given and Inception otherwise."""
    from .evaluation.features import build_extractor
    from .evaluation.report import evaluate_samples

    if extractor not in EXTRACTORS:
        raise ValueError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}")
    if extractor == "auto":
        extractor = "domain" if classifier else "inception"
    weights = classifier if extractor == "domain" else None
    if extractor == "domain" and not weights:
        raise ValueError("extractor 'domain' needs classifier= the domain classifier's folder URI")
    res = evaluate_samples(samples, data, build_extractor(extractor, weights=weights), out_uri=out,
                           kid_subset_size=kid_subset_size)
    return res


def likelihood_stage(checkpoint: str, data: str, out: str, *, max_samples: int = 256, batch_size: int = 64,
                     rtol: float = 1e-5, atol: float = 1e-5, elbo_samples: int = 16, seed: int = 0,
                     split: str = "test", progress: bool = False) -> dict[str, Any]:
    """Bits/dim through the probability-flow ODE and the continuous ELBO on `data`'s `split`,
    written to `out`/likelihood.json and .md."""
    from .evaluation.bpd import evaluate_bpd, evaluate_elbo
    from .evaluation.sampling import load_model_for_sampling

    result_uri = storage.join(out, "likelihood.json")
    model = load_model_for_sampling(checkpoint)
    # Unconditional likelihood: a conditional model is evaluated with the null label (its p(x)).
    score_fn = model.score_fn(None)
    common = {"batch_size": batch_size, "seed": seed, "split": split, "max_samples": max_samples,
              "progress": progress}
    ode = evaluate_bpd(score_fn, model.sde, data, rtol=rtol, atol=atol, **common)
    elbo = evaluate_elbo(score_fn, model.sde, data, kind="continuous", n_samples=elbo_samples, **common)
    result = {"checkpoint": model.describe(), "data": data, "split": split, "ode": ode, "elbo": elbo}
    storage.write_json(result_uri, result)
    storage.write_bytes(storage.join(out, "likelihood.md"), likelihood_markdown(result).encode())
    return {"report": result_uri, "bpd_ode": ode["bpd"], "bpd_ode_stderr": ode["bpd_stderr"],
            "bpd_elbo": elbo["bpd"], "bpd_elbo_stderr": elbo["bpd_stderr"], "nfe_mean": ode["nfe_mean"],
            "n": ode["n"]}


def likelihood_markdown(result: dict[str, Any]) -> str:
    ode, elbo = result["ode"], result["elbo"]
    ck = result["checkpoint"]
    return "\n".join([
        f"## Likelihood of `{ck['uri']}` (step {ck['step']}) on `{result['data']}` ({result['split']})",
        "",
        "| estimate | bits/dim | ± s.e. | N | mean NFE |",
        "|---|---|---|---|---|",
        f"| probability-flow ODE | {ode['bpd']:.4f} | {ode['bpd_stderr']:.4f} | {ode['n']} | "
        f"{ode['nfe_mean']:.0f} |",
        f"| continuous ELBO (bound) | {elbo['bpd']:.4f} | {elbo['bpd_stderr']:.4f} | {elbo['n']} | "
        f"{elbo['nfe_mean']:.0f} |",
        "",
        f"SDE `{ck['sde']}`, parameterisation `{ck['parameterization']}`, checkpoint sha256 "
        f"`{ck['sha256'][:16]}…`. Settings: `{ode['settings']}`.",
        "",
    ])


def guidance_stage(checkpoint: str, data: str, classifier: str, out: str, *,
                   weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0),
                   samplers: tuple[str, ...] = ("heun",), steps: tuple[int, ...] = (16,), n: int = 200,
                   seed: int = 0) -> dict[str, Any]:
    """Ray Tune sweep of the guidance weight w (× sampler × NFE) scored by FID and classifier precision;
    an interrupted or finished sweep under `out` is restored, not redrawn."""
    from .tuning.guidance import SWEEP_FILE, restore_guidance, sweep_guidance

    if storage.exists(storage.join(out, SWEEP_FILE)):
        res = restore_guidance(out)
    else:
        res = sweep_guidance(checkpoint=checkpoint, data=data, classifier=classifier, out=out,
                             weights=tuple(weights), samplers=tuple(samplers), steps=tuple(steps), n=n,
                             seed=seed)
    overall = res["best"]["overall"]
    return {"best": overall, "rows": [{k: r[k] for k in ("sampler", "steps", "w", "fid", "precision", "nfe")}
                                      for r in res["rows"]],
            "report": res["report"], "complete": res["complete"]}
