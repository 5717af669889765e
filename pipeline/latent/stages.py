"""The latent branch's stages (Rombach et al. 2022): one function per stage, URIs in, small JSON-able dicts
out, each with a "markdown" entry the flow publishes (pictures embedded with `reports.embed_png`).

    autoencoder_stage → encode_stage → latent_train_stage → decoded_sample_stage → (stages.fid_stage)
                                                          → latent_likelihood_stage
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import reports, storage
from ..config import RunOptions, TrainConfig
from ..stages import train_stage
from .shards import latent_info

RECONSTRUCTIONS_FILE = "reconstructions.png"


def latent_config(base: TrainConfig | dict[str, Any], latent_data: str) -> TrainConfig:
    """`base` (a U-Net preset's config) with the network's input set to the latents' shape (C, H, W).
    ValueError naming both shapes when that U-Net cannot take them."""
    from ..models.unet import _check_config, preset_config

    cfg = base if isinstance(base, TrainConfig) else TrainConfig.from_dict(base)
    if cfg.model != "unet":
        raise ValueError(f"model={cfg.model!r}: the diffusion prior is a U-Net (model='unet')")
    info = latent_info(latent_data)
    if info is None:
        raise ValueError(
            f"latent_data={latent_data}: not a latent dataset (no 'latent' entry in its manifest)"
        )
    c, h, w = (int(v) for v in info["shape"])
    pixel = preset_config(cfg.preset, **cfg.model_overrides)
    overrides = {**cfg.model_overrides, "in_channels": c, "out_channels": c, "image_size": h}
    net = preset_config(cfg.preset, **overrides)
    try:
        if h != w:
            raise ValueError("the U-Net takes square inputs")
        _check_config(
            **{
                k: net[k]
                for k in (
                    "in_channels",
                    "out_channels",
                    "image_size",
                    "channels",
                    "channel_mult",
                    "num_res_blocks",
                    "attn_resolutions",
                    "dropout",
                    "embedding_type",
                    "num_classes",
                    "num_heads",
                )
            }
        )
    except ValueError as e:
        raise ValueError(
            f"latent shape {c}×{h}×{w} (C×H×W) cannot go through U-Net preset {cfg.preset!r} "
            f"(made for {pixel['in_channels']}×{pixel['image_size']}×{pixel['image_size']}, "
            f"{len(net['channel_mult'])} levels): {e}"
        ) from e
    return cfg.replace(model_overrides=overrides)


def autoencoder_stage(
    config: TrainConfig | dict[str, Any],
    data: str,
    out: str,
    *,
    options: RunOptions | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the autoencoder (`config.model == "autoencoder"`) with the diffusion training machinery
    (Ray Train, checkpoints, resume); adds test reconstructions (error, picture) to the result."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if cfg.model != "autoencoder":
        raise ValueError(f"model={cfg.model!r}: the autoencoder stage trains model='autoencoder' configs")
    res = train_stage(cfg, data, out, options=options, on_progress=on_progress)
    rec = reconstructions(res["ema"], data, storage.join(out, RECONSTRUCTIONS_FILE))
    res.update({"reconstruction_mse": rec["mse"], "reconstructions": rec["uri"]})
    res["markdown"] = (
        "### Autoencoder\n\n"
        + reports.table(
            [
                ("preset", cfg.preset),
                ("kind", rec["kind"]),
                ("latent shape", rec["latent_shape"]),
                ("test reconstruction MSE", rec["mse"]),
            ]
        )
        + "\n\n"
        + res["markdown"].replace("### Training", "#### Training", 1)
        + "\n\n"
        + reports.embed_png(
            storage.read_bytes(rec["uri"]),
            "test images (odd rows) and their reconstructions (even rows)",
            link=rec["uri"],
        )
    )
    return res


@torch.no_grad()
def reconstructions(autoencoder: str, data: str, uri: str, *, n: int = 50) -> dict[str, Any]:
    """Test images and D(μ(x)) interleaved row by row in a grid PNG at `uri`; the test MSE on them."""
    from ..data.loader import make_loader
    from ..evaluation.grid import grid_png
    from .model_io import load_autoencoder

    ae = load_autoencoder(autoencoder)
    x, _ = next(iter(make_loader(data, "test", n, shuffle_buffer=0, rank=0, world_size=1)))
    x_hat = ae.net.decode(ae.net.moments(x)[0]).clamp(-1, 1)
    rows = [t for i in range(0, x.shape[0], 10) for t in (x[i : i + 10], x_hat[i : i + 10])]
    from ..data.manifest import read_manifest

    levels = int(read_manifest(data)["levels"])
    storage.write_bytes(
        uri, grid_png(torch.cat(rows), nrow=10, levels=levels, scale=max(1, 64 // x.shape[-1]))
    )
    return {
        "uri": uri,
        "mse": float((x_hat - x).pow(2).mean()),
        "kind": ae.net.kind,
        "latent_shape": "×".join(map(str, ae.latent_shape)),
    }


def encode_stage(
    data: str, autoencoder: str, dest: str, *, overwrite: bool = False, batch_size: int = 256
) -> dict[str, Any]:
    """Latent shards of `data` under `dest` (kept when already encoded by this autoencoder)."""
    from .shards import encode_dataset

    rep = encode_dataset(data, autoencoder, dest, batch_size=batch_size, overwrite=overwrite)
    info = rep.manifest["latent"]
    res = {
        "data": dest.rstrip("/"),
        "manifest": rep.manifest_uri,
        "latent_shape": info["shape"],
        "scale_factor": info["scale_factor"],
        "autoencoder_sha256": info["autoencoder_sha256"],
        "counts": rep.manifest["counts"],
        "levels": rep.manifest["levels"],
        "written": len(rep.written),
        "kept": len(rep.kept),
        "skipped": rep.skipped,
    }
    res["markdown"] = f"### Latent shards `{dest}`\n\n" + reports.table(
        [
            ("pixel data", data),
            ("latent shape (C×H×W)", "×".join(map(str, info["shape"]))),
            ("scale factor s (unit std)", info["scale_factor"]),
            ("std before scaling", info["std_before_scaling"]),
            ("autoencoder sha256", info["autoencoder_sha256"][:16] + "…"),
            ("train / test latents", f"{res['counts']['train']} / {res['counts']['test']}"),
            ("shards written / kept", f"{res['written']} / {res['kept']}"),
        ]
    )
    return res


def latent_train_stage(
    config: TrainConfig | dict[str, Any],
    latent_data: str,
    out: str,
    *,
    options: RunOptions | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The existing diffusion training on latent shards, the U-Net sized to the latents."""
    cfg = latent_config(config, latent_data)
    res = train_stage(cfg, latent_data, out, options=options, on_progress=on_progress)
    res["markdown"] = res["markdown"].replace("### Training", "### Training the latent diffusion prior", 1)
    return res


def decoded_sample_stage(
    checkpoint: str,
    autoencoder: str,
    latent_data: str,
    out: str,
    *,
    n: int,
    method: str = "heun",
    steps: int = 32,
    guidance: float = 0.0,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """N latent samples decoded to pixels under `out` (shards, manifest, grid) for `stages.fid_stage`."""
    from ..evaluation.generate import SamplingPlan
    from ..evaluation.sampling import GRID_FILE
    from .evaluate import sample_decoded

    levels = int(latent_info(latent_data)["pixel_levels"]) if latent_info(latent_data) else 256
    plan = SamplingPlan(
        n=n,
        method=method,
        steps=steps,
        guidance=guidance,
        base_seed=seed,
        batch_size=batch_size,
        levels=levels,
    )
    m = sample_decoded(checkpoint, autoencoder, latent_data, out, plan, device=device)
    rec = m["sampling"]
    grid = storage.join(out.rstrip("/"), GRID_FILE)
    res = {
        "samples": out.rstrip("/"),
        "grid": grid,
        "n": m["counts"]["samples"],
        "method": rec["sampler"],
        "steps": rec["steps"],
        "nfe_per_sample": rec["nfe_per_sample"]["mean"],
        "seconds": rec["seconds"],
    }
    res["markdown"] = (
        "### Decoded latent samples\n\n"
        + reports.table([(k, res[k]) for k in ("n", "method", "steps", "nfe_per_sample", "seconds")])
        + "\n\n"
        + reports.embed_png(storage.read_bytes(grid), "decoded samples", link=grid)
    )
    return res


def latent_likelihood_stage(
    checkpoint: str,
    autoencoder: str,
    latent_data: str,
    out: str,
    *,
    max_samples: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> dict[str, Any]:
    """Bits/dim of the pixel test split under the latent model: a bound (see `evaluate.latent_bound`).
    The identity autoencoder's latents are pixels: its bound is the pixel branch's ODE bits/dim with
    uniform dequantisation, computed on the latent shards."""
    from ..evaluation.bpd import evaluate_bpd, iter_batches, summarize
    from .evaluate import fit_decoder_std, latent_bound, open_latent_models

    model, ae, info = open_latent_models(checkpoint, autoencoder, latent_data)
    score_fn, levels = model.score_fn(None), int(info["pixel_levels"])
    common = {"batch_size": batch_size, "seed": seed, "max_samples": max_samples, "progress": False}
    if ae.net.kind == "identity":
        res = evaluate_bpd(
            score_fn, model.sde, latent_data, rtol=rtol, atol=atol, dequantize={"levels": levels}, **common
        )
        formula = "identity autoencoder: −log P(x) ≤ E_u[−log p(x+u)] − D·log Δ (uniform dequantisation)"
    else:
        sigma = fit_decoder_std(ae, info["pixel_data"])
        t0, bpds, terms, nfe = time.perf_counter(), [], {"decoder": [], "neg_entropy": [], "prior": []}, []
        for b, x in enumerate(
            iter_batches(info["pixel_data"], batch_size, split="test", max_samples=max_samples)
        ):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b)
            r = latent_bound(
                score_fn,
                model.sde,
                ae,
                x,
                scale=float(info["scale_factor"]),
                levels=levels,
                decoder_std=sigma,
                generator=g,
                rtol=rtol,
                atol=atol,
            )
            bpds.append(r["bpd"].detach())
            nfe.append(int(r["nfe"]))
            for k in terms:
                terms[k].append(r[k].detach())
        res = summarize(
            torch.cat(bpds),
            nfe,
            metric="bpd-latent-bound",
            seconds=time.perf_counter() - t0,
            settings={"decoder_std": sigma, "scale_factor": info["scale_factor"], "seed": seed},
            terms={k: torch.cat(v) for k, v in terms.items()},
        )
        formula = "−log P(x) ≤ E_q[−log P(x|z)] − H[q(z|x)] − log p_s(s·z) − d_z·log s"
    res.update({"bound": True, "formula": formula, "autoencoder_sha256": ae.sha256})
    uri = storage.join(out, "latent-likelihood.json")
    storage.write_json(uri, res)
    rows = [
        ("bits/dim (upper bound)", res["bpd"]),
        ("± stderr", res["bpd_stderr"]),
        ("n", res["n"]),
        ("NFE per batch", res["nfe_mean"]),
        ("formula", formula),
    ]
    rows += [(f"term: {k}", v) for k, v in (res.get("terms") or {}).items()]
    markdown = "### Latent likelihood (a bound, not the exact likelihood)\n\n" + reports.table(rows)
    bpd = res["bpd"]
    return {
        "report": uri,
        "bpd_bound": bpd if math.isfinite(bpd) else None,
        "bpd_stderr": res["bpd_stderr"],
        "n": res["n"],
        "formula": formula,
        "markdown": markdown,
    }


def pixel_fid(root: str, extractor: str = "domain-classifier") -> float | None:
    """The pixel branch's FID under the same run root (`RunLayout.eval`), if that branch has run."""
    from ..layout import RunLayout

    uri = storage.join(RunLayout(root).eval, f"eval-{extractor}.json")
    return float(storage.read_json(uri)["fid"]) if storage.exists(uri) else None


__all__ = [
    "autoencoder_stage",
    "decoded_sample_stage",
    "encode_stage",
    "latent_config",
    "latent_likelihood_stage",
    "latent_train_stage",
    "pixel_fid",
    "reconstructions",
]
