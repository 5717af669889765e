"""Bits/dim throughput (images/s) and NFE of the probability-flow ODE likelihood, over a batch-size sweep.

    .venv/bin/python benchmarks/bench_bpd.py --preset ddpm-cifar10 --batch-sizes 16,32,64,128 --device cuda
    .venv/bin/python benchmarks/bench_bpd.py --preset tiny-digits --batch-sizes 2,4 --device cpu --batches 1

Each row solves `ode_likelihood` (dopri5, rtol = atol = 1e-5, one Rademacher probe, uniform
dequantisation) on `--batches` batches after one warm-up batch, for a U-Net from `build_unet(preset)`
wrapped by `make_score_fn` (ε-prediction, VP SDE). Data: the sklearn digits (17 levels) for tiny-digits,
otherwise CIFAR-like 32×32 8-bit images (random 8×8 colour blocks upsampled, ±8 levels of noise).
Without --checkpoint the network has its initial weights. DDPM zero-initialises the output conv (and
each block's last layer), so a fresh network predicts ε̂ ≡ 0, the ODE is linear and NFE says nothing
about a trained model; --nonzero-init fills those zero layers with N(0, 0.02²) to give a nonlinear
field. The cost per score evaluation is the trained model's either way; NFE needs --checkpoint to be
the real figure. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusion.likelihood import ode_likelihood
from pipeline.diffusion.param import make_score_fn
from pipeline.diffusion.sde import VPSDE
from pipeline.models import build_unet, preset_config


def make_data(preset: str, n: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """n images on the L-level grid of [-1, 1] in the preset's shape, and L."""
    cfg = preset_config(preset)
    c, s = cfg["in_channels"], cfg["image_size"]
    rng = np.random.default_rng(seed)
    if preset == "tiny-digits":
        from sklearn.datasets import load_digits

        imgs = load_digits().images[rng.integers(0, 1797, size=n)].astype(np.float32)[:, None]
        return torch.from_numpy(imgs) / 8 - 1, 17
    blocks = rng.integers(0, 256, size=(n, c, 8, 8)).astype(np.int16)
    img = np.repeat(np.repeat(blocks, s // 8, axis=2), s // 8, axis=3)
    img = np.clip(img + rng.integers(-8, 9, size=img.shape), 0, 255).astype(np.float32)
    return torch.from_numpy(img) / 127.5 - 1, 256


def load_weights(net: torch.nn.Module, uri: str) -> None:
    from pipeline import storage

    with storage.open_uri(uri, "rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    state = ckpt.get("ema") or ckpt.get("model") or ckpt
    net.load_state_dict(state)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--batch-sizes", default="16,32,64,128")
    p.add_argument("--batches", type=int, default=2, help="timed batches per batch size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--n-probes", type=int, default=1)
    p.add_argument("--checkpoint", default=None, help="checkpoint URI with 'ema' or 'model' weights")
    p.add_argument("--nonzero-init", action="store_true",
                   help="fill the zero-initialised layers with N(0, 0.02²): a nonlinear field")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions (default: off)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(args.seed)
    net = build_unet(args.preset, num_classes=None, dropout=0.0)
    if args.checkpoint:
        load_weights(net, args.checkpoint)
    elif args.nonzero_init:
        with torch.no_grad():
            for w in net.parameters():
                if w.dim() > 1 and not w.any():
                    w.normal_(0.0, 0.02)
    net = net.to(device).eval()
    sde = VPSDE()
    score_fn = make_score_fn(net, sde, "eps", noise_label_kind="time")
    params = sum(p.numel() for p in net.parameters())
    x_all, levels = make_data(args.preset, max(sizes) * (args.batches + 1), args.seed)
    opts = dict(probes="rademacher", n_probes=args.n_probes, rtol=args.rtol, atol=args.atol,
                dequantize={"levels": levels})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    weights = "checkpoint" if args.checkpoint else "init, zero layers filled" if args.nonzero_init else "init"
    print(f"# bits/dim throughput: {args.preset} ({params / 1e6:.1f}M params, weights: {weights}), "
          f"VP SDE, dopri5 rtol={args.rtol} "
          f"atol={args.atol}, {args.n_probes} Rademacher probe(s), {levels}-level dequantisation")
    print(f"# device: {name}; torch {torch.__version__}; tf32={args.tf32}; "
          f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    print("| batch | images/s | s/batch | NFE (mean) | bits/dim (mean) | peak GPU mem (GiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for bs in sizes:
        batches = x_all[: bs * (args.batches + 1)].split(bs)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        ode_likelihood(score_fn, sde, batches[0].to(device), generator=gen, **opts)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        nfe, bpd = [], []
        sync(device)
        start = time.perf_counter()
        for xb in batches[1:]:
            res = ode_likelihood(score_fn, sde, xb.to(device), generator=gen, **opts)
            nfe.append(res.nfe)
            bpd.append(res.bpd.mean().item())
        sync(device)
        wall = time.perf_counter() - start
        n = bs * len(nfe)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"| {bs} | {n / wall:.2f} | {wall / len(nfe):.2f} | {np.mean(nfe):.1f} | {np.mean(bpd):.3f} "
              f"| {mem:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
