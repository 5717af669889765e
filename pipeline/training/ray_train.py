"""Distributed DSM training on Ray Train (V2): the only module that imports `ray.train`.

`train()` validates everything on the driver (preset, options, data manifest, output storage, cluster
resources), then runs `Trainer`/`fit` from loop.py in each worker of a `TorchTrainer`: DDP over NCCL on
GPUs, gloo on CPUs, the WebDataset shards split by rank. Rank 0 writes checkpoints with checkpoint.py
to `{out}/checkpoints/` (model, EMA, optimiser, step, and every rank's data position and RNG states)
and reports a small pointer checkpoint to Ray, whose run storage is `{out}/ray` on the same object
store. When a worker dies, Ray restarts the worker group (`FailureConfig(max_failures)`) and every new
worker resumes from the latest checkpoint under `{out}`, so at most one checkpoint interval is redone.

Reports stay off the hot path. `ray.train.report` is a barrier across workers, and each worker's
result queue holds one report, which the controller drains once per health-check interval
(`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, Ray's default 2 s; `train()` sets 0.5 s unless it is set): a
report blocks for up to that interval only when the previous one has not been collected yet. Reports
therefore come every `report_every` steps (seconds apart at real batch sizes), never per step, and
metrics stay on the device between them (loop.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import raykit, storage
from ..config import RunOptions, TrainConfig
from ..layout import RunLayout
from .checkpoint import (
    EMA_EXPORT,
    export_ema,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from .loop import Batch, Trainer, fit, unwrap
from .phema_store import write_snapshots
from .progress import write_progress

log = logging.getLogger(__name__)
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POINTER = "checkpoint.json"

# batches_factory(rank=, world_size=, batch_size=, seed=, device=) -> batches(epoch) -> (x, labels)...
BatchesFactory = Callable[..., Callable[[int], Iterable[Batch]]]
StepHook = Callable[[Trainer, Tensor, "Tensor | None"], None]


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished run left behind (URIs) and its last reported metrics."""

    step: int
    metrics: dict[str, Any]
    checkpoint: str | None
    ema: str
    history: list[dict[str, Any]]
    ray_path: str | None
    seconds: float


@dataclass(frozen=True, kw_only=True)
class _Job:
    """Everything a worker needs, validated on the driver and shipped in train_loop_config."""

    config: dict[str, Any]
    data: str | None
    out: str
    options: RunOptions
    batches: BatchesFactory | None = None
    on_step: StepHook | None = None
    evaluate: Callable[[Trainer], dict[str, Any]] | None = None
    env: dict[str, str] = field(default_factory=dict)


# ---- driver ---------------------------------------------------------------------------------------


def train(config: TrainConfig, *, data: str | None, out: str, options: RunOptions | None = None,
          batches: BatchesFactory | None = None, on_step: StepHook | None = None, run_name: str = "train",
          callbacks: Sequence[Any] = (),
          evaluate: Callable[[Trainer], dict[str, Any]] | None = None) -> TrainResult:
    """Train `config` with `options.workers` Ray Train workers; checkpoints and EMA export under `out`.

    `data` is a sharded dataset (folder or manifest URI). `batches` replaces the WebDataset loader
    (synthetic data for benchmarks); `on_step(trainer, x, labels)` runs in every worker after each step.
    Without `options.resume`, `out` must hold no checkpoint; with it, the run continues from the latest.
    `callbacks` are Ray Train callbacks for the RunConfig (a Tune trial passes its report callback);
    `evaluate(trainer) -> metrics` runs on rank 0 at every report and its metrics join that report.
    `RAY_ADDRESS` selects a cluster; otherwise a local one starts (and stops at the end).
    """
    options = options or RunOptions()
    out = raykit.absolute(out)
    data = raykit.absolute(data) if data is not None else None
    resume_step = validate_run(config, data=data if batches is None else None, out=out, options=options,
                               need_data=batches is None)
    if options.health_check_interval_s is not None:
        # Ray Train V2 forwards this variable from the driver to its controller and workers.
        os.environ.setdefault(HEALTH_CHECK_ENV, str(options.health_check_interval_s))

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if resume_step is not None:
        log.info("resuming %s from step %d", out, resume_step)
    with raykit.session():
        check_cluster(options)
        job = _Job(config=config.to_dict(), data=data, out=out, options=options, batches=batches,
                   on_step=on_step, evaluate=evaluate, env=storage.worker_env())
        resources = {"CPU": float(options.cpus_per_worker)}
        if options.gpus_per_worker > 0:
            resources["GPU"] = float(options.gpus_per_worker)
        storage_path, storage_fs = raykit.ray_storage(storage.join(out, "ray"))
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=options.workers, use_gpu=options.gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=options.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=options.keep_last),
                                 callbacks=list(callbacks) or None),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
    history_uri = RunLayout.history(out)
    history = storage.read_json(history_uri) if storage.exists(history_uri) else []
    final = list_checkpoints(out)
    return TrainResult(step=final[-1][0] if final else 0, metrics=dict(result.metrics or {}),
                       checkpoint=final[-1][1] if final else None, ema=storage.join(out, EMA_EXPORT),
                       history=history, ray_path=getattr(result, "path", None), seconds=seconds)


