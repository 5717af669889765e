"""Loader throughput (images/s) at 32×32: WebDataset shards on local disk and on a local S3 API server
(moto, started here on 127.0.0.1, reached through s3fs) against an in-memory tensor baseline doing the
same per-batch work (index, scale to [-1, 1], random flip) without storage or PNG decoding.

    .venv/bin/python benchmarks/bench_loader.py [--n 10000] [--batch-size 128] [--workers 0 2]
        [--formats png uint8]

Each shard format (PNG per sample, or raw uint8 arrays per shard) is written to both stores and read
by the same `make_loader`; the table gives each row's ratio to the in-memory baseline and to the PNG
row with the same store and worker count, and the bytes per image of each format.

Images are CIFAR-like in size and PNG compressibility: random 8×8 colour blocks upsampled to 32×32
with ±8 grey-level noise (PNGs of CIFAR-10's order of size). Prints a markdown table with images per
wall-clock second and per CPU-second (this process and its DataLoader workers; for the S3 rows the
in-process moto server's CPU is included).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def make_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.int16)
    img = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2)
    img = np.clip(img + rng.integers(-8, 9, size=img.shape), 0, 255).astype(np.uint8)
    return img, rng.integers(0, 10, size=n)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers are joined at the end)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def baseline(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0) -> tuple[float, float]:
    """One shuffled pass over an in-memory uint8 tensor with the loader's per-batch arithmetic."""
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    t0, c0 = time.perf_counter(), cpu_seconds()
    perm = torch.randperm(len(x_all), generator=g)
    n = 0
    for start in range(0, len(perm), batch_size):
        idx = perm[start : start + batch_size]
        x = x_all[idx].permute(0, 3, 1, 2).to(torch.float32) * (2.0 / 255.0) - 1.0
        flip = torch.rand(len(idx), generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        y = y_all[idx]
        n += len(y)
    return n / (time.perf_counter() - t0), n / (cpu_seconds() - c0)


def loader_rate(uri: str, batch_size: int, workers: int, epoch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one pass, worker start-up included."""
    from pipeline.data.loader import make_loader

    loader = make_loader(uri, "train", batch_size, num_workers=workers, flip=True, epoch=epoch)
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = sum(len(y) for _, y in loader)
    return n / (time.perf_counter() - t0), n / (cpu_seconds() - c0)


def median_pair(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def start_s3() -> object:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="images (default 10000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    p.add_argument("--repeats", type=int, default=3, help="passes per configuration (median reported)")
    p.add_argument("--formats", nargs="+", default=["png", "uint8"], choices=["png", "uint8"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from pipeline import storage
    from pipeline.data.shard import shard_dataset

    images, labels = make_images(args.n)
    server = start_s3()
    rows = []
    sizes, shard_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/bench.npz", images=images, labels=labels)
        fs, _ = storage.get_fs("s3://bench")
        fs.mkdir("bench")
        stores = {}
        for fmt in args.formats:
            local, remote = f"{tmp}/shards-{fmt}", f"s3://bench/shards-{fmt}"
            t0 = time.perf_counter()
            rep = shard_dataset(f"{tmp}/bench.npz", local, shard_size=args.shard_size, test_fraction=0.0,
                                encoding=fmt)
            shard_s[fmt] = time.perf_counter() - t0
            shard_dataset(f"{tmp}/bench.npz", remote, shard_size=args.shard_size, test_fraction=0.0,
                          encoding=fmt)
            sizes[fmt] = sum(s["bytes"] for s in rep.manifest["shards"]) / args.n
            stores[fmt] = (("local disk", local), ("S3 API server (moto)", remote))

        base, base_cpu = median_pair(
            [baseline(images, labels, args.batch_size, r) for r in range(args.repeats)]
        )
        rows.append(("in-memory uint8 tensor (baseline)", "-", "-", base, base_cpu))
        for i, store in enumerate(("local disk", "S3 API server (moto)")):
            for w in args.workers:
                for fmt in args.formats:
                    uri = stores[fmt][i][1]
                    runs = [loader_rate(uri, args.batch_size, w, epoch=r) for r in range(args.repeats)]
                    rows.append((f"WebDataset, {store}", fmt, str(w), *median_pair(runs)))
    server.stop()

    shape = "×".join(str(d) for d in images.shape[1:])
    print(f"\n{args.n} images {shape}, batch {args.batch_size}, shards of {args.shard_size}")
    print("| format | bytes per image (tar) | × raw pixels | sharding to local disk (s) |")
    print("|---|---:|---:|---:|")
    for fmt in args.formats:
        raw = int(np.prod(images.shape[1:]))
        print(f"| {fmt} | {sizes[fmt]:,.0f} | {sizes[fmt] / raw:.3f} | {shard_s[fmt]:.1f} |")
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}\n"
    )
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.1f}; images per CPU-second is less sensitive to it\n")
    print("| source | format | DataLoader workers | images/s (wall) | × baseline | × PNG | img per CPU-s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    png_rate = {(name, w): rate for name, fmt, w, rate, _ in rows if fmt == "png"}
    for name, fmt, w, rate, cpu_rate in rows:
        vs_png = f"{rate / png_rate[(name, w)]:.2f}" if (name, w) in png_rate else "-"
        print(f"| {name} | {fmt} | {w} | {rate:,.0f} | {rate / base:.3f} | {vs_png} | {cpu_rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
