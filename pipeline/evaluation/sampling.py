"""Sampling at scale from a checkpoint: any sampler of the core, CFG weight w, Ray workers or inline,
samples written as WebDataset shards (the data pipeline's shard format) with a grid PNG and a record
of how every sample was made.

Reproducibility. Sample i starts from x_T drawn by its own generator seeded with seed(i) = base_seed + i,
so its starting noise does not depend on how samples are batched or spread over workers. Samples are
generated in fixed blocks of `batch_size` (block b holds indices b·B … b·B + B − 1, whatever the
number of workers); the noise a stochastic sampler draws during the trajectory comes from one
generator per block, seeded from (base_seed, b). Hence:
  * deterministic samplers (ode; heun without churn; ddim with η = 0) make sample i a function of
    seed(i) alone: it regenerates on its own, equal up to float round-off of batched versus single
    network evaluations (≈1e-6 in float32 on CPU); with an adaptive ODE solver (dopri5), up to the
    solver's tolerance, since the step sizes are chosen for the whole batch;
  * stochastic samplers regenerate sample i by re-running its block, bit-identical on the same device,
    dtype and thread count, within float round-off otherwise.
(A per-sample noise stream for stochastic samplers too would need the core samplers to accept one
generator per sample, which they do not yet.)
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import storage
from ..config import TrainConfig
from ..diffusion import samplers as core
from ..diffusion.param import make_score_fn
from ..diffusion.sde import SDE, ScoreFn, build_sde
from ..models import build_unet
from .grid import grid_png

SAMPLES_SPLIT = "samples"
GRID_FILE = "grid.png"
MANIFEST_FILE = "manifest.json"
PRECISIONS = ("fp32", "bf16")
# Options of the core samplers that a recorded plan cannot carry (objects, not values).
_NOT_SETTABLE = frozenset({"callback", "progress", "dtype"})
_SAMPLER_FUNCTIONS = {
    "ancestral": core.sample_ancestral,
    "ddim": core.sample_ddim,
    "euler_maruyama": core.sample_euler_maruyama,
    "pc": core.sample_pc,
    "annealed_langevin": core.sample_annealed_langevin,
    "ode": core.sample_ode,
    "heun": core.sample_heun,
}


# ---- the model -----------------------------------------------------------------------------------


@dataclass
class SamplingModel:
    """A network rebuilt from a checkpoint, with how its output is read as a score."""

    net: nn.Module
    sde: SDE
    config: TrainConfig
    parameterization: str
    noise_label_kind: str
    sigma_data: float
    num_classes: int | None
    image_shape: tuple[int, int, int]
    checkpoint_uri: str
    checkpoint_sha256: str
    step: int | None
    weights: str  # "ema" or "model"

    @property
    def null_label(self) -> int | None:
        return None if self.num_classes is None else int(self.num_classes)

    def check_guidance(self, w: float) -> None:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"guidance w must be a finite number >= 0, got {w!r}")
        if w > 0 and self.num_classes is None:
            raise ValueError(
                f"guidance w={w}: the model of {self.checkpoint_uri} is unconditional "
                f"(preset {self.config.preset!r} has no classes); use w=0"
            )

    def score_fn(self, class_labels: Tensor | None, w: float = 0.0) -> ScoreFn:
        """score_fn(x, t) for these labels; w > 0: classifier-free guidance (Ho & Salimans 2022, eq. 6)."""
        self.check_guidance(w)
        kw = {"noise_label_kind": self.noise_label_kind, "sigma_data": self.sigma_data}
        if w > 0:
            from ..diffusion.guidance import cfg_score_fn

            return cfg_score_fn(
                self.net, self.sde, self.parameterization, class_labels, self.null_label, w, **kw
            )
        return make_score_fn(self.net, self.sde, self.parameterization, class_labels=class_labels, **kw)

    def describe(self) -> dict[str, Any]:
        return {
            "uri": self.checkpoint_uri,
            "sha256": self.checkpoint_sha256,
            "step": self.step,
            "weights": self.weights,
            "preset": self.config.preset,
            "model_overrides": self.config.model_overrides,
            "sde": self.sde.config(),
            "parameterization": self.parameterization,
            "noise_label_kind": self.noise_label_kind,
            "sigma_data": self.sigma_data,
            "num_classes": self.num_classes,
        }


def _state_for_sampling(state: Any, uri: str, weights: str) -> tuple[dict[str, Tensor], str, int | None]:
    """The network state_dict of a trainer checkpoint or an EMA export, which weights, and the step."""
    forms = (
        "a trainer checkpoint {model, ema, optimizer, position, rng, config} or an EMA export "
        "{ema, config, step}"
    )
    if not isinstance(state, dict) or "config" not in state or not ({"ema", "model"} & set(state)):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint {uri}: expected {forms}; found {keys}")
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if weights == "model" and "model" not in state:
        raise ValueError(
            f"checkpoint {uri} is an EMA export: it has no raw 'model' weights; use weights='ema'"
        )
    used = weights if weights in state else "model"
    sd = state[used]
    if used == "ema" and isinstance(sd, dict) and isinstance(sd.get("module"), dict):
        sd = sd["module"]  # EMA.state_dict() = {"module": ..., "nimg", ...}
    step = state.get("step")
    if step is None and isinstance(state.get("position"), dict):
        step = state["position"].get("step")
    return sd, used, None if step is None else int(step)


def _check_matches(net: nn.Module, sd: dict[str, Tensor], uri: str, preset: str) -> None:
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs preset {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(own[k].shape) != tuple(sd[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else "",
        ]
        raise ValueError(
            f"checkpoint {uri} does not match preset {preset!r}: " + "; ".join(p for p in parts if p)
        )


def load_model_for_sampling(
    ckpt_uri: str, *, device: torch.device | str = "cpu", weights: str = "ema", precision: str = "fp32"
) -> SamplingModel:
    """Rebuild net and SDE from a trainer checkpoint or EMA export; the weights must match the preset."""
    import hashlib

    from ..training.loop import AutocastNet

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    data = storage.read_bytes(ckpt_uri)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {ckpt_uri} cannot be loaded with weights_only=True: {e}") from e
    sd, used, step = _state_for_sampling(state, ckpt_uri, weights)
    config = TrainConfig.from_dict(state["config"])
    net = build_unet(config.preset, **config.model_overrides)
    _check_matches(net, sd, ckpt_uri, config.preset)
    net.load_state_dict(sd)
    net = net.to(device).eval().requires_grad_(False)
    sde = build_sde(config.sde, **config.sde_kwargs)
    lk = dict(config.loss_kwargs)
    parameterization = "edm" if config.loss == "edm" else lk.get("parameterization", "eps")
    wrapped: nn.Module = AutocastNet(net, torch.bfloat16 if precision == "bf16" else None)
    return SamplingModel(
        net=wrapped,
        sde=sde,
        config=config,
        parameterization=parameterization,
        noise_label_kind=lk.get("noise_label_kind", "log_sigma"),
        sigma_data=float(lk.get("sigma_data", 0.5)),
        num_classes=getattr(net, "num_classes", None),
        image_shape=(int(net.in_channels), int(net.image_size), int(net.image_size)),
        checkpoint_uri=ckpt_uri,
        checkpoint_sha256=hashlib.sha256(data).hexdigest(),
        step=step,
        weights=used,
    )


# ---- the plan: what is sampled, and how ------------------------------------------------------------


@dataclass(frozen=True)
class SamplingPlan:
    """Everything that decides the samples (recorded verbatim in the samples' manifest)."""

    n: int
    method: str
    steps: int
    guidance: float = 0.0
    base_seed: int = 0
    batch_size: int = 256
    options: dict[str, Any] = field(default_factory=dict)
    class_label: int | None = None  # None: sample i gets class i mod K (conditional models)
    levels: int = 256

    def validate(self, model: SamplingModel | None = None) -> None:
        """ValueError naming the field before any sampling work."""
        for name in ("n", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.method not in _SAMPLER_FUNCTIONS:
            raise ValueError(f"sampler must be one of {tuple(_SAMPLER_FUNCTIONS)}, got {self.method!r}")
        allowed = core.allowed_options(self.method)
        settable = sorted(set(allowed) - _NOT_SETTABLE)
        unknown = sorted(set(self.options) - set(settable))
        if unknown:
            raise ValueError(f"unknown sampler option(s) {unknown} for {self.method!r}; allowed: {settable}")
        if isinstance(self.base_seed, bool) or not isinstance(self.base_seed, int) or self.base_seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.base_seed!r}")
        if not 2 <= self.levels <= 256:
            raise ValueError(f"levels must lie in 2..256, got {self.levels}")
        if model is not None:
            model.check_guidance(self.guidance)
            if self.class_label is not None:
                if model.num_classes is None:
                    raise ValueError(f"class_label={self.class_label}: the model is unconditional")
                if not 0 <= self.class_label < model.num_classes:
                    raise ValueError(
                        f"class_label must lie in [0, {model.num_classes}), got {self.class_label}"
                    )
            # The core's own value checks (eps range, eta, snr, solver ...), before any network call.
            core.check_options(self.method, model.sde, self.steps, {**allowed, **self.options})

    @property
    def deterministic(self) -> bool:
        """True when a sample depends on its own x_T only (no noise drawn along the trajectory)."""
        o = {**core.allowed_options(self.method), **self.options}
        return (
            self.method == "ode"
            or (self.method == "heun" and o["S_churn"] == 0)
            or (self.method == "ddim" and o["eta"] == 0)
        )

    def num_blocks(self) -> int:
        return -(-self.n // self.batch_size)

    def block(self, b: int) -> range:
        return range(b * self.batch_size, min((b + 1) * self.batch_size, self.n))

    def seed(self, i: int) -> int:
        """seed(i) = base_seed + i: the seed of sample i's starting noise x_T."""
        return self.base_seed + i

    def block_noise_seed(self, b: int) -> int:
        """Seed of the in-trajectory noise of block b (stochastic samplers), derived from (base_seed, b)."""
        state = np.random.SeedSequence((self.base_seed, b, 0x5A3D)).generate_state(2, dtype=np.uint32)
        return int(state[0]) << 31 | int(state[1]) >> 1

    def labels(self, indices: Sequence[int], num_classes: int | None) -> Tensor | None:
        if num_classes is None:
            return None
        if self.class_label is not None:
            return torch.full((len(indices),), self.class_label, dtype=torch.long)
        return torch.as_tensor([i % num_classes for i in indices], dtype=torch.long)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- generation ----------------------------------------------------------------------------------


def initial_noise(model: SamplingModel, plan: SamplingPlan, indices: Sequence[int]) -> Tensor:
    """x_T [len(indices), C, H, W]: sample i from its own CPU generator seeded with seed(i)."""
    rows = [
        model.sde.prior_sampling(
            (1, *model.image_shape), generator=torch.Generator().manual_seed(plan.seed(i))
        )
        for i in indices
    ]
    return torch.cat(rows, 0)


@torch.no_grad()
def generate(
    model: SamplingModel, plan: SamplingPlan, indices: Sequence[int], *, noise_seed: int
) -> tuple[Tensor, int]:
    """Samples for `indices` as one batch (float, [-1, 1]-scaled), and the NFE it took."""
    device = next(model.net.parameters()).device
    opts = {**core.allowed_options(plan.method), **plan.options}
    dtype = opts.pop("dtype")
    opts["progress"], opts["callback"] = False, None
    x_T = initial_noise(model, plan, indices).to(device=device, dtype=dtype)
    labels = plan.labels(indices, model.num_classes)
    score_fn = model.score_fn(None if labels is None else labels.to(device), plan.guidance)
    counter = core.ScoreCounter(score_fn)
    if plan.method != "ode":
        opts["generator"] = torch.Generator(device=device).manual_seed(noise_seed)
    x = _SAMPLER_FUNCTIONS[plan.method](counter, model.sde, x_T, steps=plan.steps, **opts)
    return x, counter.nfe


def to_levels(x: Tensor, levels: int) -> np.ndarray:
    """[-1, 1] floats [B, C, H, W] → uint8 [B, H, W, C] with values 0..levels−1 (what the shards store)."""
    v = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2 * (levels - 1)).round().to(torch.uint8)
    return v.permute(0, 2, 3, 1).contiguous().numpy()


def from_levels(v: np.ndarray | Tensor, levels: int) -> Tensor:
    """uint8 [B, H, W, C] levels → [-1, 1] floats [B, C, H, W]."""
    t = torch.as_tensor(np.asarray(v)).permute(0, 3, 1, 2).float()
    return 2 * t / (levels - 1) - 1


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


def sample_blocks(
    ckpt_uri: str,
    out_uri: str,
    plan_dict: dict[str, Any],
    blocks: list[int],
    *,
    device: str = "cpu",
    precision: str = "fp32",
    shard_size: int = 10_000,
    grid_n: int = 0,
    model: SamplingModel | None = None,
) -> dict[str, Any]:
    """Generate `blocks` (contiguous), write them as shards under out_uri; one Ray task's work."""
    from ..data import manifest as mf

    t0 = time.perf_counter()
    plan = SamplingPlan(**plan_dict)
    if model is None:
        model = load_model_for_sampling(ckpt_uri, device=device, precision=precision)
    per_shard = max(shard_size // plan.batch_size, 1)
    shards, nfe, grid, sample_s = [], [], [], 0.0
    for g in range(0, len(blocks), per_shard):
        group = blocks[g : g + per_shard]
        imgs, idx_all, labels_all = [], [], []
        for b in group:
            idx = list(plan.block(b))
            ts = time.perf_counter()
            x, k = generate(model, plan, idx, noise_seed=plan.block_noise_seed(b))
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            sample_s += time.perf_counter() - ts
            nfe.append(k)
            imgs.append(to_levels(x, plan.levels))
            idx_all += idx
            lab = plan.labels(idx, model.num_classes)
            labels_all.append(lab)
        images = np.concatenate(imgs, 0)
        labels = None if labels_all[0] is None else torch.cat(labels_all)
        name = f"{SAMPLES_SPLIT}-{idx_all[0]:08d}.tar"
        data = _shard_bytes(images, labels, idx_all, plan.levels, out_uri)
        storage.write_bytes(storage.join(out_uri, name), data)
        shards.append(
            {
                "name": name,
                "split": SAMPLES_SPLIT,
                "count": len(idx_all),
                "first_index": idx_all[0],
                "seeds": [plan.seed(idx_all[0]), plan.seed(idx_all[-1])],
                "blocks": [group[0], group[-1]],
                "sha256": mf.bytes_sha256(data),
                "bytes": len(data),
            }
        )
        if len(grid) < grid_n:
            grid.append(images[: grid_n - len(grid)])
    return {
        "shards": shards,
        "nfe": nfe,
        "sample_seconds": sample_s,
        "seconds": time.perf_counter() - t0,
        "grid": np.concatenate(grid, 0) if grid else None,
        "host": os.uname().nodename,
    }


def _split_blocks(num_blocks: int, workers: int) -> list[list[int]]:
    """Contiguous runs of blocks, as even as possible, one per worker."""
    k = min(workers, num_blocks)
    edges = [round(j * num_blocks / k) for j in range(k + 1)]
    return [list(range(edges[j], edges[j + 1])) for j in range(k)]


def _run_ray(
    ckpt_uri: str,
    out_uri: str,
    plan: SamplingPlan,
    parts: list[list[int]],
    *,
    device: str,
    precision: str,
    shard_size: int,
    grid_n: int,
) -> list[dict[str, Any]]:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    resources = {"num_gpus": 1, "num_cpus": 1} if device.startswith("cuda") else {"num_cpus": 1}
    remote = ray.remote(max_retries=1, **resources)(sample_blocks)
    env = storage.worker_env()
    if env:
        remote = remote.options(runtime_env={"env_vars": env})
    refs = [
        remote.remote(
            ckpt_uri,
            out_uri,
            plan.to_dict(),
            part,
            device=device,
            precision=precision,
            shard_size=shard_size,
            grid_n=grid_n if j == 0 else 0,
        )
        for j, part in enumerate(parts)
    ]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, Exception) else e) from None


