"""The flows: shard → train → evaluate (sampling + FID + ODE bits/dim + ELBO) → tune, and the
end-to-end `diffusion_pipeline` that chains them under one root URI:

    {root}/data/         WebDataset shards + manifest.json
    {root}/train/        checkpoints, EMA export, history, Ray run storage
    {root}/classifier/   the domain classifier (FID features for small domains)
    {root}/samples/      samples as shards + grid.png + the record of every seed
    {root}/eval/         FID/KID and likelihood reports (JSON + markdown)
    {root}/tune/         the guidance sweep (Ray Tune storage, report, plots)
    {root}/report.md     the summary of the run
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from pipeline import storage
from pipeline.config import TrainConfig

from .tasks import (
    classifier_task,
    fid_task,
    guidance_task,
    likelihood_task,
    sample_task,
    shard_task,
    train_task,
)


def default_train_config(preset: str, *, steps: int, batch_size: int, seed: int = 0) -> TrainConfig:
    """The recipe for a preset: EDM preconditioning and loss (Karras et al. 2022) on the VP process."""
    small = preset == "tiny-digits"
    return TrainConfig(preset=preset, sde="vp", loss="edm", loss_kwargs={"sigma_data": 0.5},
                       label_dropout=0.1, lr=2e-3 if small else 2e-4, warmup_steps=min(200, steps // 5),
                       batch_size=batch_size, steps=steps, ema_halflife_kimg=20.0 if small else 500.0,
                       seed=seed)


@flow(name="shard")
def shard_flow(source: str = "digits", data: str = "artifacts/run/data", shard_size: int = 1000,
               test_fraction: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Shard a source once; a rerun whose manifest is still there is answered from Prefect's cache."""
    from pipeline.data.manifest import manifest_uri

    refresh = not storage.exists(manifest_uri(data))
    res = shard_task.with_options(refresh_cache=refresh)(source, data, shard_size, test_fraction, seed)
    if not refresh and res["manifest_sha256"] != _manifest_sha(data):
        # The cached answer describes another manifest (re-sharded by hand): shard again.
        res = shard_task.with_options(refresh_cache=True)(source, data, shard_size, test_fraction, seed)
    return res


def _manifest_sha(data: str) -> str:
    from pipeline.stages import manifest_sha256

    return manifest_sha256(data)


@flow(name="train")
def train_flow(data: str, out: str, config: dict[str, Any], workers: int = 1, gpus_per_worker: float = 0.0,
               report_every: int = 100, checkpoint_every: int = 500) -> dict[str, Any]:
    """Ray Train DSM training; resumes from the latest checkpoint under `out`."""
    TrainConfig.from_dict(config)  # bad input fails here, before Ray starts
    return train_task(config, data, out, workers, gpus_per_worker, report_every, checkpoint_every)


@flow(name="evaluate")
def evaluate_flow(checkpoint: str, data: str, root: str, n_samples: int = 500, sampler: str = "heun",
                  sample_steps: int = 32, guidance: float = 1.0, seed: int = 0, sample_workers: int = 0,
                  domain_classifier: bool = True, likelihood_samples: int = 128, elbo_samples: int = 8,
                  kid_subset_size: int = 200) -> dict[str, Any]:
    """Sampling + FID (domain or Inception features) + bits/dim by the ODE and the ELBO."""
    classifier = None
    if domain_classifier:
        classifier = classifier_task(data, storage.join(root, "classifier"))["classifier"]
    samples = sample_task(checkpoint, storage.join(root, "samples"), n_samples, sampler, sample_steps,
                          guidance, seed, sample_workers)
    fid = fid_task(samples["samples"], data, storage.join(root, "eval"), classifier,
                   min(kid_subset_size, n_samples))
    like = likelihood_task(checkpoint, data, storage.join(root, "eval"), likelihood_samples,
                           elbo_samples=elbo_samples)
    return {"samples": samples, "fid": fid, "likelihood": like, "classifier": classifier}


