"""The DSM training loop in plain torch: no Ray here (ray_train.py wraps it).

One `Trainer` owns the network, its EMA, the optimiser, the loss and every random state, so that a
checkpoint of `state_dict()` resumes bit-for-bit (on CPU in deterministic mode). Metrics are
accumulated on the device and read back only at report time: a `.item()` per step would stall
the GPU pipeline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import TrainConfig
from ..diffusion.losses import build_loss
from ..diffusion.sde import SDE, build_sde
from ..models import EMA, AutocastNet, build_unet
from ..models.phema import PowerEMA

# Per-noise-level loss buckets, in EDM's σ̃ = σ/α (comparable across VP, sub-VP and VE).
SIGMA_BUCKETS: tuple[float, ...] = (0.1, 1.0, 10.0)
Batch = tuple[Tensor, Tensor | None]


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers before saving or averaging."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class Position:
    """Where the run is: optimiser steps taken, and the data position (epoch, batch within it)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    skipped_steps: int = 0


@dataclass
class _Accum:
    loss_sum: Tensor
    count: Tensor
    bucket_sum: Tensor
    bucket_count: Tensor
    grad_norm_sum: Tensor
    finite_steps: Tensor
    skipped: Tensor  # steps skipped since the last flush into Position (a device count)
    worst_run: Tensor  # the longest run of consecutive skipped steps since the last flush (device)
    steps: int = 0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)


