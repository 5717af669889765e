"""Decoded evaluation of a latent diffusion prior: samples decoded to pixels (then the existing FID and
grid code), and a bound on the pixel log-likelihood."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import storage
from ..diffusion.dequantize import bin_width, from_levels, to_levels
from ..diffusion.likelihood import ode_likelihood
from ..evaluation.generate import SamplingPlan, generate
from ..training.checkpoint import SamplingModel, load_model
from .model_io import LoadedAutoencoder, load_autoencoder
from .shards import check_latents_match


def check_prior_shape(model: SamplingModel, latent_shape: Sequence[int]) -> None:
    """ValueError naming both shapes when the prior's network does not take the latents."""
    if tuple(model.image_shape) != tuple(latent_shape):
        raise ValueError(
            f"the diffusion prior {model.checkpoint_uri} takes "
            f"{'×'.join(map(str, model.image_shape))} (C×H×W) inputs but the latents are "
            f"{'×'.join(map(str, latent_shape))}: train the prior on these latents"
        )


def open_latent_models(
    checkpoint: str, autoencoder: str, latent_data: str, *, device: str = "cpu"
) -> tuple[SamplingModel, LoadedAutoencoder, dict[str, Any]]:
    """The prior, the autoencoder and the latent manifest's entry, checked against each other."""
    ae = load_autoencoder(autoencoder, device=device)
    info = check_latents_match(latent_data, ae.sha256)
    model = load_model(checkpoint, device=device)
    check_prior_shape(model, info["shape"])
    return model, ae, info


@torch.no_grad()
def decode(ae: LoadedAutoencoder, z_scaled: Tensor, scale: float) -> Tensor:
    """x = D(z_s / s) clamped to [-1, 1] (the samples live in the scaled latent space)."""
    return ae.net.decode(z_scaled / scale).clamp(-1.0, 1.0)