def run_sampling(
    ckpt_uri: str,
    out_uri: str,
    *,
    n: int,
    method: str = "heun",
    steps: int = 32,
    guidance: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    options: dict[str, Any] | None = None,
    class_label: int | None = None,
    levels: int | None = None,
    workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    shard_size: int = 10_000,
    grid_n: int = 100,
    grid_nrow: int = 10,
    grid_scale: int | None = None,
) -> dict[str, Any]:
    """Draw n samples from a checkpoint into shards + manifest.json + grid.png under out_uri.

    workers=0 samples in this process; workers ≥ 1 splits the blocks over that many Ray tasks (one GPU
    each when device is cuda). Returns the manifest written (its "sampling" entry is the provenance).
    """
    plan = SamplingPlan(
        n=n,
        method=method,
        steps=steps,
        guidance=guidance,
        base_seed=seed,
        batch_size=batch_size,
        options=dict(options or {}),
        class_label=class_label,
        levels=levels or 256,
    )
    plan.validate()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0 = this process), got {workers!r}")
    if device.startswith("cuda") and not torch.cuda.is_available() and workers == 0:
        raise ValueError(f"device={device!r} but no CUDA device is visible here")
    model = load_model_for_sampling(ckpt_uri, device=device if workers == 0 else "cpu", precision=precision)
    plan.validate(model)
    storage.check_writable(out_uri)
    out_uri = out_uri.rstrip("/")
    muri = storage.join(out_uri, MANIFEST_FILE)
    storage.remove(muri)  # a manifest from an earlier run no longer describes what is being written

    t0 = time.perf_counter()
    parts = _split_blocks(plan.num_blocks(), max(workers, 1))
    if workers == 0:
        results = [
            sample_blocks(
                ckpt_uri,
                out_uri,
                plan.to_dict(),
                parts[0],
                device=device,
                precision=precision,
                shard_size=shard_size,
                grid_n=grid_n,
                model=model,
            )
        ]
    else:
        results = _run_ray(
            ckpt_uri,
            out_uri,
            plan,
            parts,
            device=device,
            precision=precision,
            shard_size=shard_size,
            grid_n=grid_n,
        )
    wall = time.perf_counter() - t0

    shards = [s for r in results for s in r["shards"]]
    count = sum(s["count"] for s in shards)
    if count != plan.n:  # a guard on the block arithmetic: never publish a short set
        raise RuntimeError(f"produced {count} samples, expected {plan.n}")
    nfe = [k for r in results for k in r["nfe"]]
    if results[0]["grid"] is not None:
        g = results[0]["grid"]
        scale = grid_scale or max(1, 64 // model.image_shape[-1])
        storage.write_bytes(
            storage.join(out_uri, GRID_FILE),
            grid_png(from_levels(g, plan.levels), nrow=grid_nrow, levels=plan.levels, scale=scale),
        )
    manifest = samples_manifest(
        model,
        plan,
        shards,
        nfe=nfe,
        wall=wall,
        workers=workers,
        device=device,
        precision=precision,
        results=results,
    )
    storage.write_json(muri, manifest)
    # Shards of an earlier, different run in the same folder would confuse a listing; the manifest rules.
    current = {s["name"] for s in shards}
    for name in storage.listdir(out_uri):
        if name.startswith(f"{SAMPLES_SPLIT}-") and name.endswith(".tar") and name not in current:
            storage.remove(storage.join(out_uri, name))
    return manifest


def samples_manifest(
    model: SamplingModel,
    plan: SamplingPlan,
    shards: list[dict[str, Any]],
    *,
    nfe: list[int],
    wall: float,
    workers: int,
    device: str,
    precision: str,
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
                    else "one generator per block b, seed SamplingPlan.block_noise_seed(b)"
                ),
            },
            "labels": (
                None
                if k is None
                else f"class {plan.class_label}"
                if plan.class_label is not None
                else f"class(i) = i mod {k}"
            ),
            "device": device,
            "precision": precision,
            "workers": workers,
            "torch": torch.__version__,
            "hosts": sorted({r["host"] for r in results}),
            "seconds": round(wall, 3),
            "sampling_seconds": round(sample_s, 3),
            "img_per_s": plan.n / wall if wall > 0 else None,
        },
    }