class TrainingDivergedError(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient: the run diverged."""


class Trainer:
    """Runs optimisation steps on built components (torchtitan's split: the loop does not build).

    Non-finite steps: a step whose loss or gradient norm is not finite changes nothing (weights,
    optimiser state, EMA); `config.max_consecutive_skips` of them in a row raise
    `TrainingDivergedError`. The rule is checked where reading the device is free: at once on the CPU, and
    on CUDA only when metrics or state are read back (every report and checkpoint, and the end of
    `fit`), from a device counter of the current run of skips and the longest run since the last
    read, so the check adds no host sync per step. A diverged CUDA run therefore stops at its next
    report, before that report's checkpoint is written.

    `Trainer.from_config` is the edge that builds net, process, loss, optimiser and EMA from a
    TrainConfig; the constructor takes them built, so a caller can hand over any network or loss. The
    config still supplies the step-level hyper-parameters (learning-rate warm-up, clipping, precision,
    seed) and is what checkpoints record.
    """

    def __init__(self, config: TrainConfig, *, net: nn.Module, sde: SDE, loss_fn: Callable[..., Any],
                 optimizer: torch.optim.Optimizer, ema: EMA, device: torch.device | str = "cpu",
                 rank: int = 0, wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        self.config, self.device, self.rank = config, torch.device(device), rank
        self.sde, self.net, self.ema, self.loss_fn, self.optimizer = sde, net, ema, loss_fn, optimizer
        # UNet.null_label raises for unconditional networks (num_classes=None).
        self.null_label = net.null_label if getattr(net, "num_classes", None) is not None else None
        self.amp_dtype = resolve_precision(config.precision, self.device)
        # The network as the loss sees it: (DDP/compile-wrapped) under autocast.
        model: nn.Module = wrap(net) if wrap is not None else net
        if config.compile:
            model = torch.compile(model)
        self.model = AutocastNet(model, self.amp_dtype)
        # Noise draws come from a generator we own, offset by rank so ranks see different noise.
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + rank)
        self.position = Position()
        # Post-hoc EMA profiles (EDM2): updated every step, snapshotted by the runner every phema_every.
        self.phema = PowerEMA(net, config.phema_sigma_rels) if config.phema_sigma_rels else None
        self._sigma_edges = torch.tensor(SIGMA_BUCKETS, device=self.device, dtype=torch.float64)
        self._skip_run = torch.zeros((), device=self.device, dtype=torch.float64)  # current run of skips
        self._accum = self._new_accum()

    @classmethod
    def from_config(cls, config: TrainConfig, *, device: torch.device | str = "cpu", rank: int = 0,
                    wrap: Callable[[nn.Module], nn.Module] | None = None) -> Trainer:
        """Build the components a TrainConfig names and a Trainer over them."""
        device = torch.device(device)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        sde = build_sde(config.sde, **config.sde_kwargs)
        if config.model == "autoencoder":  # the autoencoder of latent diffusion: same loop (issue 18)
            return cls._autoencoder(config, sde, device=device, rank=rank, wrap=wrap)
        net = build_unet(config.preset, **config.model_overrides).to(device)
        if config.channels_last and device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        ema = EMA(net, halflife_kimg=config.ema_halflife_kimg, rampup_ratio=config.ema_rampup_ratio)
        loss_kwargs = dict(config.loss_kwargs)
        if config.label_dropout > 0 and getattr(net, "num_classes", None) is not None:
            loss_kwargs.setdefault("label_dropout", config.label_dropout)
            loss_kwargs.setdefault("null_label", net.null_label)
        loss_fn = build_loss(config.loss, sde, **loss_kwargs)
        params = list(net.parameters())
        if isinstance(loss_fn, nn.Module):  # EDM2's learned uncertainty u(σ) trains with the network
            loss_fn.to(device)
            params += list(loss_fn.parameters())
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        # fused: one kernel for the whole update on CUDA (foreach is the default there, plain on CPU)
        optimizer = opt_cls(params, lr=config.lr, betas=config.adam_betas,
                            weight_decay=config.weight_decay, fused=device.type == "cuda" or None)
        return cls(config, net=net, sde=sde, loss_fn=loss_fn, optimizer=optimizer, ema=ema, device=device,
                   rank=rank, wrap=wrap)

    @classmethod
    def _autoencoder(cls, config: TrainConfig, sde: SDE, **kw: Any) -> Trainer:
        from ..models.autoencoder import build_autoencoder, build_autoencoder_loss

        net = build_autoencoder(config.preset, **config.model_overrides).to(kw["device"])
        ema = EMA(net, halflife_kimg=config.ema_halflife_kimg, rampup_ratio=config.ema_rampup_ratio)
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        optimizer = opt_cls(net.parameters(), lr=config.lr, betas=config.adam_betas,
                            weight_decay=config.weight_decay, fused=kw["device"].type == "cuda" or None)
        return cls(config, net=net, sde=sde, loss_fn=build_autoencoder_loss(net, **config.loss_kwargs),
                   optimizer=optimizer, ema=ema, **kw)

    # ---- optimisation ------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Linear warm-up to the base rate (Ho et al. 2020 use 5000 steps), then constant."""
        w = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / w) if w > 0 else self.config.lr

    def train_step(self, x: Tensor, labels: Tensor | None = None) -> None:
        """One optimiser step on a batch; a non-finite loss or gradient skips the update."""
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and self.device.type == "cuda" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
            if self.null_label is None:
                labels = None  # unconditional network: labels are data, not conditioning
        lr = self.lr_at(self.position.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        per_sample, sigma = self.loss_fn.forward_with_noise(self.model, x, labels, generator=self.generator)
        loss = per_sample.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._sync_loss_grads()
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        # Decided on the device, never read here: a host read per step would stall the GPU queue.
        # A non-finite loss or gradient leaves weights, optimiser state and EMA exactly as they were.
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)  # 0-dim bool
        if self._skip_on_device():
            self._masked_optimizer_step(finite)
            self.ema.update_masked(self.net, batch_size=self.config.batch_size, apply=finite)
            host_finite = None
        else:
            host_finite = bool(finite)  # on the CPU the device is the host: this read costs nothing
            if host_finite:
                self.optimizer.step()
                self.ema.update(self.net, batch_size=self.config.batch_size)
        self._record(per_sample.detach(), sigma.detach(), grad_norm.detach(), finite, x.shape[0])
        self.position.step += 1
        if host_finite is False:
            self._check_skip_run(int(self._skip_run))
        if self.phema is not None:  # a skipped step left the weights as they were: averaging them is exact
            self.phema.update(self.net, self.position.step)

    def _sync_loss_grads(self) -> None:
        """A loss with parameters (the learned uncertainty) lives outside DDP: average its gradients over
        the ranks here, as DDP does for the network's, so every rank keeps the same u(σ)."""
        if not isinstance(self.loss_fn, nn.Module) or not torch.distributed.is_initialized():
            return
        grads = [p.grad for p in self.loss_fn.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
            torch.nn.utils.vector_to_parameters(flat, grads)

    def _skip_on_device(self) -> bool:
        """Decide the non-finite skip on the device (no host read) unless the device is the CPU, where
        the masked update would only add work; `sync_free_skip` (an attribute) overrides, for tests."""
        return getattr(self, "sync_free_skip", self.device.type != "cpu")

    def _masked_optimizer_step(self, finite: Tensor) -> None:
        """`optimizer.step()` where `finite` is true, a no-op (step count included) where it is not.

        Fused Adam/AdamW take the skip as `found_inf` (the hook GradScaler uses): the kernel leaves
        the weights and moments alone and the step count is decremented back, all on the device.
        Any other optimiser steps, then puts back a snapshot of its weights and state where the
        step was non-finite (one copy of weights and state per step; exact either way)."""
        opt = self.optimizer
        if opt.defaults.get("fused") and isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            opt.found_inf = (~finite).float()
            try:
                opt.step()
            finally:
                del opt.found_inf
            return
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        before = [(p, p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()
                                          if isinstance(v, Tensor)} if p in opt.state else None)
                  for p in params]
        opt.step()
        with torch.no_grad():
            for p, p_old, state_old in before:
                p.copy_(torch.where(finite, p, p_old))
                for k, v in opt.state[p].items():
                    if not isinstance(v, Tensor):
                        continue
                    # State made by this very step (the first) goes back to Adam's fresh zeros.
                    old = state_old[k] if state_old is not None else torch.zeros_like(v)
                    v.copy_(torch.where(finite.to(v.device), v, old))

    def _new_accum(self) -> _Accum:
        z = lambda n=(): torch.zeros(n, device=self.device, dtype=torch.float64)  # noqa: E731
        nb = len(SIGMA_BUCKETS) + 1
        return _Accum(z(), z(), z(nb), z(nb), z(), z(), z(), z())

    def _record(self, per_sample: Tensor, sigma: Tensor, grad_norm: Tensor, finite: Tensor, n: int) -> None:
        """Accumulate a step's metrics on the device; a skipped step adds exact zeros and one skip."""
        a = self._accum
        keep = finite.double()
        loss = torch.where(finite, per_sample.double(), 0.0)  # NaN·0 would be NaN: select, not scale
        a.loss_sum += loss.sum()
        a.count += keep * per_sample.numel()
        idx = torch.bucketize(sigma.double(), self._sigma_edges)  # no host→device copy per step
        a.bucket_sum.index_add_(0, idx, loss)
        a.bucket_count.index_add_(0, idx, keep.expand_as(loss))
        a.grad_norm_sum += torch.where(finite, grad_norm.double(), 0.0)
        a.finite_steps += keep
        a.skipped += 1.0 - keep
        self._skip_run.add_(1.0).mul_(1.0 - keep)  # +1 on a skip, back to 0 on a taken step
        torch.maximum(a.worst_run, self._skip_run, out=a.worst_run)
        a.steps += 1
        a.images += n

    def _flush_skipped(self) -> None:
        """Fold the device's count of skipped steps into `position` and apply the consecutive-skip rule
        (one host read: reports, checkpoints)."""
        a = self._accum
        skipped, worst = (int(v) for v in torch.stack([a.skipped, a.worst_run]).tolist())
        self.position.skipped_steps += skipped
        a.skipped.zero_()
        a.worst_run.copy_(self._skip_run)  # a run still going on carries over to the next read
        self._check_skip_run(worst)

    def _check_skip_run(self, run: int) -> None:
        limit = self.config.max_consecutive_skips
        if run >= limit:
            raise TrainingDivergedError(
                f"{run} consecutive steps (up to step {self.position.step}) had a non-finite loss or "
                f"gradient and were skipped (max_consecutive_skips={limit}): the run diverged. Lower lr "
                f"(now {self.config.lr:g}), raise warmup_steps or grad clipping, or check the data")

    def pop_metrics(self) -> dict[str, Any]:
        """Metrics since the last call (one host sync), then reset the accumulators."""
        self._flush_skipped()
        a, self._accum = self._accum, self._new_accum()
        elapsed = max(time.perf_counter() - a.started, 1e-9)
        count = max(float(a.count), 1.0)
        edges = ("0", *(f"{b:g}" for b in SIGMA_BUCKETS), "inf")
        buckets = {
            f"loss_sigma_{edges[i]}_{edges[i + 1]}": (float(s) / float(c) if c > 0 else None)
            for i, (s, c) in enumerate(zip(a.bucket_sum.tolist(), a.bucket_count.tolist(), strict=True))
        }
        return {
            "step": self.position.step,
            "loss": float(a.loss_sum) / count,
            **buckets,
            "grad_norm": float(a.grad_norm_sum) / max(float(a.finite_steps), 1.0),
            "lr": self.lr_at(max(self.position.step - 1, 0)),
            "img_per_s": float(a.count) / elapsed,  # images of the steps taken, as before
            "skipped_steps": self.position.skipped_steps,
        }

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and Python scalars only: loadable with torch.load(weights_only=True)."""
        self._flush_skipped()
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": unwrap(self.net).state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": vars(self.position).copy(),
            "rng": rng,
            "config": self.config.to_dict(),
            **({"loss": self.loss_fn.state_dict()} if isinstance(self.loss_fn, nn.Module) else {}),
            **({"phema": self.phema.state_dict()} if self.phema is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.net).load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.position = Position(**state["position"])
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.load_state_dict(state["loss"])
        if self.phema is not None:
            self.phema.load_state_dict(state["phema"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self._skip_run.zero_()  # a checkpoint is only written after the rule passed
        self._accum = self._new_accum()


class InMemoryBatches:
    """Seeded per-epoch shuffles of an in-memory dataset: epoch e always yields the same batches."""

    def __init__(self, x: Tensor, labels: Tensor | None, batch_size: int, *, seed: int = 0,
                 flip: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if labels is not None and labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries for {x.shape[0]} images")
        if batch_size > x.shape[0] // world_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {x.shape[0] // world_size} images "
                             "per rank")
        self.x, self.labels, self.batch_size = x, labels, batch_size
        self.seed, self.flip, self.rank, self.world_size = seed, flip, rank, world_size

    def __call__(self, epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.x.shape[0], generator=g)[self.rank::self.world_size]
        for i in range(len(order) // self.batch_size):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx]
            if self.flip:
                mask = torch.rand(x.shape[0], generator=g) < 0.5
                x = torch.where(mask.reshape(-1, 1, 1, 1), x.flip(-1), x)
            yield x, (self.labels[idx] if self.labels is not None else None)


def fit(trainer: Trainer, batches: Callable[[int], Iterable[Batch]], *, steps: int,
        report_every: int = 100, on_report: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_every: int = 0, on_checkpoint: Callable[[Trainer], None] | None = None,
        on_step: Callable[[Trainer, Tensor, Tensor | None], None] | None = None,
        progress: bool = False) -> dict[str, Any]:
    """Train until `trainer.position.step == steps`, resuming from the trainer's data position.

    `batches(epoch)` yields that epoch's batches in a deterministic order; on resume the first
    `position.batch` batches of the current epoch are skipped, so the run sees the same data it
    would have seen uninterrupted. `on_step(trainer, x, labels)` runs after every step (and after
    that step's report and checkpoint): progress bars, tracing, fault injection in tests.
    """
    if steps < trainer.position.step:
        raise ValueError(f"steps={steps} is below the step already reached ({trainer.position.step})")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=trainer.position.step, desc="train", unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    pos = trainer.position
    while pos.step < steps:
        produced = 0
        for i, (x, labels) in enumerate(batches(pos.epoch)):
            produced += 1
            if i < pos.batch:
                continue
            trainer.train_step(x, labels)
            pos = trainer.position
            pos.batch = i + 1
            if bar is not None:
                bar.update(1)
            if report_every and (pos.step % report_every == 0 or pos.step == steps):
                last = trainer.pop_metrics()
                if on_report is not None:
                    on_report(last)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['img_per_s']:.0f}")
            if checkpoint_every and on_checkpoint is not None and (
                    pos.step % checkpoint_every == 0 or pos.step == steps):
                on_checkpoint(trainer)
            if on_step is not None:
                on_step(trainer, x, labels)
            if pos.step >= steps:
                break
        else:
            if produced == 0:
                raise ValueError(f"the data produced no batch in epoch {pos.epoch}: is the dataset empty?")
            pos.epoch, pos.batch = pos.epoch + 1, 0
    if bar is not None:
        bar.close()
    if not last or last.get("step") != pos.step:
        last = trainer.pop_metrics()
    if pos.step > 0 and trainer.position.skipped_steps >= pos.step:
        raise TrainingDivergedError(f"all {pos.step} steps had a non-finite loss or gradient and were "
                                    "skipped: the model did not train")
    return last
