"""The latent branch (Rombach et al. 2022) as a Prefect flow: shard → autoencoder → latent shards →
diffusion prior on the latents → decoded samples → FID beside the pixel data, and the likelihood bound.

Thin, as the other flows: each task is one `pipeline.latent.stages` call whose markdown is published
(`flows.tasks.publish`), pictures embedded in it. Everything lands under `root` (`LatentLayout`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from pipeline import reports, storage
from pipeline.config import RunOptions
from pipeline.latent import stages as latent
from pipeline.latent.layout import LatentLayout, autoencoder_recipe, prior_recipe
from pipeline.layout import RunLayout

from .params import EvalParams, TrainParams
from .pipeline import shard_flow
from .tasks import RETRY, _link, _LiveTraining, classifier_task, fid_task, publish


@task(name="autoencoder", **RETRY)
def autoencoder_task(config: dict[str, Any], data: str, out: str, options: dict[str, Any]) -> dict[str, Any]:
    res = latent.autoencoder_stage(
        config, data, out, options=RunOptions(**options), on_progress=_LiveTraining()
    )
    res = publish(res, "autoencoder", "autoencoder training and test reconstructions")
    _link(res["ema"], "autoencoder EMA weights", "autoencoder-weights")
    return res


@task(name="encode-latents", **RETRY)
def encode_task(data: str, autoencoder: str, dest: str, overwrite: bool = False) -> dict[str, Any]:
    res = latent.encode_stage(data, autoencoder, dest, overwrite=overwrite)
    return publish(res, "latent-shards", "float16 latent shards and their manifest")


@task(name="latent-train", **RETRY)
def latent_train_task(
    config: dict[str, Any], latents: str, out: str, options: dict[str, Any]
) -> dict[str, Any]:
    res = latent.latent_train_stage(
        config, latents, out, options=RunOptions(**options), on_progress=_LiveTraining()
    )
    return publish(res, "latent-training", "the diffusion prior on the latents")


@task(name="decoded-samples", **RETRY)
def decoded_sample_task(
    checkpoint: str,
    autoencoder: str,
    latents: str,
    out: str,
    n: int,
    method: str,
    steps: int,
    guidance: float,
    seed: int,
) -> dict[str, Any]:
    res = latent.decoded_sample_stage(
        checkpoint, autoencoder, latents, out, n=n, method=method, steps=steps, guidance=guidance, seed=seed
    )
    return publish(res, "decoded-samples", "latent samples decoded to pixels")


@task(name="latent-likelihood", **RETRY)
def latent_likelihood_task(
    checkpoint: str, autoencoder: str, latents: str, out: str, max_samples: int
) -> dict[str, Any]:
    res = latent.latent_likelihood_stage(checkpoint, autoencoder, latents, out, max_samples=max_samples)
    return publish(res, "latent-likelihood", "a bound on the pixel bits/dim")


@flow(name="latent-pipeline", log_prints=True)
def latent_pipeline(
    source: str = "digits",
    root: str = "artifacts/latent-run",
    autoencoder_preset: str = "vae-digits",
    preset: str = "tiny-digits",
    seed: int = 0,
    autoencoder_steps: int = 600,
    train: TrainParams | None = None,
    evaluate: EvalParams | None = None,
    overwrite_latents: bool = False,
    pixel_fid: float | None = None,
) -> dict[str, Any]:
    """The latent branch under `root`; the pixel model's FID (`pixel_fid`, or read from `diffusion_pipeline`'s
    report under the same root) is shown beside the decoded samples' FID."""
    logger = get_run_logger()
    tp, ep = train or TrainParams(), evaluate or EvalParams()
    layout, run = LatentLayout(root), RunLayout(root)
    storage.check_writable(root)
    ae_cfg = autoencoder_recipe(
        autoencoder_preset, steps=autoencoder_steps, batch_size=tp.batch_size, seed=seed
    )
    prior = prior_recipe(preset, steps=tp.steps, batch_size=tp.batch_size, seed=seed)
    options = {
        "workers": tp.workers,
        "gpus_per_worker": tp.gpus_per_worker,
        "report_every": tp.report_every,
        "checkpoint_every": tp.checkpoint_every,
        "progress": False,
    }
    data = shard_flow(source, run.data, seed=seed)
    ae = autoencoder_task(ae_cfg.to_dict(), data["data"], layout.autoencoder, options)
    latents = encode_task(data["data"], ae["ema"], layout.latents, overwrite_latents)
    logger.info(
        "latents: %s (shape %s, scale %.4g)",
        latents["data"],
        latents["latent_shape"],
        latents["scale_factor"],
    )
    trained = latent_train_task(prior.to_dict(), latents["data"], layout.train, options)
    classifier = classifier_task(data["data"], run.classifier)["classifier"]
    samples = decoded_sample_task(
        trained["ema"],
        ae["ema"],
        latents["data"],
        layout.samples,
        ep.n_samples,
        ep.sampler,
        ep.sample_steps,
        0.0,
        seed,
    )
    fid = fid_task(samples["samples"], data["data"], layout.eval, classifier, min(200, ep.n_samples))
    bound = latent_likelihood_task(
        trained["ema"], ae["ema"], latents["data"], layout.eval, ep.likelihood_samples
    )
    if pixel_fid is None:  # the pixel branch (`diffusion_pipeline`) on the same root, if it ran
        pixel_fid = latent.pixel_fid(root)
    summary = {
        "root": root,
        "data": data,
        "autoencoder": ae,
        "latents": latents,
        "train": trained,
        "samples": samples,
        "fid": fid,
        "likelihood_bound": bound,
        "pixel_fid": pixel_fid,
    }
    publish({"markdown": summary_markdown(summary)}, "latent-report", "the latent branch at a glance")
    return summary


def summary_markdown(s: dict[str, Any]) -> str:
    """FID of the decoded samples beside the pixel model's, and the bound."""
    rows = [
        ("autoencoder test MSE", s["autoencoder"].get("reconstruction_mse")),
        ("latent shape", "×".join(map(str, s["latents"]["latent_shape"]))),
        ("scale factor", s["latents"]["scale_factor"]),
        ("FID (decoded latent samples, domain features)", s["fid"].get("fid")),
        ("FID (pixel model)", s.get("pixel_fid")),
        ("bits/dim (upper bound)", s["likelihood_bound"].get("bpd_bound")),
    ]
    return "### Latent diffusion\n\n" + reports.table(rows)


__all__ = ["latent_pipeline", "summary_markdown"]
