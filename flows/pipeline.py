"""The flows: shard → train → evaluate (sampling + FID + ODE bits/dim + ELBO) → tune, and the
end-to-end `diffusion_pipeline` that chains them under one root URI (`pipeline.layout.RunLayout`).

Flows only call stages (through the tasks) and publish what they made; recipes, layout and
defaults live in `pipeline/`.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact

from pipeline import runs, storage
from pipeline.config import RunOptions, TrainConfig
from pipeline.layout import RunLayout
from pipeline.lease import Lease
from pipeline.recipes import GUIDANCE_WEIGHTS, fid_features, is_conditional, train_recipe

from .params import EvalParams, SweepParams, TrainParams
from .runs import current_run, lease_ttl_s, run_owner
from .tasks import (
    classifier_task,
    ema_task,
    fid_task,
    guidance_task,
    likelihood_task,
    sample_task,
    schedule_search_task,
    shard_task,
    summary_task,
    train_task,
)


@flow(name="shard")
def shard_flow(source: str = "digits", data: str = "artifacts/run/data", shard_size: int = 1000,
               test_fraction: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Shard a source once; a rerun whose manifest is still there is answered from Prefect's cache."""
    from pipeline.data.manifest import manifest_uri
    from pipeline.stages import manifest_sha256

    refresh = not storage.exists(manifest_uri(data))
    res = shard_task.with_options(refresh_cache=refresh)(source, data, shard_size, test_fraction, seed)
    if not refresh and res["manifest_sha256"] != manifest_sha256(data):
        # The cached answer describes another manifest (re-sharded by hand): shard again.
        res = shard_task.with_options(refresh_cache=True)(source, data, shard_size, test_fraction, seed)
    return res


@flow(name="train")
def train_flow(data: str, out: str, config: dict[str, Any],
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ray Train DSM training; resumes from the latest checkpoint under `out`."""
    TrainConfig.from_dict(config)  # bad input fails here, before Ray starts
    RunOptions(**(options or {})).validate()
    return train_task(config, data, out, {"progress": False, **(options or {})})


@flow(name="evaluate")
def evaluate_flow(checkpoint: str, data: str, root: str, params: EvalParams | None = None, seed: int = 0,
                  domain_classifier: bool = True) -> dict[str, Any]:
    """Sampling + FID (domain or Inception features) + bits/dim by the ODE and the ELBO. Samples are
    stored and scored on the data's own grid of levels (its manifest's)."""
    from pipeline.data.manifest import read_manifest

    p = params or EvalParams()
    levels = int(read_manifest(data)["levels"])
    layout = RunLayout(root)
    classifier = classifier_task(data, layout.classifier)["classifier"] if domain_classifier else None
    samples = sample_task(checkpoint, layout.samples, p.n_samples, p.sampler, p.sample_steps, p.guidance,
                          seed, p.sample_workers, levels)
    fid = fid_task(samples["samples"], data, layout.eval, classifier, min(200, p.n_samples))
    like = likelihood_task(checkpoint, data, layout.eval, p.likelihood_samples, elbo_samples=p.elbo_samples)
    return {"samples": samples, "fid": fid, "likelihood": like, "classifier": classifier}


@flow(name="tune")
def tune_flow(checkpoint: str, data: str, classifier: str, out: str, weights: list[float] | None = None,
              steps: int = 16, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Guidance search on a trained conditional checkpoint (no retraining): FID and precision versus w.
    The schedule search retrains per trial: `diffusion-pipeline tune schedules`."""
    weights = list(GUIDANCE_WEIGHTS) if weights is None else weights
    return guidance_task(checkpoint, data, classifier, out, weights, steps, n, seed)