def sample_decoded(
    checkpoint: str,
    autoencoder: str,
    latent_data: str,
    out: str,
    plan: SamplingPlan,
    *,
    device: str = "cpu",
    grid_n: int = 100,
) -> dict[str, Any]:
    """Draw the plan's latent samples with `generate` (the one sampling path), decode them, and write
    them under `out` as the sampling stage does (shards, manifest.json, grid.png), so the existing FID
    code reads them. The manifest's "sampling" entry adds the autoencoder."""
    from ..evaluation.grid import grid_png
    from ..evaluation.sampling import (
        GRID_FILE,
        MANIFEST_FILE,
        SAMPLES_SPLIT,
        Execution,
        _shard_bytes,
        samples_manifest,
    )

    plan.validate()
    model, ae, info = open_latent_models(checkpoint, autoencoder, latent_data, device=device)
    plan.validate(model)
    storage.check_writable(out)
    out = out.rstrip("/")
    storage.remove(storage.join(out, MANIFEST_FILE))
    t0 = time.perf_counter()
    images, labels, idx, nfe, sample_s = [], [], [], [], 0.0
    for blk in generate(model, plan):
        images.append(to_levels(decode(ae, blk.x.float(), float(info["scale_factor"])), plan.levels))
        labels.append(blk.labels)
        idx += blk.indices
        nfe.append(blk.nfe)
        sample_s += blk.seconds
    x = np.concatenate(images, 0)
    lab = None if labels[0] is None else torch.cat(labels)
    data = _shard_bytes(x, lab, idx, plan.levels, out)
    name = f"{SAMPLES_SPLIT}-{idx[0]:08d}.tar"
    storage.write_bytes(storage.join(out, name), data)
    from ..data import manifest as mf

    shard = {
        "name": name,
        "split": SAMPLES_SPLIT,
        "count": len(idx),
        "first_index": idx[0],
        "seeds": [plan.seed(idx[0]), plan.seed(idx[-1])],
        "blocks": [0, plan.num_blocks() - 1],
        "sha256": mf.bytes_sha256(data),
        "bytes": len(data),
    }
    wall = time.perf_counter() - t0
    results = [{"sample_seconds": sample_s, "host": "local"}]
    manifest = samples_manifest(
        model, plan, [shard], nfe=nfe, wall=wall, execution=Execution(device=device), results=results
    )
    c, h, w = ae.image_shape
    manifest["image"] = {"shape": [h, w, c], "dtype": "uint8", "encoding": "png"}
    manifest["sampling"]["decoded_by"] = {
        "autoencoder": ae.uri,
        "sha256": ae.sha256,
        "scale_factor": info["scale_factor"],
        "latent_shape": info["shape"],
    }
    scale = max(1, 64 // w)
    storage.write_bytes(
        storage.join(out, GRID_FILE),
        grid_png(from_levels(x[:grid_n], plan.levels), nrow=10, levels=plan.levels, scale=scale),
    )
    storage.write_json(storage.join(out, MANIFEST_FILE), manifest)
    return manifest


def decoder_nll(x: Tensor, mean: Tensor, std: float, levels: int) -> Tensor:
    """−log P(x|z) in nats per sample for a discretised Gaussian decoder N(D(z), std²) on L-level data
    in [-1, 1]: each pixel's mass is the Gaussian's mass over its bin of width Δ = 2/(L−1), the edge bins
    open to ±∞ (Ho et al. 2020, eq. 13)."""
    d = bin_width(levels) / 2
    normal = torch.distributions.Normal(0.0, 1.0)
    upper = torch.where(x > 1 - d, torch.ones_like(x), normal.cdf((x + d - mean) / std))
    lower = torch.where(x < -1 + d, torch.zeros_like(x), normal.cdf((x - d - mean) / std))
    return -torch.log((upper - lower).clamp_min(1e-12)).flatten(1).sum(1)


def latent_bound(
    score_fn: Any,
    sde: Any,
    ae: LoadedAutoencoder,
    x: Tensor,
    *,
    scale: float,
    levels: int,
    decoder_std: float,
    generator: torch.Generator | None = None,
    **ode_options: Any,
) -> dict[str, Tensor]:
    """A bound on the pixel log-likelihood of a VAE with a diffusion prior (per sample, bits/dim).

    With z ~ q(z|x) = N(μ(x), diag σ²(x)) one draw per sample, the scaled latent z_s = s·z and the
    prior density p_s of the diffusion model on z_s (the probability-flow ODE, Song et al. 2021, App. D.2),
    the evidence lower bound (Kingma & Welling 2014, eq. 3) gives, per sample,

        −log P(x) ≤ E_q[−log P(x|z)] − H[q(z|x)] − E_q[log p_s(s·z)] − d_z·log s

    where P(x|z) is the discretised Gaussian decoder `decoder_nll` (σ = decoder_std), the entropy is
    H[q] = ½ Σ_j (log 2πe + log σ_j²), and d_z·log s is the change of variables z → s·z. Bits/dim are the
    right side / (D ln 2), D the pixel dimensions. This is a BOUND (an upper bound on bits/dim, one Monte
    Carlo draw of z, and the ODE's log p_s is itself an estimate), never the exact likelihood.
    """
    if ae.net.kind != "vae":
        raise ValueError(
            f"the latent likelihood bound needs a stochastic encoder (kind 'vae'); this "
            f"autoencoder is {ae.net.kind!r} (the identity is evaluated in pixel space)"
        )
    mean, logvar = ae.net.moments(x)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * eps
    rec = decoder_nll(x, ae.net.decode(z), decoder_std, levels)
    entropy = 0.5 * (math.log(2 * math.pi * math.e) + logvar).flatten(1).sum(1)
    prior = ode_likelihood(score_fn, sde, z * scale, generator=generator, **ode_options)
    d_z, d_x = z[0].numel(), x[0].numel()
    nll = rec - entropy - prior.logp - d_z * math.log(scale)
    per_dim = 1.0 / (d_x * math.log(2.0))
    return {
        "bpd": nll * per_dim,
        "decoder": rec * per_dim,
        "neg_entropy": -entropy * per_dim,
        "prior": (-prior.logp - d_z * math.log(scale)) * per_dim,
        "nfe": torch.tensor(prior.nfe),
    }


@torch.no_grad()
def fit_decoder_std(
    ae: LoadedAutoencoder, data: str, *, split: str = "train", max_samples: int = 2048, batch_size: int = 256
) -> float:
    """σ of the Gaussian decoder by maximum likelihood on `split`: the RMS error of D(μ(x)). Any σ gives a
    valid bound; the fitted one makes it tight (fitted on train, evaluated on test)."""
    from ..evaluation.bpd import iter_batches

    se, n = 0.0, 0
    for x in iter_batches(data, batch_size, split=split, max_samples=max_samples):
        se += float((ae.net.decode(ae.net.moments(x)[0]) - x).pow(2).sum())
        n += x.numel()
    return max(math.sqrt(se / max(n, 1)), 1e-3)


__all__ = [
    "check_prior_shape",
    "decode",
    "decoder_nll",
    "fit_decoder_std",
    "latent_bound",
    "open_latent_models",
    "sample_decoded",
]
