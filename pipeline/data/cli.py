"""`diffusion-pipeline shard SOURCE DEST`: write a source as WebDataset shards with a manifest."""

from __future__ import annotations

import argparse

MAX_LISTED = 20


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `shard` subcommand."""
    p = subparsers.add_parser(
        "shard",
        help="shard images into WebDataset tars on any storage URI",
        description="Write SOURCE as WebDataset shards plus manifest.json under DEST. A rerun with the same "
        "inputs verifies and keeps complete shards and rewrites only missing or corrupt ones.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="'digits' (embedded), a folder of class subfolders, an .npz/.npy, or a CIFAR python tarball URI",
    )
    p.add_argument("dest", metavar="DEST", help="destination folder URI (path, file://, s3://, gs://, ...)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="held-out fraction; default: the source's own split (CIFAR) or 0.1",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split and shard order")
    p.add_argument(
        "--skip-bad", action="store_true", help="leave unreadable or odd-sized images out, and report them"
    )
    p.add_argument(
        "--parallel",
        choices=("auto", "ray", "threads", "none"),
        default="auto",
        help="shard writers: Ray tasks, threads, or inline "
        "(auto: Ray when a cluster is running or RAY_ADDRESS is set)",
    )
    p.add_argument("--workers", type=int, default=None, help="thread count for --parallel threads")
    p.add_argument(
        "--format",
        choices=("png", "uint8"),
        default="png",
        help="image encoding: png (smallest for natural images) or uint8 (raw arrays, no decoding when "
        "loading; recorded in the manifest and read by the same loader)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Shard, show a progress bar, and print what was written, kept and skipped."""
    from pipeline.data.shard import shard_dataset

    report = shard_dataset(
        args.source,
        args.dest,
        shard_size=args.shard_size,
        test_fraction=args.test_fraction,
        seed=args.seed,
        skip_bad=args.skip_bad,
        parallel=args.parallel,
        max_workers=args.workers,
        progress=True,
        encoding=args.format,
    )
    m = report.manifest
    c = m["counts"]
    shape = "x".join(str(s) for s in m["image"]["shape"])
    print(
        f"{c['train']} train + {c['test']} test images ({shape}, levels {m['levels']}, "
        f"{m['num_classes']} classes) as {m['image']['encoding']} in {len(m['shards'])} shards: "
        f"{len(report.written)} written, "
        f"{len(report.kept)} already complete"
    )
    print(f"manifest: {report.manifest_uri}{'' if report.manifest_written else ' (unchanged)'}")
    if report.skipped_images:
        print(f"skipped {len(report.skipped_images)} bad images:")
        for _, reason in report.skipped_images[:MAX_LISTED]:
            print(f"  {reason}")
        if len(report.skipped_images) > MAX_LISTED:
            print(f"  ... and {len(report.skipped_images) - MAX_LISTED} more (see the manifest's 'skipped')")
    return 0