@flow(name="schedule-search")
def schedule_search_flow(data: str, out: str, space: dict[str, Any], preset: str = "tiny-digits",
                         steps: int = 500, batch_size: int = 128, seed: int = 0,
                         options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ray Tune search over noise processes and loss weightings (ASHA over Ray Train trials) on the
    preset's recipe; `options` are `tuning.search.ScheduleSearch` fields (metric, evaluations, ...).
    A rerun on the same `out` restores the search instead of starting over."""
    base = train_recipe(preset, steps=steps, batch_size=batch_size, seed=seed)
    return schedule_search_task(space, base.to_dict(), data, out, options or {})


@flow(name="diffusion-pipeline", log_prints=True)
def diffusion_pipeline(source: str = "digits", root: str = "artifacts/run", preset: str = "tiny-digits",
                       seed: int = 0, train: TrainParams | None = None, evaluate: EvalParams | None = None,
                       sweep: SweepParams | None = None, ray_dashboard: str | None = None,
                       mode: Literal["fresh", "continue"] = "fresh") -> dict[str, Any]:
    """shard → train → sample → FID → bits/dim and ELBO → guidance sweep, every artifact under `root`.

    `root` may be a template resolved once per run (`pipeline.runs.ROOT_FIELDS`), e.g.
    `s3://bucket/runs/{deployment}/{date}`. mode="continue" advances the newest completed run of that
    series by `train.slice_steps` steps from its last checkpoint and evaluates it again, in its root.
    The run holds a lease on its root: a second run on the same root refuses, naming this one.
    The sweep needs a conditional model and the domain classifier; `sweep.weights=[]` skips it."""
    logger = get_run_logger()
    tp, ep, sp = train or TrainParams(), evaluate or EvalParams(), sweep or SweepParams()
    plan = runs.plan_run(root, current_run(), mode=mode)  # bad template / nothing to continue: fail now
    for warning in plan.warnings:
        logger.warning(warning)
    logger.info("root: %s (%s run; template %s)", plan.root, plan.mode, plan.template)
    if ray_dashboard:
        create_link_artifact(link=ray_dashboard, link_text="Ray dashboard", key="ray-dashboard")
    storage.check_writable(plan.root)  # a missing bucket or credentials fail now, not after training
    with Lease(plan.root, run_owner(plan.run), ttl_s=lease_ttl_s()) as lease:
        if lease.took_over:
            logger.warning("took over the expired lease of %s", lease.took_over.owner)
        for warning in runs.record_start(plan):
            logger.warning(warning)
        if plan.mode == "continue":
            config, start = runs.continuation_config(RunLayout(plan.root).train, tp.slice_steps)
            logger.info("continuing %s from step %d to step %d", plan.root, start, config.steps)
        else:
            config = train_recipe(preset, steps=tp.steps, batch_size=tp.batch_size, seed=seed)
            config = config.replace(xflip=tp.xflip)
            if tp.phema_every:  # EDM2's two profiles, for the optional EMA search
                config = config.replace(phema_sigma_rels=(0.05, 0.10), phema_every=tp.phema_every)
        summary = _run_stages(plan.root, source, config, tp, ep, sp)
        pointer = runs.write_latest(plan)
    if pointer:
        logger.info("latest: %s → %s", pointer, plan.root)
    return summary


def _run_stages(root: str, source: str, config: TrainConfig, tp: TrainParams, ep: EvalParams,
                sp: SweepParams) -> dict[str, Any]:
    logger = get_run_logger()
    layout, seed = RunLayout(root), config.seed
    data = shard_flow(source, layout.data, seed=seed)
    logger.info("dataset: %s (%s train images)", data["data"], data["counts"]["train"])
    options = {"workers": tp.workers, "gpus_per_worker": tp.gpus_per_worker, "report_every": tp.report_every,
               "checkpoint_every": tp.checkpoint_every}
    trained = train_flow(data["data"], layout.train, config.to_dict(), options)
    evaluated = evaluate_flow(trained["ema"], data["data"], root, ep, seed,
                              domain_classifier=fid_features(data["levels"], data["image_shape"]) == "domain")
    weights = list(GUIDANCE_WEIGHTS) if sp.weights is None else list(sp.weights)
    tuned = None
    if weights and evaluated["classifier"] and is_conditional(config):
        tuned = tune_flow(trained["ema"], data["data"], evaluated["classifier"], layout.tune, weights,
                          sp.steps, sp.samples, seed)
    ema = None
    if sp.ema_sigma_rels and config.phema_every and evaluated["classifier"]:
        options = {"sigma_rels": list(sp.ema_sigma_rels), "n": sp.samples, "steps": sp.steps, "seed": seed}
        ema = ema_task(layout.train, data["data"], evaluated["classifier"], storage.join(layout.tune, "ema"),
                       options)
    summary = {"root": root, "data": data, "train": trained, "evaluate": evaluated, "tune": tuned,
               "ema": ema}
    report = summary_task(summary)
    logger.info("report: %s", report["report"])
    return report["summary"]