def validate_run(config: TrainConfig, *, data: str | None, out: str, options: RunOptions | None = None,
                 need_data: bool = True) -> int | None:
    """Check a run before any worker starts; ValueError naming the field otherwise.

    Returns the step of the checkpoint a resumed run continues from (None for a fresh run).
    """
    from ..diffusion.losses import build_loss
    from ..diffusion.sde import build_sde
    from ..models import preset_config

    options = options or RunOptions()
    options.validate()
    if config.batch_size % options.workers:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by workers={options.workers} "
                         "(it is the global batch, split evenly across ranks)")
    if config.model == "autoencoder":  # latent diffusion's autoencoder (issue 18)
        from ..models.autoencoder import build_autoencoder, build_autoencoder_loss

        ae = build_autoencoder(config.preset, **config.model_overrides)  # unknown preset → ValueError
        net_cfg = {**ae.config, "num_classes": None}
        build_autoencoder_loss(ae, **config.loss_kwargs)
    else:
        preset_config(config.preset)  # unknown preset → ValueError naming it
        check_network(config)  # then the overrides, named
        net_cfg = preset_config(config.preset, **config.model_overrides)
        try:
            sde = build_sde(config.sde, **config.sde_kwargs)
        except TypeError as e:
            raise ValueError(f"sde_kwargs={config.sde_kwargs}: not options of sde {config.sde!r} "
                             f"({e})") from None
        try:
            build_loss(config.loss, sde, **config.loss_kwargs)
        except TypeError as e:
            raise ValueError(f"loss_kwargs={config.loss_kwargs}: not options of loss {config.loss!r} "
                             f"({e})") from None
    if need_data:
        if data is None:
            raise ValueError("data: a sharded dataset URI is required (folder holding manifest.json)")
        _check_data(data, config, net_cfg, options)
    storage.check_writable(out)
    if storage.is_local(out):
        # os.access says yes to root everywhere (even /proc): write a real probe file.
        probe = storage.join(out, f".write-probe-{os.getpid()}")
        try:
            storage.write_bytes(probe, b"")
            storage.remove(probe)
        except OSError as e:
            raise ValueError(f"out={out}: cannot be written ({e})") from e
    latest = list_checkpoints(out)
    if latest and not options.resume:
        raise ValueError(f"out={out} already holds checkpoints (latest: step {latest[-1][0]}); "
                         "pass resume=True (--resume) to continue that run, or choose another out")
    if latest and latest[-1][0] > config.steps:
        raise ValueError(f"steps={config.steps} is below the step {latest[-1][0]} already reached in {out}")
    return latest[-1][0] if latest else None


