"""`diffusion-pipeline train`: DSM training of a U-Net on sharded data with Ray Train.

    diffusion-pipeline train --data s3://bucket/digits --out s3://bucket/runs/r1 --preset tiny-digits \
        --steps 3000 --batch-size 128 --workers 2 --gpus-per-worker 0

Every check (preset, options, manifest, writable output, cluster size) runs before a worker starts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import OPTIMIZERS, PRECISIONS, RunOptions, TrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a U-Net with denoising score matching on Ray Train",
                       description=__doc__.splitlines()[0])
    d = TrainConfig()
    p.add_argument("--data", required=True, help="sharded dataset: folder (or manifest.json) URI")
    p.add_argument("--out", required=True,
                   help="run folder URI (checkpoints/, ema-final.pt, history.json, ray/)")
    p.add_argument("--preset", default=d.preset, help=f"U-Net preset (default: {d.preset})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"global batch, split across workers (default: {d.batch_size})")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; 0 trains on CPU")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default: 1)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--sde", default=d.sde, help=f"vp | subvp | ve | cosine-vp (default: {d.sde})")
    p.add_argument("--loss", default=d.loss,
                   help=f"dsm | edm | ism | ssm | ssm-vr (default: {d.loss}); ism/ssm/ssm-vr: implicit and "
                        "sliced score matching; "
                        'EDM2\'s learned weighting: --loss-kwargs \'{"learned_uncertainty": true}\'')
    p.add_argument("--loss-kwargs", type=json.loads, default={},
                   help='JSON, e.g. \'{"parameterization": "eps"}\' or \'{"sigma_data": 0.5}\'')
    p.add_argument("--model-overrides", type=json.loads, default={}, help='JSON, e.g. \'{"dropout": 0.0}\'')
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; <= 0 disables")
    p.add_argument("--ema-halflife-kimg", type=float, default=d.ema_halflife_kimg)
    p.add_argument("--phema-sigma-rels", type=lambda s: tuple(float(v) for v in s.split(",")), default=(),
                   help="post-hoc EMA profiles to keep, e.g. 0.05,0.10 (EDM2); searched by `tune ema`")
    p.add_argument("--phema-every", type=int, default=0, help="steps between post-hoc EMA snapshots")
    p.add_argument("--label-dropout", type=float, default=d.label_dropout,
                   help="classifier-free guidance label dropout (conditional presets)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--report-every", type=int, default=100, help="steps between reports (default: 100)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (default: 3)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts allowed; -1: unlimited")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    p.add_argument("--xflip", action="store_true",
                   help="random horizontal flips (off by default; refused when the data's manifest says "
                        "mirroring changes the class)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe (its own checks raise ValueError on out-of-range values)."""
    for name in ("loss_kwargs", "model_overrides"):
        if not isinstance(getattr(args, name), dict):
            raise ValueError(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(args, name)!r}")
    return TrainConfig(preset=args.preset, model_overrides=args.model_overrides, sde=args.sde,
                       loss=args.loss, loss_kwargs=args.loss_kwargs, label_dropout=args.label_dropout,
                       optimizer=args.optimizer,
                       lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                       grad_clip=args.grad_clip, ema_halflife_kimg=args.ema_halflife_kimg,
                       batch_size=args.batch_size, steps=args.steps, precision=args.precision,
                       compile=args.compile, seed=args.seed, xflip=args.xflip,
                       phema_sigma_rels=args.phema_sigma_rels, phema_every=args.phema_every)


def _main(args: argparse.Namespace) -> int:
    from .ray_train import train

    config = config_from_args(args)
    options = RunOptions(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                         cpus_per_worker=args.cpus_per_worker, report_every=args.report_every,
                         checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
                         max_failures=args.max_failures, resume=args.resume,
                         shuffle_buffer=args.shuffle_buffer,
                         loader_workers=args.loader_workers, progress=not args.no_progress)
    res = train(config, data=args.data, out=args.out, options=options)
    m: dict[str, Any] = res.metrics
    loss = f"{m['loss']:.4f}" if "loss" in m else "n/a"
    print(f"trained to step {res.step} in {res.seconds:.0f} s (final loss {loss})")
    print(f"checkpoint: {res.checkpoint}\nema:        {res.ema}")
    return 0
