"""Bits/dim at scale: likelihoods and bounds over a tensor or a sharded dataset, with a progress bar, a
summary with standard errors, and a Ray fan-out with one task per GPU.

Evaluation runs no DDP: every task owns whole batches, so no collective waits on another rank while an
adaptive solver takes a different number of steps (k-diffusion's users report hangs when the
likelihood ODE runs under DDP). Summaries carry what an exact merge needs (n, mean, the sum of squared
deviations M2), so `merge_summaries` of the parts equals the summary of the whole (Chan et al. 1979).

Randomness (probes, dequantisation, noise draws) comes from one generator per batch seeded by
(seed, rank, global batch index), so a split across workers reproduces the single-process numbers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.diffusion.elbo import EpsFn, continuous_elbo, ddpm_elbo
from pipeline.diffusion.likelihood import ode_likelihood
from pipeline.diffusion.schedules import DDPMSchedule
from pipeline.diffusion.sde import SDE, ScoreFn, build_sde

Data = Tensor | Iterable[Any] | str


# ---- data -----------------------------------------------------------------------------------------


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def _as_images(item: Any) -> Tensor:
    # Loaders yield (x, labels[, index]) tuples or dicts; the images are the first entry or "image"/"x".
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    if isinstance(item, dict):
        for key in ("image", "x", "images"):
            if isinstance(item.get(key), Tensor):
                return item[key]
    raise ValueError(
        f"data must yield tensors, (tensor, ...) tuples or dicts with 'image'; got {type(item).__name__}")


def dataset_levels(uri: str) -> int:
    """The number of levels L recorded in a sharded dataset's manifest."""
    from pipeline.data import manifest as mf

    return int(mf.read_manifest(mf.manifest_uri(uri))["levels"])


def iter_batches(data: Data, batch_size: int, *, split: str = "test", max_samples: int | None = None,
                 rank: int | None = None, world_size: int | None = None) -> Iterator[Tensor]:
    """Batches of exactly `batch_size` samples (the last may be smaller) from a tensor [N, ...], an
    iterable of batches, or a dataset URI (its `split`, this rank's shards, unshuffled)."""
    batch_size = _check_batch_size(batch_size)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
    if isinstance(data, str):
        from pipeline.data.loader import make_loader

        source: Iterable[Any] = make_loader(data, split, batch_size, shuffle_buffer=0,
                                            rank=rank or 0, world_size=world_size or 1)
    elif isinstance(data, Tensor):
        if data.ndim < 2:
            raise ValueError(
                f"data must have shape [N, ...] with at least one data dimension, got {tuple(data.shape)}")
        source = data.split(batch_size)
    else:
        source = data
    pending: list[Tensor] = []
    held, seen = 0, 0
    for item in source:
        x = _as_images(item)
        if max_samples is not None:
            x = x[: max_samples - seen]
        seen += x.shape[0]
        pending.append(x)
        held += x.shape[0]
        while held >= batch_size:
            cat = torch.cat(pending)
            yield cat[:batch_size]
            rest = cat[batch_size:]
            pending, held = ([rest] if rest.shape[0] else []), rest.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if held:
        yield torch.cat(pending)


def _generator(seed: int, rank: int, index: int, device: torch.device) -> torch.Generator:
    # One stream per (seed, rank, batch): a worker's batches draw what they would in a single process.
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + rank) * 1_000_033 + index) % 2**63)


# ---- summaries ------------------------------------------------------------------------------------


def summarize(bpd: Tensor, nfe: Sequence[int], *, metric: str, settings: dict, seconds: float,
              mc_stderr: Tensor | None = None, terms: dict[str, Tensor] | None = None) -> dict:
    """Summary of per-sample bits/dim: mean, standard error over samples, M2, NFE, settings."""
    v = bpd.detach().double().cpu()
    n = v.numel()
    mean = float(v.mean()) if n else float("nan")
    m2 = float(((v - mean) ** 2).sum()) if n else 0.0
    out = {
        "metric": metric, "n": n, "bpd": mean,
        "bpd_stderr": math.sqrt(m2 / (n - 1) / n) if n > 1 else float("nan"),
        "bpd_m2": m2, "n_batches": len(nfe), "nfe_total": int(sum(nfe)),
        "nfe_mean": sum(nfe) / len(nfe) if nfe else float("nan"),
        "mc_stderr_mean": float(mc_stderr.double().mean()) if mc_stderr is not None and n else float("nan"),
        "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("nan"),
        "settings": settings,
    }
    if terms is not None:
        out["terms"] = {k: float(t.double().mean()) for k, t in terms.items()}
    return out