def _check_data(data: str, config: TrainConfig, net_cfg: dict[str, Any], options: RunOptions) -> None:
    """The dataset's manifest exists, has the split with a shard per rank and a batch per rank, its
    images and labels fit the network, and its augmentation is allowed."""
    from ..data.manifest import read_manifest, shard_entries

    manifest = read_manifest(data)  # ValueError when there is no manifest
    split, workers = options.split, options.workers
    shards = shard_entries(manifest, split)  # ValueError when the split is missing
    if len(shards) < workers:
        raise ValueError(f"data={data}: split {split!r} has {len(shards)} shards, fewer than "
                         f"workers={workers} (shards are split by rank): reshard with a smaller --shard-size")
    count = (manifest.get("counts") or {}).get(split)
    if count is not None and config.batch_size > int(count):
        raise ValueError(f"batch_size={config.batch_size} exceeds the {count} images of split {split!r} "
                         f"of data={data}: choose batch_size <= {count}")
    counts = sorted(int(s["count"]) for s in shards if isinstance(s.get("count"), int))
    if len(counts) == len(shards):
        # Shards are dealt to ranks (in an epoch-dependent order): the poorest rank holds at least the
        # len // workers smallest shards, and must fill one batch of its share per epoch.
        least, per_rank = sum(counts[: len(counts) // workers]), config.batch_size // workers
        if per_rank > least:
            raise ValueError(f"batch_size={config.batch_size} over workers={workers} is {per_rank} images "
                             f"per rank, but a rank may get only {least} images of split {split!r} of "
                             f"data={data}: choose batch_size <= {least * workers} or fewer workers")
    shape = _image_shape(manifest.get("image"))
    want = (net_cfg["in_channels"], net_cfg["image_size"], net_cfg["image_size"])
    if shape is not None and tuple(shape) != want:
        raise ValueError(f"data={data}: images are {shape[0]}×{shape[1]}×{shape[2]} (C×H×W) but the preset "
                         f"expects {want[0]}×{want[1]}×{want[2]}")
    k, n = net_cfg.get("num_classes"), manifest.get("num_classes")
    if k is not None and n is not None and n > k:
        raise ValueError(f"data={data}: {n} classes, but the preset's network has num_classes={k}")
    if config.xflip:
        from ..data.augment import check_xflip

        check_xflip(manifest, data)


def check_network(config: TrainConfig) -> None:
    """Build the network and run one forward pass on the meta device (shapes only: no memory, no
    arithmetic) so that bad model_overrides fail here, on the driver, as a ValueError naming them,
    instead of inside every worker attempt."""
    from ..models import build_unet, preset_config

    try:
        cfg = preset_config(config.preset, **config.model_overrides)
        with torch.device("meta"):
            net = build_unet(config.preset, **config.model_overrides)
            x = torch.empty(2, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
            net(x, torch.empty(2))  # unconditional call: the label check reads values, which meta has not
    except ValueError as e:
        raise ValueError(f"model_overrides={config.model_overrides}: {e}") from None
    except Exception as e:  # the constructor's TypeError/AssertionError/RuntimeError on bad values
        raise ValueError(f"model_overrides={config.model_overrides}: the {config.preset!r} network cannot "
                         f"be built with them ({type(e).__name__}: {e})") from None


def _image_shape(image: Any) -> tuple[int, int, int] | None:
    """(C, H, W) from a manifest's "image" entry, if it says."""
    if isinstance(image, dict):
        c = image.get("channels")
        h = image.get("height", image.get("size"))
        w = image.get("width", image.get("size"))
        if c is not None and h is not None and w is not None:
            return int(c), int(h), int(w)
        if "shape" in image:
            image = image["shape"]
    if isinstance(image, list | tuple) and len(image) == 3:
        h, w, c = (int(v) for v in image) if int(image[2]) in (1, 3, 4) else (None, None, None)
        if h is not None:
            return c, h, w
    return None


def check_cluster(options: RunOptions) -> None:
    """ValueError when the connected Ray cluster cannot place the run's workers."""
    total = raykit.cluster_resources()
    workers = options.workers
    for name, per in (("GPU", options.gpus_per_worker), ("CPU", options.cpus_per_worker)):
        need, have = workers * per, float(total.get(name, 0.0))
        if per > 0 and need > have:
            raise ValueError(f"{'gpus' if name == 'GPU' else 'cpus'}_per_worker={per:g} × workers={workers} "
                             f"needs {need:g} {name}s but the Ray cluster has {have:g}")


# ---- worker ---------------------------------------------------------------------------------------


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build, resume, fit, checkpoint, export."""
    import ray.train
    import ray.train.torch

    job: _Job = loop_config["job"]
    for k, v in job.env.items():
        os.environ.setdefault(k, v)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Intra-op threads beyond the worker's CPUs oversubscribe the node (10x slower on 2 cores).
        torch.set_num_threads(max(1, int(job.options.cpus_per_worker)))
    config = TrainConfig.from_dict(job.config)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and world > 1

    def ddp(net: nn.Module) -> nn.Module:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids, output_device=ids[0] if ids else None)

    trainer = Trainer.from_config(config, device=device, rank=rank, wrap=ddp if distributed else None)
    history = _resume(trainer, job, rank, world, distributed)

    per_rank = config.batch_size // world
    if job.batches is not None:
        batches = job.batches(rank=rank, world_size=world, batch_size=per_rank, seed=config.seed,
                              device=device)
    else:
        batches = _wds_batches(job, rank=rank, world_size=world, batch_size=per_rank, seed=config.seed)
    reporter = _Reporter(job, trainer, rank=rank, world=world, distributed=distributed, history=history)
    bar = None
    if job.options.progress and rank == 0:
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(desc="train", total=config.steps, unit="step")
        bar.update(trainer.position.step)

    def on_step(tr: Trainer, x: Tensor, labels: Tensor | None) -> None:
        if bar is not None:
            bar.update(1)
        every, step = config.phema_every, tr.position.step
        if rank == 0 and tr.phema is not None and every and (step % every == 0 or step == config.steps):
            write_snapshots(job.out, tr.phema)  # post-hoc EMA snapshots for `tune ema`
        if job.on_step is not None:
            job.on_step(tr, x, labels)

    if trainer.position.step >= config.steps:
        # Resumed from the final checkpoint (the run was stopped after it, before it returned): say the
        # last report again, so that a Tune trial ends with its metrics rather than an empty result.
        _report_final(job, trainer, rank, history)
    fit(trainer, batches, steps=config.steps, report_every=job.options.report_every,
        on_report=reporter.on_report, checkpoint_every=job.options.checkpoint_every,
        on_checkpoint=reporter.on_checkpoint, on_step=on_step)
    if bar is not None:
        bar.close()
    if rank == 0:
        export_ema(storage.join(job.out, EMA_EXPORT), ema=trainer.ema.state_dict(), config=job.config,
                   step=trainer.position.step, network=getattr(unwrap(trainer.net), "config", None))


def _report_final(job: _Job, trainer: Trainer, rank: int, history: list[dict[str, Any]]) -> None:
    """Report the finished run's last metrics (every rank calls it: a report is a barrier); rank 0
    takes them from the history, or evaluates afresh where the history lacks that step."""
    import ray.train

    step = trainer.position.step
    metrics: dict[str, Any] = {"step": step}
    if rank == 0:
        if history and history[-1].get("step") == step:
            metrics = dict(history[-1])
        elif job.evaluate is not None:
            metrics = {**metrics, **job.evaluate(trainer)}
    ray.train.report(metrics)


def _resume(trainer: Trainer, job: _Job, rank: int, world: int, distributed: bool) -> list[dict[str, Any]]:
    """Load the latest checkpoint under `out` (chosen by rank 0 for all), with this rank's own data
    position and RNG states; returns the run history up to it."""
    # Rank 0 picks the newest checkpoint that loads (saying which newer ones it skipped and why);
    # the others load that same one. RNG states must stay CPU ByteTensors: map to the CPU.
    uri, state = load_latest(job.out, map_location="cpu", say=_say) if rank == 0 else (None, None)
    uri = [uri]
    if distributed:
        torch.distributed.broadcast_object_list(uri, src=0)
    if uri[0] is None:
        return []
    if state is None:
        state = load_checkpoint(uri[0], map_location="cpu")
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == world:
        state = {**state, **ranks[rank]}
    trainer.load_state_dict(state)
    step = trainer.position.step
    if ranks is not None and len(ranks) != world and rank > 0:
        # A different world size: rank 0's stream would be shared; give this rank its own noise.
        trainer.generator.manual_seed(trainer.config.seed * 1000 + rank + 7919 * step)
    if rank == 0:
        _say(f"[train] resumed from {uri[0]} at step {step}")
    history_uri = RunLayout.history(job.out)
    if rank == 0 and storage.exists(history_uri):
        return [h for h in storage.read_json(history_uri) if h.get("step", 0) <= step]
    return []


def _wds_batches(job: _Job, *, rank: int, world_size: int, batch_size: int,
                 seed: int) -> Callable[[int], Iterable[Batch]]:
    """This rank's share of the WebDataset shards, reshuffled per epoch from (seed, epoch)."""
    from ..data.loader import make_loader

    xflip = bool(job.config.get("xflip", False))

    def batches(epoch: int) -> Iterable[Batch]:
        return make_loader(job.data, split=job.options.split, batch_size=batch_size,
                           shuffle_buffer=job.options.shuffle_buffer, seed=seed, epoch=epoch, flip=xflip,
                           num_workers=job.options.loader_workers, rank=rank, world_size=world_size,
                           drop_last=True)  # equal batches: the EMA step and compiled graphs assume them

    return batches


class _Reporter:
    """Reports every `report_every` steps and checkpoints every `checkpoint_every` steps (all ranks call
    both: each `ray.train.report` is a barrier); rank 0 writes, prints and keeps the history."""

    def __init__(self, job: _Job, trainer: Trainer, *, rank: int, world: int, distributed: bool,
                 history: list[dict[str, Any]]) -> None:
        self.job, self.trainer, self.rank, self.world = job, trainer, rank, world
        self.distributed, self.history = distributed, history
        self.pending: dict[str, Any] | None = None

    def _is_checkpoint_step(self, step: int) -> bool:
        return step % self.job.options.checkpoint_every == 0 or step == self.trainer.config.steps

    def on_report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        metrics = self._global(metrics)
        if self.job.evaluate is not None and self.rank == 0:
            # Held-out metrics for early stopping (Tune reads rank 0's report only).
            metrics = {**metrics, **self.job.evaluate(self.trainer)}
        if self.rank == 0:
            self.history.append(metrics)
            _say(_summary(metrics, self.trainer.config.steps))
            write_progress(self.job.out, metrics, self.trainer.config.steps)
        if self._is_checkpoint_step(metrics["step"]):
            self.pending = metrics  # reported with the checkpoint, right after this
            return
        ray.train.report(metrics)

    def on_checkpoint(self, trainer: Trainer) -> None:
        import ray.train

        own = {"position": vars(trainer.position).copy(), "rng": trainer.state_dict()["rng"]}
        ranks = [own]
        if self.distributed:
            ranks = [None] * self.world
            torch.distributed.all_gather_object(ranks, own)
        metrics = self.pending or {"step": trainer.position.step}
        self.pending = None
        if self.rank != 0:
            ray.train.report(metrics)
            return
        state = trainer.state_dict()
        state["ranks"] = ranks
        uri = save_checkpoint(self.job.out, state, keep_last=self.job.options.keep_last)
        storage.write_json(RunLayout.history(self.job.out), self.history)
        metrics = {**metrics, "checkpoint": uri}
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, POINTER), "w") as f:
                json.dump({"uri": uri, "step": trainer.position.step}, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{trainer.position.step:08d}")

    def _global(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Loss averaged and img/s summed over ranks (one small all-reduce per report); the rest is
        rank 0's (σ-bucket losses) or identical on every rank (grad norm after DDP, lr, step)."""
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if not self.distributed:
            return metrics
        t = torch.tensor([metrics["loss"], metrics["img_per_s"]], dtype=torch.float64,
                         device=self.trainer.device)
        torch.distributed.all_reduce(t)
        return {**metrics, "loss": float(t[0]) / self.world, "img_per_s": float(t[1])}


def _say(line: str) -> None:
    # Not print(): Ray Train patches it in workers and the line can come out twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _summary(m: dict[str, Any], steps: int) -> str:
    return (f"[train] step {m['step']}/{steps}  loss {m['loss']:.4f}  grad {m['grad_norm']:.3f}  "
            f"lr {m['lr']:.2e}  {m['img_per_s']:,.0f} img/s  skipped {m['skipped_steps']}")


__all__ = ["HEALTH_CHECK_ENV", "TrainResult", "check_cluster", "check_network", "train", "validate_run"]
