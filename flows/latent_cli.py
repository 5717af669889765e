"""`diffusion-pipeline latent`: the latent branch's flow (`flows.latent.latent_pipeline`), registered
through the `diffusion_pipeline.commands` entry point."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "latent",
        help="latent diffusion: autoencoder → latent shards → prior → decoded FID",
        description=(__doc__ or "").splitlines()[0],
    )
    p.add_argument("--source", default="digits")
    p.add_argument("--root", default="artifacts/latent-run")
    p.add_argument("--autoencoder-preset", default="vae-digits")
    p.add_argument("--preset", default="tiny-digits", help="the U-Net preset of the diffusion prior")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autoencoder-steps", type=int, default=600)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=500)
    p.add_argument(
        "--overwrite-latents",
        action="store_true",
        help="re-encode a destination holding latents of another autoencoder",
    )
    p.add_argument("--pixel-fid", type=float, default=None, help="the pixel model's FID, shown beside")
    p.set_defaults(func=_run)


def flow_params(args: argparse.Namespace) -> dict:
    """The flow's parameters from the command line (checked before Prefect or Ray starts)."""
    from pipeline.latent.layout import autoencoder_recipe
    from pipeline.models.autoencoder import autoencoder_config
    from pipeline.models.unet import preset_config

    autoencoder_config(args.autoencoder_preset)  # ValueError naming the presets
    preset_config(args.preset)
    autoencoder_recipe(args.autoencoder_preset, steps=args.autoencoder_steps, batch_size=args.batch_size)
    return {
        "source": args.source,
        "root": args.root,
        "autoencoder_preset": args.autoencoder_preset,
        "preset": args.preset,
        "seed": args.seed,
        "autoencoder_steps": args.autoencoder_steps,
        "train": {"steps": args.train_steps, "batch_size": args.batch_size},
        "evaluate": {"n_samples": args.n_samples},
        "overwrite_latents": args.overwrite_latents,
        "pixel_fid": args.pixel_fid,
    }


def _run(args: argparse.Namespace) -> int:
    params = flow_params(args)
    from flows.latent import latent_pipeline

    summary = latent_pipeline(**params)
    print(
        json.dumps({k: summary[k] for k in ("fid", "likelihood_bound", "pixel_fid")}, default=str, indent=1)
    )
    return 0