def merge_summaries(summaries: Sequence[dict], *, seconds: float | None = None) -> dict:
    """Pool summaries of disjoint parts exactly (pooled mean, M2 by Chan et al.'s update, NFE)."""
    parts = [s for s in summaries if s["n"] > 0]
    if not parts:
        raise ValueError("merge_summaries needs at least one summary with n > 0")
    n, mean, m2 = 0, 0.0, 0.0
    for s in parts:
        nb, mb = s["n"], s["bpd"]
        delta = mb - mean
        total = n + nb
        mean += delta * nb / total
        m2 += s["bpd_m2"] + delta**2 * n * nb / total
        n = total
    n_batches = sum(s["n_batches"] for s in parts)
    nfe_total = sum(s["nfe_total"] for s in parts)
    wall = seconds if seconds is not None else max(s["seconds"] for s in parts)
    out = {
        "metric": parts[0]["metric"], "n": n, "bpd": mean,
        "bpd_stderr": math.sqrt(m2 / (n - 1) / n) if n > 1 else float("nan"), "bpd_m2": m2,
        "n_batches": n_batches, "nfe_total": nfe_total, "nfe_mean": nfe_total / n_batches,
        "mc_stderr_mean": sum(s["mc_stderr_mean"] * s["n"] for s in parts) / n,
        "seconds": wall, "images_per_s": n / wall if wall > 0 else float("nan"),
        "settings": parts[0]["settings"],
    }
    if "terms" in parts[0]:
        out["terms"] = {k: sum(s["terms"][k] * s["n"] for s in parts) / n for k in parts[0]["terms"]}
    return out


def _settings(sde: SDE | None, batch_size: int, seed: int, options: dict, **extra: Any) -> dict:
    def plain(v: Any) -> Any:  # JSON-able: dicts copied, option groups (likelihood.Integration) as fields
        if isinstance(v, dict):
            return dict(v)
        return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v

    safe = {k: plain(v) for k, v in options.items()}
    return {"sde": sde.config() if sde is not None else None, "batch_size": batch_size, "seed": seed,
            **extra, **safe}


def _pop_generator(options: dict) -> None:
    if "generator" in options:
        raise ValueError("pass seed=..., not generator=...: evaluation seeds one generator per batch")


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True)


def _known_size(data: Data, max_samples: int | None) -> int | None:
    n = data.shape[0] if isinstance(data, Tensor) else None
    if n is not None and max_samples is not None:
        n = min(n, max_samples)
    return n


# ---- evaluation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """Which part of the data one call evaluates, so that parts merge into the single-process result:
    rank r of `world_size` reads shards r, r + W, … of a dataset URI; `batch_offset` numbers a tensor
    part's first batch as in the whole (each batch draws from its own (seed, rank, batch) stream)."""

    rank: int = 0
    world_size: int = 1
    batch_offset: int = 0


def _evaluate(bound: Callable[[Tensor, torch.Generator], Any], data: Data, *, desc: str, batch_size: int,
              seed: int, progress: bool, device: torch.device | str | None, split: str,
              max_samples: int | None,
              part: Part | None) -> tuple[list[Tensor], list[Tensor], list[int], list[Any]]:
    """Run `bound(x, generator)` over the batches of `data`; per-batch bpd, MC stderr, NFE and results."""
    part = part or Part()
    bpds, errs, nfe, results = [], [], [], []
    with _progress(_known_size(data, max_samples), desc, progress) as bar:
        for b, x in enumerate(iter_batches(data, batch_size, split=split, max_samples=max_samples,
                                           rank=part.rank, world_size=part.world_size)):
            x = x.to(device) if device is not None else x
            res = bound(x, _generator(seed, part.rank, part.batch_offset + b, x.device))
            bpds.append(res.bpd.detach().cpu())
            if getattr(res, "bpd_stderr", None) is not None:
                errs.append(res.bpd_stderr.detach().cpu())
            nfe.append(res.nfe)
            results.append(res)
            bar.update(x.shape[0])
            bar.set_postfix(bpd=f"{float(torch.cat(bpds).mean()):.4f}")
    if not bpds:
        raise ValueError("data is empty: no samples to evaluate")
    return bpds, errs, nfe, results