@flow(name="tune")
def tune_flow(checkpoint: str, data: str, classifier: str, out: str, weights: list[float] | None = None,
              steps: int = 16, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Guidance search on a trained conditional checkpoint (no retraining): FID and precision versus w.
    The schedule search retrains per trial: `diffusion-pipeline tune schedules`."""
    weights = [0.0, 0.5, 1.0, 2.0, 4.0] if weights is None else weights
    return guidance_task(checkpoint, data, classifier, out, weights, steps, n, seed)


@flow(name="diffusion-pipeline", log_prints=True)
def diffusion_pipeline(source: str = "digits", root: str = "artifacts/run", preset: str = "tiny-digits",
                       train_steps: int = 1500, batch_size: int = 128, workers: int = 1,
                       gpus_per_worker: float = 0.0, checkpoint_every: int = 500, n_samples: int = 500,
                       sampler: str = "heun", sample_steps: int = 32, guidance: float = 1.0,
                       likelihood_samples: int = 128, guidance_sweep: list[float] | None = None,
                       sweep_samples: int = 200, sweep_steps: int = 12, seed: int = 0,
                       ray_dashboard: str | None = None) -> dict[str, Any]:
    """shard → train → sample → FID → bits/dim and ELBO → guidance sweep, every artifact under `root`.

    guidance_sweep: the w values to sweep (default 0, 0.5, 1, 2, 4; [] skips the sweep); it needs a
    conditional model and the domain classifier."""
    logger = get_run_logger()
    if ray_dashboard:
        create_link_artifact(link=ray_dashboard, link_text="Ray dashboard", key="ray-dashboard")
    config = default_train_config(preset, steps=train_steps, batch_size=batch_size, seed=seed).to_dict()
    storage.check_writable(root)  # a missing bucket or credentials fail now, not after training
    data = shard_flow(source, storage.join(root, "data"), seed=seed)
    logger.info("dataset: %s (%s train images)", data["data"], data["counts"]["train"])
    trained = train_flow(data["data"], storage.join(root, "train"), config, workers, gpus_per_worker,
                         checkpoint_every=checkpoint_every)
    evaluated = evaluate_flow(trained["ema"], data["data"], root, n_samples=n_samples, sampler=sampler,
                              sample_steps=sample_steps, guidance=guidance, seed=seed,
                              domain_classifier=data["levels"] != 256 or data["image_shape"][0] < 32,
                              likelihood_samples=likelihood_samples)
    weights = [0.0, 0.5, 1.0, 2.0, 4.0] if guidance_sweep is None else list(guidance_sweep)
    tuned = None
    if weights and evaluated["classifier"] and config_is_conditional(config):
        tuned = tune_flow(trained["ema"], data["data"], evaluated["classifier"], storage.join(root, "tune"),
                          weights, sweep_steps, sweep_samples, seed)
    summary = {"root": root, "data": data, "train": trained, "evaluate": evaluated, "tune": tuned}
    report = summary_markdown(summary)
    storage.write_bytes(storage.join(root, "report.md"), report.encode())
    storage.write_json(storage.join(root, "summary.json"), summary)
    create_markdown_artifact(report, key="pipeline-report", description="the run at a glance")
    logger.info("report: %s", storage.join(root, "report.md"))
    return summary


def config_is_conditional(config: dict[str, Any]) -> bool:
    from pipeline.models import preset_config

    return preset_config(config["preset"], **config.get("model_overrides", {})).get("num_classes") is not None


def summary_markdown(s: dict[str, Any]) -> str:
    ev = s["evaluate"]
    fid, like, smp = ev["fid"], ev["likelihood"], ev["samples"]
    floor = (fid.get("floor") or {}).get("fid")
    floor_text = f" (real-vs-real floor {floor:.3f})" if floor is not None else ""
    lines = [
        f"# Diffusion pipeline run: `{s['root']}`", "",
        "| stage | result |", "|---|---|",
        f"| data | {s['data']['counts']['train']} train / {s['data']['counts']['test']} test images, "
        f"`{s['data']['data']}` |",
        f"| train | step {s['train']['step']}, EMA `{s['train']['ema']}` |",
        f"| samples | {smp['n']} × {smp['method']} ({smp['steps']} steps, NFE {smp['nfe_per_sample']:.0f}, "
        f"w={smp['guidance_w']:g}), grid `{smp['grid']}` |",
        f"| FID | {fid['fid']:.3f}{floor_text} |",
        f"| bits/dim, ODE | {like['bpd_ode']:.4f} ± {like['bpd_ode_stderr']:.4f} (N={like['n']}, "
        f"NFE {like['nfe_mean']:.0f}) |",
        f"| bits/dim, ELBO | {like['bpd_elbo']:.4f} ± {like['bpd_elbo_stderr']:.4f} |",
    ]
    if s.get("tune"):
        best = s["tune"]["best"]
        curve = ", ".join(f"w={r['w']:g}: {r['fid']:.2f}" for r in s["tune"]["rows"] if r["fid"] is not None)
        lines.append(f"| guidance sweep | best w={best['w']:g} (FID {best['fid']:.3f}); FID by w: {curve} |")
    lines.append("")
    return "\n".join(lines)
