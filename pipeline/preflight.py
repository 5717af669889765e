"""Check every stage's options of the end-to-end run before anything starts (no Prefect, no Ray, no
sharding): a bad sampler, guidance weight, step count or sample size, data whose images do not fit
the preset's network (and so the FID features), and a root that cannot be written would otherwise
fail only in the stage that uses them, after sharding, training and the classifier have run.

`check_run(params)` takes the flow's parameters with each group (train, evaluate, sweep) as a plain
dict of all its fields; it raises a ValueError naming the field, and returns what it worked out.
"""

from __future__ import annotations

import math
from typing import Any

from . import storage
from .config import RunOptions, TrainConfig
from .layout import RunLayout
from .recipes import GUIDANCE_WEIGHTS, fid_features, is_conditional, train_recipe

SWEEP_SAMPLER = "heun"  # the sampler the end-to-end guidance sweep uses


def _data_image(source: str, data: str) -> tuple[tuple[int, int, int], int, dict[str, Any] | None]:
    """((H, W, C), levels, manifest or None) of the data the run will train on: the manifest of an
    earlier shard under the root when there is one, else the source itself (opening it reads its
    index, not its pixels)."""
    from .data.manifest import manifest_uri, read_manifest
    from .data.sources import open_source

    if storage.exists(manifest_uri(data)):
        m = read_manifest(data)
        return tuple(int(v) for v in m["image"]["shape"]), int(m["levels"]), m
    src = open_source(source)
    return tuple(src.shape), src.levels, None


def _check_weight(name: str, w: Any, conditional: bool, preset: str) -> None:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    if w > 0 and not conditional:
        raise ValueError(f"{name}={w}: preset {preset!r} is unconditional; classifier-free guidance needs "
                         "a conditional model (use 0)")


def check_run(params: dict[str, Any]) -> dict[str, Any]:
    """Validate the end-to-end run `params` (source, root, preset, seed, train, evaluate, sweep).

    Returns {"config": TrainConfig, "image_shape": (H, W, C), "levels", "features", "conditional"}."""
    from .diffusion import samplers as core
    from .diffusion.sde import build_sde
    from .evaluation.generate import SamplingPlan
    from .models import preset_config
    from .training.ray_train import check_network

    root, preset, seed = params["root"], params.get("preset", "tiny-digits"), params.get("seed", 0)
    tp, ep, sp = params["train"], params["evaluate"], params.get("sweep") or {}
    if "{" in root:  # a per-run template (pipeline.runs): probe the fixed folder above its fields
        root = storage.parent(root.split("{", 1)[0] + "x")
    # The root: a real object written and deleted (os.access says yes to root even under /proc).
    storage.check_writable(root)

    # Training: the recipe's config, the network with its overrides, the run options.
    config: TrainConfig = train_recipe(preset, steps=tp["steps"], batch_size=tp["batch_size"],
                                       seed=seed).replace(xflip=bool(tp.get("xflip", False)))
    check_network(config)
    options = RunOptions(workers=tp["workers"], gpus_per_worker=tp["gpus_per_worker"],
                         report_every=tp.get("report_every", 100),
                         checkpoint_every=tp.get("checkpoint_every", 1000))
    options.validate()
    if config.batch_size % options.workers:
        raise ValueError(f"train.batch_size={config.batch_size} must be divisible by "
                         f"train.workers={options.workers}")

    # The data against the network: FID compares samples (the network's size) with the data.
    shape, levels, manifest = _data_image(params.get("source", "digits"), RunLayout(root).data)
    net = preset_config(config.preset, **config.model_overrides)
    H, W, C = shape
    if (net["in_channels"], net["image_size"], net["image_size"]) != (C, H, W):
        raise ValueError(f"source {params.get('source')!r} holds {C}×{H}×{W} images but preset {preset!r} "
                         f"makes {net['in_channels']}×{net['image_size']}×{net['image_size']}: training "
                         "and FID need one resolution; choose a preset of the data's size")
    if config.xflip and manifest is not None:
        from .data.augment import check_xflip

        check_xflip(manifest, RunLayout(root).data)
    features = fid_features(levels, shape)
    conditional = is_conditional(config)

    # Sampling: sampler, its steps against the recipe's process, N, guidance.
    sde = build_sde(config.sde, **config.sde_kwargs)
    plan = SamplingPlan(n=ep["n_samples"], method=ep["sampler"], steps=ep["sample_steps"],
                        guidance=ep["guidance"], base_seed=seed, levels=levels)
    try:
        plan.validate()
        core.check_options(plan.method, sde, plan.steps, core.allowed_options(plan.method))
    except ValueError as e:
        raise ValueError(f"evaluate: {e}") from None
    _check_weight("evaluate.guidance", ep["guidance"], conditional, preset)
    if isinstance(ep.get("sample_workers", 0), bool) or ep.get("sample_workers", 0) < 0:
        raise ValueError(f"evaluate.sample_workers must be an integer >= 0, got {ep.get('sample_workers')!r}")

    # The guidance sweep (it runs on conditional models with domain features).
    weights = list(GUIDANCE_WEIGHTS) if sp.get("weights") is None else list(sp["weights"])
    if weights and conditional and features == "domain":
        for w in weights:
            _check_weight("sweep.weights", w, conditional, preset)
        if len(set(weights)) != len(weights):
            raise ValueError(f"sweep.weights: duplicates in {weights}")
        steps = sp.get("steps", 12)
        try:
            core.check_options(SWEEP_SAMPLER, sde, steps, core.allowed_options(SWEEP_SAMPLER))
        except ValueError as e:
            raise ValueError(f"sweep: {e}") from None
        if isinstance(sp.get("samples", 200), bool) or not isinstance(sp.get("samples", 200), int) \
                or sp.get("samples", 200) < 2:
            raise ValueError(f"sweep.samples must be an integer >= 2, got {sp.get('samples')!r}")
    return {"config": config, "image_shape": shape, "levels": levels, "features": features,
            "conditional": conditional}


__all__ = ["SWEEP_SAMPLER", "check_run"]