def evaluate_bpd(score_fn: ScoreFn, sde: SDE, data: Data, *, batch_size: int = 64, seed: int = 0,
                 progress: bool = True, device: torch.device | str | None = None, split: str = "test",
                 max_samples: int | None = None, part: Part | None = None, **options: Any) -> dict:
    """Bits/dim by `ode_likelihood` over all of `data`, batch by batch; returns a summary dict
    (bpd, bpd_stderr over samples, nfe_mean per batch, n, settings, ...). For a dataset URI,
    dequantisation defaults to the manifest's levels."""
    _pop_generator(options)
    batch_size = _check_batch_size(batch_size)
    if isinstance(data, str) and "dequantize" not in options:
        options["dequantize"] = {"levels": dataset_levels(data)}
    start = time.perf_counter()
    bpds, errs, nfe, _ = _evaluate(
        lambda x, g: ode_likelihood(score_fn, sde, x, generator=g, **options), data, desc="bits/dim (ODE)",
        batch_size=batch_size, seed=seed, progress=progress, device=device, split=split,
        max_samples=max_samples, part=part)
    settings = _settings(sde, batch_size, seed, options, metric="ode")
    return summarize(torch.cat(bpds), nfe, metric="bpd-ode", settings=settings,
                     seconds=time.perf_counter() - start, mc_stderr=torch.cat(errs))


def evaluate_elbo(score_fn: ScoreFn, sde: SDE, data: Data, *, batch_size: int = 64, seed: int = 0,
                  progress: bool = True, device: torch.device | str | None = None, split: str = "test",
                  max_samples: int | None = None, part: Part | None = None, **options: Any) -> dict:
    """The continuous-time variational bound (`continuous_elbo`) in bits/dim over `data`, summarised
    like `evaluate_bpd`."""
    _pop_generator(options)
    batch_size = _check_batch_size(batch_size)
    if isinstance(data, str) and "dequantize" not in options:
        options["dequantize"] = {"levels": dataset_levels(data)}
    start = time.perf_counter()
    bpds, errs, nfe, _ = _evaluate(
        lambda x, g: continuous_elbo(score_fn, sde, x, generator=g, **options), data,
        desc="bits/dim (ELBO, continuous)", batch_size=batch_size, seed=seed, progress=progress,
        device=device, split=split, max_samples=max_samples, part=part)
    settings = _settings(sde, batch_size, seed, options, metric="elbo-continuous")
    return summarize(torch.cat(bpds), nfe, metric="elbo-continuous", settings=settings,
                     seconds=time.perf_counter() - start, mc_stderr=torch.cat(errs))


def evaluate_ddpm_elbo(eps_fn: EpsFn, schedule: DDPMSchedule, data: Data, *, batch_size: int = 64,
                       seed: int = 0, progress: bool = True, device: torch.device | str | None = None,
                       split: str = "test", max_samples: int | None = None, part: Part | None = None,
                       **options: Any) -> dict:
    """The discrete DDPM bound (`ddpm_elbo`, Ho et al. 2020, eq. 5) of an ε-network on `schedule`'s
    chain in bits/dim over `data`, with the mean per-term breakdown (prior, diffusion, decoder). A score
    model is read as an ε-network with `elbo.eps_fn_from_score`."""
    _pop_generator(options)
    batch_size = _check_batch_size(batch_size)
    discretized = options.get("decoder", "discretized") == "discretized"
    if isinstance(data, str) and "levels" not in options and discretized:
        options["levels"] = dataset_levels(data)
    start = time.perf_counter()
    bpds, _, nfe, results = _evaluate(
        lambda x, g: ddpm_elbo(eps_fn, schedule, x, generator=g, **options), data,
        desc="bits/dim (ELBO, ddpm)",
        batch_size=batch_size, seed=seed, progress=progress, device=device, split=split,
        max_samples=max_samples, part=part)
    terms = {key: torch.cat([getattr(r, f"{key}_bpd").detach().cpu() for r in results])
             for key in ("prior", "diffusion", "decoder")}
    extra = {"schedule": {"kind": schedule.kind, "N": schedule.N, **schedule.params}}
    settings = _settings(None, batch_size, seed, options, metric="elbo-ddpm", **extra)
    return summarize(torch.cat(bpds), nfe, metric="elbo-ddpm", settings=settings,
                     seconds=time.perf_counter() - start, terms=terms)


