"""Sampling at scale from a checkpoint: any sampler of the core, CFG weight w, Ray workers or inline,
samples written as WebDataset shards (the data pipeline's shard format) with a grid PNG and a record
of how every sample was made. The samples themselves come from `generate` (generate.py), whose
per-sample random streams make sample i independent of batching and workers.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import raykit, storage
from ..diffusion.dequantize import from_levels, to_levels
from ..training.checkpoint import SamplingModel, load_model
from .generate import SamplingPlan, generate
from .grid import grid_png

SAMPLES_SPLIT = "samples"
GRID_FILE = "grid.png"
MANIFEST_FILE = "manifest.json"


def _shard_bytes(
    images: np.ndarray, labels: Tensor | None, indices: Sequence[int], levels: int, uri: str
) -> bytes:
    """A shard in the data pipeline's format: {key}.png, {key}.cls (−1: unconditional), {key}.idx = i."""
    from ..data.shard import build_shard
    from ..data.sources import ArraySource

    lab = np.full(len(indices), -1, np.int64) if labels is None else labels.numpy().astype(np.int64)
    src = ArraySource(
        images, lab, uri=uri, label_names=[], levels=levels, fingerprint="", ids=np.asarray(indices, np.int64)
    )
    return build_shard(src, SAMPLES_SPLIT, int(indices[0]))


@dataclass(frozen=True)
class Execution:
    """Where and how the samples are drawn (not what they are: that is the plan)."""

    workers: int = 0  # 0: this process; k ≥ 1: k Ray tasks (one GPU each on cuda)
    device: str = "cpu"
    precision: str = "fp32"
    shard_size: int = 10_000
    grid_n: int = 100

    def validate(self) -> None:
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"workers must be an integer >= 0 (0 = this process), got {w!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available() and w == 0:
            raise ValueError(f"device={self.device!r} but no CUDA device is visible here")
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be an integer >= 1, got {self.shard_size!r}")


