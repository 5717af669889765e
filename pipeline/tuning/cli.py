"""`diffusion-pipeline tune schedules|guidance`: Ray Tune searches over noise schedules (each trial a
Ray Train run under ASHA) and over classifier-free guidance on a trained checkpoint.

    diffusion-pipeline tune schedules --data s3://b/digits --out s3://b/tune/s1 \\
        --space '{"sde": ["vp", "subvp", "ve", "ddpm-cosine"], "weighting": ["simple", "likelihood"]}' \\
        --metric heldout_loss --evaluations heldout_loss,fid,bpd --classifier s3://b/clf --steps 2000
    diffusion-pipeline tune schedules --out s3://b/tune/s1 --restore
    diffusion-pipeline tune guidance --checkpoint s3://b/runs/r1/ema-final.pt --data s3://b/digits \\
        --classifier s3://b/clf --out s3://b/tune/g1 --w 0,0.5,1,2,4 --samplers heun,ddim --steps 16,32

Every check (space, metric, data, classifier, cluster size) runs before a trial starts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import TrainConfig
from ..recipes import GUIDANCE_WEIGHTS


def _csv(kind: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, got {text!r}"
            ) from None

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune searches over noise schedules and guidance weights",
        description=__doc__.splitlines()[0],
    )
    tsub = p.add_subparsers(dest="tune_command", required=True)

    s = tsub.add_parser("schedules", help="ASHA search over SDEs, β/σ ranges and loss weightings")
    d = TrainConfig()
    s.add_argument("--out", required=True, help="search folder URI (search.json, tune/, trials/, report)")
    s.add_argument("--restore", action="store_true", help="finish the interrupted search in --out")
    s.add_argument("--data", help="sharded dataset URI (train split trains, test split scores)")
    s.add_argument("--space", help="JSON object of dimensions, or the URI of a .json file holding one")
    s.add_argument(
        "--metric",
        default="heldout_loss",
        help="what ASHA and the best trial go by: heldout_loss | fid | bpd | precision | loss",
    )
    s.add_argument(
        "--evaluations",
        type=_csv(str),
        default=("heldout_loss",),
        help="computed at every report: heldout_loss,fid,bpd (default: heldout_loss)",
    )
    s.add_argument("--classifier", help="domain classifier URI (for fid)")
    s.add_argument("--num-samples", type=int, default=1, help="draws of the space (grids repeat)")
    s.add_argument("--preset", default=d.preset)
    s.add_argument("--model-overrides", type=json.loads, default={}, help="JSON, e.g. '{\"channels\": 64}'")
    s.add_argument(
        "--loss-kwargs",
        type=json.loads,
        default={},
        help='base loss options kept by every trial, e.g. \'{"parameterization": "eps"}\'',
    )
    s.add_argument("--steps", type=int, default=d.steps)
    s.add_argument("--batch-size", type=int, default=d.batch_size)
    s.add_argument("--lr", type=float, default=d.lr)
    s.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    s.add_argument("--ema-halflife-kimg", type=float, default=d.ema_halflife_kimg)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--report-every", type=int, default=50, help="steps between reports (and evaluations)")
    s.add_argument(
        "--grace-period", type=int, help="steps before ASHA may stop a trial (default: report-every)"
    )
    s.add_argument("--reduction-factor", type=float, default=2.0)
    s.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    s.add_argument("--gpus-per-worker", type=float, default=0.0)
    s.add_argument("--cpus-per-worker", type=float, default=1.0)
    s.add_argument("--trial-cpus", type=float, default=0.1, help="CPUs of each trial's driver function")
    s.add_argument("--max-concurrent", type=int, help="default: as many trials as the cluster holds")
    s.add_argument("--fid-n", type=int, default=256)
    s.add_argument("--fid-steps", type=int, default=16)
    s.add_argument("--heldout-n", type=int, default=256)
    s.add_argument("--xflip", action="store_true", help="random horizontal flips in every trial (off)")
    s.add_argument("--name", default="schedules", help="Tune experiment name")
    s.set_defaults(func=_schedules)

    g = tsub.add_parser("guidance", help="sweep w × sampler × NFE on a trained conditional checkpoint")
    g.add_argument("--out", required=True, help="sweep folder URI")
    g.add_argument("--restore", action="store_true", help="finish the interrupted sweep in --out")
    g.add_argument("--checkpoint", help="trainer checkpoint or EMA export URI")
    g.add_argument("--data", help="sharded dataset URI (FID reference)")
    g.add_argument("--classifier", help="domain classifier URI (features and precision)")
    g.add_argument("--w", type=_csv(float), default=GUIDANCE_WEIGHTS,
                   help=f"default: {','.join(f'{w:g}' for w in GUIDANCE_WEIGHTS)}")
    g.add_argument("--samplers", type=_csv(str), default=("heun",), help="default: heun")
    g.add_argument("--steps", type=_csv(int), default=(16,), help="default: 16")
    g.add_argument("--n", type=int, default=500, help="samples per point")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=250)
    g.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per point)")
    g.add_argument("--max-concurrent", type=int)
    g.add_argument("--name", default="guidance")
    g.set_defaults(func=_guidance)

    e = tsub.add_parser("ema", help="search the post-hoc EMA length σ_rel of a finished run (no retraining)")
    e.add_argument("--run", required=True, help="training run folder URI (phema/ snapshots, ema-final.pt)")
    e.add_argument("--data", required=True, help="sharded dataset URI (FID reference)")
    e.add_argument("--classifier", required=True, help="domain classifier URI (features and accuracy)")
    e.add_argument("--out", required=True, help="search folder URI; a rerun scores only missing points")
    e.add_argument("--sigma-rels", type=_csv(float), default=(0.03, 0.05, 0.07, 0.10, 0.13, 0.17))
    e.add_argument("--n", type=int, default=200, help="samples per point")
    e.add_argument("--sampler", default="heun")
    e.add_argument("--steps", type=int, default=16)
    e.add_argument("--w", type=float, default=0.0, help="classifier-free guidance weight of the samples")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_ema)


def _space(text: str | None) -> dict[str, Any]:
    from .. import storage

    if not text:
        raise ValueError("--space is required (a JSON object, or the URI of a .json file)")
    if not text.lstrip().startswith("{"):
        if not storage.exists(text):
            raise ValueError(f"--space: {text!r} is neither a JSON object nor an existing file")
        text = storage.read_bytes(text).decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--space: not valid JSON ({e})") from None


def _schedules(args: argparse.Namespace) -> int:
    from .schedules import restore_schedules, search_schedules

    if args.restore:
        res = restore_schedules(args.out)
    else:
        if not args.data:
            raise ValueError("--data is required (unless --restore)")
        base = TrainConfig(
            preset=args.preset,
            model_overrides=args.model_overrides,
            loss_kwargs=args.loss_kwargs,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            ema_halflife_kimg=args.ema_halflife_kimg,
            seed=args.seed,
            xflip=args.xflip,
        )
        res = search_schedules(
            _space(args.space),
            base=base,
            data=args.data,
            out=args.out,
            metric=args.metric,
            evaluations=args.evaluations,
            classifier=args.classifier,
            num_samples=args.num_samples,
            report_every=args.report_every,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            trial_cpus=args.trial_cpus,
            max_concurrent=args.max_concurrent,
            fid_n=args.fid_n,
            fid_steps=args.fid_steps,
            heldout_n=args.heldout_n,
            name=args.name,
        )
    stopped = sum(r["stopped_early"] for r in res.rows)
    print(f"{len(res.rows)} trials ({stopped} stopped early){'' if res.complete else ', interrupted'}")
    if res.best is not None:
        print(
            f"best: {res.best['trial_id']} {res.best['sde']} ({res.best['params']}), weighting "
            f"{res.best['weighting']}: {res.metric} = {res.best[res.metric]:.4g}"
        )
    print(f"report: {res.report['markdown']}")
    return 0


def _guidance(args: argparse.Namespace) -> int:
    from .guidance import restore_guidance, sweep_guidance

    if args.restore:
        res = restore_guidance(args.out)
    else:
        missing = [f"--{k}" for k in ("checkpoint", "data", "classifier") if not getattr(args, k)]
        if missing:
            raise ValueError(f"{', '.join(missing)} required (unless --restore)")
        res = sweep_guidance(
            checkpoint=args.checkpoint,
            data=args.data,
            classifier=args.classifier,
            out=args.out,
            weights=args.w,
            samplers=args.samplers,
            steps=args.steps,
            n=args.n,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            max_concurrent=args.max_concurrent,
            name=args.name,
        )
    for key, r in sorted(res["best"].items()):
        precision = r.get("precision")
        precision = float("nan") if precision is None else precision
        print(f"best w ({key}): {r['w']:g}  FID {r['fid']:.4g}  precision {precision:.3f}")
    print(f"report: {res['report']['markdown']}")
    return 0


def _ema(args: argparse.Namespace) -> int:
    from .ema import sweep_ema

    res = sweep_ema(run=args.run, data=args.data, classifier=args.classifier, out=args.out,
                    sigma_rels=args.sigma_rels, n=args.n, sampler=args.sampler, steps=args.steps,
                    guidance=args.w, seed=args.seed)
    best = res["best"]
    if best:
        print(f"best σ_rel {best['sigma_rel']:.4f}: FID {best['fid']:.3f} → EMA {best['ema']}")
    print(f"report: {res['report']['markdown']}")
    return 0