# ---- Ray fan-out ----------------------------------------------------------------------------------


def _ray_bpd_task(item: tuple[Callable[[], ScoreFn], dict, Data, bool, dict]) -> dict:
    make_score_fn, sde_config, data, use_gpu, kwargs = item
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else None
    sde = build_sde(**sde_config)
    return evaluate_bpd(make_score_fn(), sde, data, device=device, progress=False, **kwargs)


def evaluate_bpd_ray(make_score_fn: Callable[[], ScoreFn], sde_config: dict, data: Tensor | str, *,
                     num_workers: int, use_gpu: bool = False, batch_size: int = 64, seed: int = 0,
                     split: str = "test", max_samples: int | None = None, **options: Any) -> dict:
    """`evaluate_bpd` split across `num_workers` Ray tasks (one GPU each with use_gpu), merged exactly.

    `make_score_fn()` runs on the worker and must build the model there (on the current CUDA device
    with use_gpu); it has to pickle, so make it a module-level function or a functools.partial.
    `sde_config` is `sde.config()`. A tensor is cut into batches first and each task gets a contiguous
    run of them, so the result equals the single-process one; a dataset URI is split by shards (rank r
    of W reads shards r, r+W, …; max_samples then caps each rank).
    """
    _pop_generator(options)
    batch_size = _check_batch_size(batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if not isinstance(sde_config, dict) or "name" not in sde_config:
        raise ValueError(f"sde_config must be a dict from sde.config() with a 'name', got {sde_config!r}")
    sde = build_sde(**sde_config)
    if isinstance(data, str) and "dequantize" not in options:
        options["dequantize"] = {"levels": dataset_levels(data)}
    common = dict(batch_size=batch_size, seed=seed, split=split, **options)
    start = time.perf_counter()
    refs = []
    if isinstance(data, str):
        for r in range(num_workers):
            kwargs = dict(common, part=Part(rank=r, world_size=num_workers), max_samples=max_samples)
            refs.append((make_score_fn, sde_config, data, use_gpu, kwargs))
    else:
        if not isinstance(data, Tensor):
            raise ValueError(f"data must be a tensor [N, ...] or a dataset URI, got {type(data).__name__}")
        if max_samples is not None:
            data = data[:max_samples]
        batches = list(iter_batches(data, batch_size))
        if not batches:
            raise ValueError("data is empty: no samples to evaluate")
        per = -(-len(batches) // num_workers)
        for first in range(0, len(batches), per):
            part = torch.cat(batches[first:first + per]).cpu()
            kwargs = dict(common, part=Part(batch_offset=first))
            refs.append((make_score_fn, sde_config, part, use_gpu, kwargs))
    from .. import raykit

    done = dict(raykit.fan_out(_ray_bpd_task, refs, num_gpus=1 if use_gpu else 0))
    summaries = [done[j] for j in range(len(refs))]
    merged = merge_summaries(summaries, seconds=time.perf_counter() - start)
    merged["settings"] = _settings(sde, batch_size, seed, options, metric="ode", num_workers=len(refs),
                                   use_gpu=use_gpu)
    merged["workers"] = [{"n": s["n"], "bpd": s["bpd"], "seconds": s["seconds"]} for s in summaries]
    return merged


__all__ = [
    "Part", "dataset_levels", "evaluate_bpd", "evaluate_bpd_ray", "evaluate_ddpm_elbo", "evaluate_elbo",
    "iter_batches",
    "merge_summaries", "summarize",
]