def regenerate(
    samples_uri: str, indices: Sequence[int], *, device: str = "cpu", alone: bool | None = None
) -> Tensor:
    """Re-create samples `indices` from samples_uri's record ([-1, 1] floats, before quantisation).

    alone=None regenerates each sample on its own when the sampler is deterministic and re-runs its
    block otherwise; alone=False always re-runs the blocks (bit-identical on the same device and threads).
    """
    m = storage.read_json(storage.join(samples_uri.rstrip("/"), MANIFEST_FILE))
    rec = m["sampling"]
    plan = SamplingPlan(**rec["plan"])
    model = load_model_for_sampling(
        rec["checkpoint"]["uri"],
        device=device,
        weights=rec["checkpoint"]["weights"],
        precision=rec.get("precision", "fp32"),
    )
    if model.checkpoint_sha256 != rec["checkpoint"]["sha256"]:
        raise ValueError(f"checkpoint {rec['checkpoint']['uri']} changed since sampling (sha256 differs)")
    for i in indices:
        if not 0 <= i < plan.n:
            raise ValueError(f"index {i} outside the {plan.n} samples of {samples_uri}")
    if alone is None:
        alone = plan.deterministic
    out: dict[int, Tensor] = {}
    if alone:
        for i in indices:
            x, _ = generate(model, plan, [i], noise_seed=plan.block_noise_seed(i // plan.batch_size))
            out[i] = x[0]
    else:
        for b in sorted({i // plan.batch_size for i in indices}):
            idx = list(plan.block(b))
            x, _ = generate(model, plan, idx, noise_seed=plan.block_noise_seed(b))
            for j, i in enumerate(idx):
                out[i] = x[j]
    return torch.stack([out[i].cpu() for i in indices])


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


__all__ = [
    "SamplingModel",
    "SamplingPlan",
    "from_levels",
    "generate",
    "initial_noise",
    "load_model_for_sampling",
    "read_samples",
    "regenerate",
    "run_sampling",
    "sample_blocks",
    "samples_manifest",
    "to_levels",
]