def sample_blocks(blocks: list[int], *, ckpt_uri: str, out_uri: str, plan: dict[str, Any],
                  execution: Execution, grid_n: int = 0,
                  model: SamplingModel | None = None) -> dict[str, Any]:
    """Generate `blocks` (contiguous), write them as shards under out_uri; one worker's work."""
    from ..data import manifest as mf

    t0 = time.perf_counter()
    p = SamplingPlan(**plan)
    if model is None:
        model = load_model(ckpt_uri, device=execution.device, precision=execution.precision)
    per_shard = max(execution.shard_size // p.batch_size, 1)
    shards, nfe, grid, sample_s = [], [], [], 0.0
    for g in range(0, len(blocks), per_shard):
        group = blocks[g : g + per_shard]
        done = list(generate(model, p, blocks=group))
        sample_s += sum(blk.seconds for blk in done)
        nfe += [blk.nfe for blk in done]
        images = np.concatenate([to_levels(blk.x, p.levels) for blk in done], 0)
        idx_all = [i for blk in done for i in blk.indices]
        labels = None if done[0].labels is None else torch.cat([blk.labels for blk in done])
        name = f"{SAMPLES_SPLIT}-{idx_all[0]:08d}.tar"
        data = _shard_bytes(images, labels, idx_all, p.levels, out_uri)
        storage.write_bytes(storage.join(out_uri, name), data)
        shards.append({"name": name, "split": SAMPLES_SPLIT, "count": len(idx_all), "first_index": idx_all[0],
                       "seeds": [p.seed(idx_all[0]), p.seed(idx_all[-1])], "blocks": [group[0], group[-1]],
                       "sha256": mf.bytes_sha256(data), "bytes": len(data)})
        if len(grid) < grid_n:
            grid.append(images[: grid_n - len(grid)])
    return {"shards": shards, "nfe": nfe, "sample_seconds": sample_s, "seconds": time.perf_counter() - t0,
            "grid": np.concatenate(grid, 0) if grid else None, "host": os.uname().nodename}


def _split_blocks(num_blocks: int, workers: int) -> list[list[int]]:
    """Contiguous runs of blocks, as even as possible, one per worker."""
    k = min(workers, num_blocks)
    edges = [round(j * num_blocks / k) for j in range(k + 1)]
    return [list(range(edges[j], edges[j + 1])) for j in range(k)]


def run_sampling(ckpt_uri: str, out_uri: str, plan: SamplingPlan, *, execution: Execution | None = None,
                 grid_nrow: int = 10, grid_scale: int | None = None) -> dict[str, Any]:
    """Draw the plan's samples from a checkpoint into shards + manifest.json + grid.png under out_uri.

    `execution.workers` = 0 samples in this process; ≥ 1 splits the blocks over that many Ray tasks.
    Returns the manifest written (its "sampling" entry is the provenance).
    """
    execution = execution or Execution()
    plan.validate()
    execution.validate()
    here = execution.device if execution.workers == 0 else "cpu"
    model = load_model(ckpt_uri, device=here, precision=execution.precision)
    plan.validate(model)
    storage.check_writable(out_uri)
    out_uri = out_uri.rstrip("/")
    muri = storage.join(out_uri, MANIFEST_FILE)
    storage.remove(muri)  # a manifest from an earlier run no longer describes what is being written

    t0 = time.perf_counter()
    parts = _split_blocks(plan.num_blocks(), max(execution.workers, 1))
    work = functools.partial(sample_blocks, ckpt_uri=ckpt_uri, out_uri=out_uri, plan=plan.to_dict(),
                             execution=execution)
    if execution.workers == 0:
        results = [work(parts[0], grid_n=execution.grid_n, model=model)]
    else:
        gpus = 1 if execution.device.startswith("cuda") else 0
        firsts = [functools.partial(work, grid_n=execution.grid_n if j == 0 else 0)
                  for j in range(len(parts))]
        done = dict(raykit.fan_out(_call, list(zip(firsts, parts, strict=True)), num_gpus=gpus))
        results = [done[j] for j in range(len(parts))]
    wall = time.perf_counter() - t0

    shards = [s for r in results for s in r["shards"]]
    count = sum(s["count"] for s in shards)
    if count != plan.n:  # a guard on the block arithmetic: never publish a short set
        raise RuntimeError(f"produced {count} samples, expected {plan.n}")
    nfe = [k for r in results for k in r["nfe"]]
    if results[0]["grid"] is not None:
        scale = grid_scale or max(1, 64 // model.image_shape[-1])
        storage.write_bytes(storage.join(out_uri, GRID_FILE),
                            grid_png(from_levels(results[0]["grid"], plan.levels), nrow=grid_nrow,
                                     levels=plan.levels, scale=scale))
    manifest = samples_manifest(model, plan, shards, nfe=nfe, wall=wall, execution=execution, results=results)
    storage.write_json(muri, manifest)
    # Shards of an earlier, different run in the same folder would confuse a listing; the manifest rules.
    current = {s["name"] for s in shards}
    for name in storage.listdir(out_uri):
        if name.startswith(f"{SAMPLES_SPLIT}-") and name.endswith(".tar") and name not in current:
            storage.remove(storage.join(out_uri, name))
    return manifest


def _call(item: tuple[Any, Any]) -> Any:
    fn, arg = item
    return fn(arg)


def samples_manifest(
    model: SamplingModel,
    plan: SamplingPlan,
    shards: list[dict[str, Any]],
    *,
    nfe: list[int],
    wall: float,
    execution: Execution,
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    """A manifest the data loader reads (split "samples"), plus the "sampling" provenance."""
    from ..data import manifest as mf

    C, H, W = model.image_shape
    k = model.num_classes
    sample_s = sum(r["sample_seconds"] for r in results)
    return {
        "format": mf.FORMAT,
        "package": {"name": "diffusion-pipeline", "version": mf.package_version()},
        "source": {
            "uri": model.checkpoint_uri,
            "kind": "samples",
            "fingerprint": "sha256:" + model.checkpoint_sha256,
        },
        "counts": {"train": 0, "test": 0, SAMPLES_SPLIT: plan.n, "total": plan.n},
        "image": {"shape": [H, W, C], "dtype": "uint8", "encoding": "png"},
        "levels": plan.levels,
        "label_names": [str(i) for i in range(k)] if k else [],
        "num_classes": k or 0,
        "sample_key": mf.SAMPLE_KEY,
        "fields": {
            **mf.FIELDS,
            "cls": "class the sample was conditioned on (-1: unconditional)",
            "idx": "sample index i; its x_T seed is base_seed + i",
        },
        "shards": sorted(shards, key=lambda s: s["first_index"]),
        "sampling": {
            "checkpoint": model.describe(),
            "plan": plan.to_dict(),
            "sampler": plan.method,
            "steps": plan.steps,
            "guidance_w": plan.guidance,
            "nfe_per_sample": {"mean": float(np.mean(nfe)), "min": int(min(nfe)), "max": int(max(nfe))},
            "seeds": {
                "base_seed": plan.base_seed,
                "rule": "seed(i) = base_seed + i seeds sample i's x_T",
                "first": plan.seed(0),
                "last": plan.seed(plan.n - 1),
                "block_size": plan.batch_size,
                "in_trajectory_noise": (
                    "none (deterministic sampler)"
                    if plan.deterministic
                    else "one generator per sample i, seed SamplingPlan.noise_seed(i)"
                ),
            },
            "labels": (
                None
                if k is None
                else f"class {plan.class_label}"
                if plan.class_label is not None
                else f"class(i) = i mod {k}"
            ),
            "device": execution.device,
            "precision": execution.precision,
            "workers": execution.workers,
            "torch": torch.__version__,
            "hosts": sorted({r["host"] for r in results}),
            "seconds": round(wall, 3),
            "sampling_seconds": round(sample_s, 3),
            "img_per_s": plan.n / wall if wall > 0 else None,
        },
    }


def regenerate(samples_uri: str, indices: Sequence[int], *, device: str = "cpu") -> Tensor:
    """Re-create samples `indices` from samples_uri's record ([-1, 1] floats, before quantisation), alone:
    every sample has its own random streams (generate.py), stochastic samplers included."""
    m = storage.read_json(storage.join(samples_uri.rstrip("/"), MANIFEST_FILE))
    rec = m["sampling"]
    plan = SamplingPlan(**rec["plan"])
    model = load_model(rec["checkpoint"]["uri"], device=device, weights=rec["checkpoint"]["weights"],
                       precision=rec.get("precision", "fp32"))
    if model.checkpoint_sha256 != rec["checkpoint"]["sha256"]:
        raise ValueError(f"checkpoint {rec['checkpoint']['uri']} changed since sampling (sha256 differs)")
    for i in indices:
        if not 0 <= i < plan.n:
            raise ValueError(f"index {i} outside the {plan.n} samples of {samples_uri}")
    (blk,) = generate(model, plan, indices=list(indices))
    return blk.x.cpu()


def read_samples(
    samples_uri: str, *, split: str = SAMPLES_SPLIT, batch_size: int = 512
) -> tuple[Tensor, Tensor, Tensor]:
    """All samples of a samples folder in index order, through the data loader: x [-1, 1] [N, C, H, W],
    labels [N] (−1: unconditional), indices [N]."""
    from ..data.loader import make_loader

    loader = make_loader(
        samples_uri, split, batch_size, shuffle_buffer=0, with_index=True, rank=0, world_size=1
    )
    xs, labels, idx = zip(*loader, strict=True)
    order = torch.cat(idx).argsort()
    return torch.cat(xs)[order], torch.cat(labels)[order], torch.cat(idx)[order]


__all__ = ["Execution", "read_samples", "regenerate", "run_sampling", "sample_blocks", "samples_manifest"]
