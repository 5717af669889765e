"""`diffusion-pipeline demo`: the embedded-default job, runnable anywhere in a few CPU minutes.

Trains a class-conditional U-Net on scikit-learn's 1,797 handwritten 8×8 digits (17 grey levels,
shipped inside scikit-learn, so nothing is downloaded), then samples one row per digit with
classifier-free guidance and writes a grid PNG, the metrics and the EMA weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import TrainConfig
from .data.sources import digits_source
from .diffusion.guidance import cfg_score_fn
from .diffusion.samplers import sample
from .evaluation.grid import grid_png
from .training.loop import InMemoryBatches, Trainer, fit

DIGIT_LEVELS = 17  # load_digits stores intensities 0..16


def load_digits_tensor() -> tuple[Tensor, Tensor]:
    """The digits as x ∈ [-1, 1] of shape [1797, 1, 8, 8] (x = 2v/16 − 1) and labels [1797]."""
    src = digits_source()
    v = torch.as_tensor(src.images, dtype=torch.float32).permute(0, 3, 1, 2)  # uint8 HWC → CHW
    return 2 * v / (src.levels - 1) - 1, torch.as_tensor(src.labels, dtype=torch.long)


def demo_config(steps: int, seed: int) -> TrainConfig:
    # EDM's preconditioning and loss train fastest on small data; the VP process only defines how
    # the network's denoiser is read as a score for the samplers and likelihoods.
    return TrainConfig(preset="tiny-digits", sde="vp", loss="edm", loss_kwargs={"sigma_data": 0.5},
                       label_dropout=0.1, lr=2e-3, warmup_steps=200, batch_size=128, steps=steps,
                       ema_halflife_kimg=20.0, ema_rampup_ratio=0.05, seed=seed)


@torch.no_grad()
def sample_digit_grid(trainer: Trainer, *, per_class: int, guidance: float, steps: int, seed: int,
                      method: str = "heun") -> tuple[Tensor, int]:
    """per_class samples of each digit 0..9 (one row each) from the EMA network, with CFG weight w."""
    net = trainer.ema.module.eval()
    labels = torch.arange(10).repeat_interleave(per_class)
    score_fn = cfg_score_fn(net, trainer.sde, "edm", labels, trainer.null_label, guidance,
                            sigma_data=trainer.config.loss_kwargs.get("sigma_data", 0.5))
    return sample(method, score_fn, trainer.sde, (labels.shape[0], 1, 8, 8), steps=steps, seed=seed)


def run_demo(out: str | Path, *, steps: int = 3000, seed: int = 0, guidance: float = 1.0,
             sample_steps: int = 32, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, labels = load_digits_tensor()
    config = demo_config(steps, seed)
    trainer = Trainer.from_config(config)
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    final = fit(trainer, InMemoryBatches(x, labels, config.batch_size, seed=seed), steps=steps,
                report_every=max(steps // 20, 1), on_report=history.append, progress=progress)
    train_s = time.perf_counter() - t0

    samples, nfe = sample_digit_grid(trainer, per_class=10, guidance=guidance, steps=sample_steps, seed=seed)
    (out / "samples.png").write_bytes(grid_png(samples, nrow=10, levels=DIGIT_LEVELS, scale=4))
    torch.save({"ema": trainer.ema.state_dict(), "config": config.to_dict()}, out / "ema.pt")
    metrics = {
        "train": {"steps": steps, "seconds": round(train_s, 1), "final": final, "history": history},
        "sampling": {"method": "heun", "steps": sample_steps, "nfe_per_sample": nfe, "guidance_w": guidance,
                     "seed": seed},
        "config": config.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"out": str(out), "grid": str(out / "samples.png"), "metrics": str(out / "metrics.json"),
            "loss_first": history[0]["loss"] if history else None, "loss_last": final["loss"],
            "train_seconds": train_s}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train on the embedded digits and write a sample grid (CPU, minutes)")
    p.add_argument("--out", default="artifacts/demo", help="output folder (default: artifacts/demo)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (default: 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight w ≥ 0")
    p.add_argument("--sample-steps", type=int, default=32, help="Heun steps for the sample grid")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    res = run_demo(args.out, steps=args.steps, seed=args.seed, guidance=args.guidance,
                   sample_steps=args.sample_steps)
    print(f"trained {args.steps} steps in {res['train_seconds']:.0f} s "
          f"(loss {res['loss_first']:.4f} → {res['loss_last']:.4f})")
    print(f"sample grid: {res['grid']}\nmetrics:     {res['metrics']}")
    return 0
