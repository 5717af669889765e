"""Latent versus pixel diffusion on the demo's data (the digits) at equal training wall time.

Both branches get the same budget of training seconds on this machine: the pixel U-Net trains for all
of it; the latent branch spends part on the digits VAE and encoding, the rest on the prior. Both draw
the same number of samples with the same sampler and seeds, scored by FID on the domain classifier's
features against the train split.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_latent.py --budget 150 --out /tmp/bench-latent

Measured on the shared 2-core CPU machine (2026-12, 1 thread, budget 150 s, 500 samples, Heun 32 steps,
domain-feature FID against the train split; real-vs-real floor at N = 500: 2.78, range 1.85–3.23):
pixel U-Net (tiny-digits, EDM loss) 375 steps → FID 5.44; latent branch: vae-digits 500 steps + encoding
22 s, then the prior on 2×4×4 latents (s = 0.819) 1,025 steps → FID 8.01.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline import stages
from pipeline.data.loader import make_loader
from pipeline.demo import demo_config
from pipeline.latent import stages as latent
from pipeline.latent.layout import autoencoder_recipe
from pipeline.training.checkpoint import export_ema
from pipeline.training.loop import Trainer, fit


def _train_for(trainer: Trainer, data: str, seconds: float, *, chunk: int = 25) -> int:
    """Steps of `chunk` until `seconds` of wall time are spent; returns the steps taken."""
    t0 = time.perf_counter()
    bs = trainer.config.batch_size
    batches = lambda e: make_loader(data, "train", bs, seed=trainer.config.seed, epoch=e, rank=0,  # noqa: E731
                                    world_size=1)
    while time.perf_counter() - t0 < seconds:
        fit(trainer, batches, steps=trainer.position.step + chunk, report_every=0)
    return trainer.position.step


def _export(trainer: Trainer, uri: str) -> str:
    return export_ema(uri, ema=trainer.ema.state_dict(), config=trainer.config.to_dict(),
                      step=trainer.position.step, network=trainer.net.config)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=120.0, help="training seconds per branch")
    ap.add_argument("--ae-steps", type=int, default=500)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out", default="/tmp/bench-latent")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out
    data = stages.shard_stage("digits", f"{out}/data", shard_size=400, test_fraction=0.1)["data"]
    clf = stages.classifier_stage(data, f"{out}/classifier")["classifier"]
    steps = 10**9  # the budget stops training, not the config
    res = {}

    t0 = time.perf_counter()
    px = Trainer.from_config(demo_config(steps, 0))
    res["pixel_steps"] = _train_for(px, data, args.budget)
    res["pixel_train_s"] = time.perf_counter() - t0
    s = stages.sample_stage(_export(px, f"{out}/px.pt"), f"{out}/px-samples", n=args.n, levels=17, seed=1)
    res["pixel_fid"] = stages.fid_stage(s["samples"], data, f"{out}/px-eval", classifier=clf)["fid"]

    t0 = time.perf_counter()
    ae = Trainer.from_config(autoencoder_recipe("vae-digits", steps=args.ae_steps, batch_size=64))
    fit(ae, lambda e: make_loader(data, "train", 64, epoch=e, rank=0, world_size=1), steps=args.ae_steps,
        report_every=0)
    ae_uri = _export(ae, f"{out}/ae.pt")
    lat = latent.encode_stage(data, ae_uri, f"{out}/latents")
    res["ae_and_encode_s"] = time.perf_counter() - t0
    cfg = demo_config(steps, 0).replace(loss_kwargs={"sigma_data": 1.0})  # the latents have unit std
    prior = Trainer.from_config(latent.latent_config(cfg, lat["data"]))
    res["latent_prior_steps"] = _train_for(prior, lat["data"], args.budget - res["ae_and_encode_s"])
    res["latent_train_s"] = time.perf_counter() - t0
    prior_uri = _export(prior, f"{out}/prior.pt")
    s = latent.decoded_sample_stage(prior_uri, ae_uri, lat["data"], f"{out}/la-samples", n=args.n, seed=1)
    res["latent_fid"] = stages.fid_stage(s["samples"], data, f"{out}/la-eval", classifier=clf)["fid"]
    res["latent_shape"], res["scale_factor"] = lat["latent_shape"], lat["scale_factor"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
