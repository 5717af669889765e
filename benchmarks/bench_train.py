"""Training throughput (img/s) and MFU of the DSM loop, against diffusers' UNet2DModel, and under Ray Train.

    # the issue's configuration, on one H100:
    .venv/bin/python benchmarks/bench_train.py --device cuda --preset ddpm-cifar10 --batch-size 512
    # a CPU smoke run that exercises every row:
    .venv/bin/python benchmarks/bench_train.py --device cpu --preset tiny-digits --batch-size 8 --steps 5

Rows, all on the same synthetic batches held on the device (the loader is benchmarked separately):
  loop          `Trainer` + `fit` from pipeline/training/loop.py: DSM ε-loss on the VP SDE, Adam, gradient
                clipping, NaN guard, EMA, metrics accumulated on device and read every --report-every steps.
  diffusers     `diffusers.UNet2DModel` in the preset's configuration (channels, levels, blocks, attention
                resolutions), a hand-written step doing the same work (ε-MSE, Adam, clipping, EMA) under
                the same autocast and torch.compile. Skipped, with a note, when diffusers is not installed.
  step A/B      (--compare-step) `Trainer.train_step` (sync-free non-finite skip) against the step as it
                was before (the host reads `finite` and branches), alternating blocks of --steps steps
                on two identical trainers in this process; the median ratio of their rates.
  loop on Ray   the same loop inside one Ray Train worker (`pipeline.training.ray_train.train`, with its
                `ray.train.report` every --report-every steps), measured from the worker's own reports.
Throughput counts steps after --warmup (compilation, autotuning and allocator warm-up excluded).
FLOPs per image (forward + backward) are counted by `torch.utils.flop_counter.FlopCounterMode`; MFU is
FLOPs/image × img/s over --peak-tflops (default on CUDA: 790 TFLOP/s, the H100 bf16 dense-matmul figure
measured for the issue; --measure-peak times a bf16 matmul here instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import torch
from torch import Tensor, nn

H100_BF16_PEAK_TFLOPS = 790.0


class SyntheticBatches:
    """`batches(epoch)` for fit(): `n` fixed random batches on the device, the same every epoch."""

    def __init__(self, shape: tuple[int, ...], num_classes: int | None, *, device: str, n: int = 4,
                 seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = [torch.rand(shape, generator=g).mul(2).sub(1).to(device) for _ in range(n)]
        k = num_classes or 10
        self.y = [torch.randint(0, k, (shape[0],), generator=g).to(device) for _ in range(n)]

    def __call__(self, epoch: int):
        return zip(self.x, self.y, strict=True)


def synthetic_factory(shape_chw: tuple[int, ...], num_classes: int | None):
    """A `batches` factory for ray_train.train (called inside each worker with its device)."""

    def factory(*, rank: int, world_size: int, batch_size: int, seed: int,
                device: torch.device) -> SyntheticBatches:
        return SyntheticBatches((batch_size, *shape_chw), num_classes, device=str(device), seed=seed + rank)

    return factory


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_image(net: nn.Module, shape_chw: tuple[int, ...], num_classes: int | None, device: str,
                    call=None) -> float:
    """Forward + backward FLOPs of one image, counted on a batch of 2 in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, *shape_chw, device=device)
    t = torch.rand(2, device=device)
    labels = torch.randint(0, num_classes, (2,), device=device) if num_classes else None
    call = call or (lambda m, x, t, y: m(x, t, y))
    counter = FlopCounterMode(display=False)
    with counter:
        call(net, x, t, labels).float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def throughput_from_reports(history: list[dict[str, Any]], warmup: int, batch: int) -> float:
    """img/s over the report intervals that start at or after `warmup`: total images over total time."""
    images, seconds, prev = 0.0, 0.0, 0
    for h in sorted(history, key=lambda h: h["step"]):
        if prev >= warmup and "img_per_s" in h and h["img_per_s"] > 0:
            n = (h["step"] - prev) * batch
            images, seconds = images + n, seconds + n / h["img_per_s"]
        prev = h["step"]
    return images / seconds if seconds else float("nan")


def train_config(args: argparse.Namespace):
    from pipeline.config import TrainConfig

    return TrainConfig(preset=args.preset, sde="vp", loss="dsm", loss_kwargs={"parameterization": "eps"},
                       label_dropout=0.1, lr=1e-4, warmup_steps=0, batch_size=args.batch_size,
                       steps=args.warmup + args.steps, precision=args.precision, compile=args.compile,
                       seed=0)


def bench_loop(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.models import preset_config
    from pipeline.training.loop import Trainer, fit

    config = train_config(args)
    cfg = preset_config(args.preset)
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    trainer = Trainer.from_config(config, device=args.device)
    data = SyntheticBatches((args.batch_size, *shape), cfg["num_classes"], device=args.device)
    history: list[dict[str, Any]] = []
    fit(trainer, data, steps=args.warmup, report_every=args.report_every, on_report=history.append)
    sync(args.device)
    t0 = time.perf_counter()
    fit(trainer, data, steps=args.warmup + args.steps, report_every=args.report_every,
        on_report=history.append)
    sync(args.device)
    wall = time.perf_counter() - t0
    flops = flops_per_image(trainer.net, shape, cfg["num_classes"], args.device)
    return {"name": "loop", "img_per_s": args.steps * args.batch_size / wall,
            "img_per_s_reports": throughput_from_reports(history, args.warmup, args.batch_size),
            "params": sum(p.numel() for p in trainer.net.parameters()), "flops_per_image": flops,
            "skipped_steps": trainer.position.skipped_steps}


def diffusers_unet(cfg: dict[str, Any]) -> nn.Module:
    """diffusers.UNet2DModel with the preset's topology (DDPM's CIFAR-10 model for ddpm-cifar10)."""
    from diffusers import UNet2DModel

    from pipeline.models.layers import num_groups

    widths = [cfg["channels"] * m for m in cfg["channel_mult"]]
    resolutions = [cfg["image_size"] // 2**i for i in range(len(widths))]
    attn = [r in cfg["attn_resolutions"] for r in resolutions]
    return UNet2DModel(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        block_out_channels=tuple(widths), layers_per_block=cfg["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=num_groups(cfg["channels"]), dropout=cfg["dropout"],
        attention_head_dim=None if cfg["num_heads"] == 1 else widths[-1] // cfg["num_heads"],
        num_class_embeds=cfg["num_classes"] + 1 if cfg["num_classes"] else None,
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1)


def bench_diffusers(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import diffusers
    except ImportError:
        return {"name": "diffusers", "skipped": "diffusers is not installed (pip install diffusers)"}
    from pipeline.models import preset_config

    cfg = preset_config(args.preset)
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    torch.manual_seed(0)
    net = diffusers_unet(cfg).to(args.device)
    if args.device.startswith("cuda"):
        net = net.to(memory_format=torch.channels_last)
    ema = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if args.precision == "bf16" or (
        args.precision == "auto" and args.device.startswith("cuda")) else None
    model = torch.compile(net) if args.compile else net
    # DDPM's linear β schedule, ᾱ_t; ε-prediction MSE (Ho et al. 2020, eq. 14), as the loop's DSM loss.
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=args.device), 0)
    data = SyntheticBatches((args.batch_size, *shape), cfg["num_classes"], device=args.device)
    g = torch.Generator(device=args.device).manual_seed(0)

    def step(x: Tensor, y: Tensor) -> None:
        t = torch.randint(0, 1000, (x.shape[0],), device=args.device, generator=g)
        eps = torch.randn(x.shape, device=args.device, generator=g)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * eps
        labels = y if cfg["num_classes"] else None
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            out = model(x_t, t, class_labels=labels).sample
        loss = (out.float() - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.999)

    def run(n: int) -> None:
        done = 0
        while done < n:
            for x, y in data(0):
                step(x, y)
                done += 1
                if done == n:
                    return

    run(args.warmup)
    sync(args.device)
    t0 = time.perf_counter()
    run(args.steps)
    sync(args.device)
    wall = time.perf_counter() - t0
    flops = flops_per_image(net, shape, cfg["num_classes"], args.device,
                            call=lambda m, x, t, y: m(x, (t * 999).long(), class_labels=y).sample)
    return {"name": "diffusers", "img_per_s": args.steps * args.batch_size / wall,
            "params": sum(p.numel() for p in net.parameters()), "flops_per_image": flops,
            "version": diffusers.__version__}


def bench_ray(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.models import preset_config
    from pipeline.training.ray_train import train

    cfg = preset_config(args.preset)
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    config = train_config(args)
    out = tempfile.mkdtemp(prefix="bench-train-ray-")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    from pipeline.config import RunOptions

    options = RunOptions(workers=1, gpus_per_worker=1 if args.device.startswith("cuda") else 0,
                         cpus_per_worker=args.cpus, report_every=args.report_every,
                         checkpoint_every=config.steps,  # one checkpoint, after the last report
                         keep_last=1, max_failures=0, progress=False)
    res = train(config, data=None, out=out, options=options,
                batches=synthetic_factory(shape, cfg["num_classes"]))
    return {"name": "loop on Ray (1 worker)",
            "img_per_s": throughput_from_reports(res.history, args.warmup, args.batch_size),
            "wall_s_including_startup": time.perf_counter() - t0, "out": out}


def bench_ray_pairs(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Train's overhead at one worker, robust to a shared machine: --ray-pairs rounds of (bare loop,
    loop on Ray), back to back on the same cluster, each ratio from the loops' own reports over the same
    steps; the median of the per-round overheads."""
    import statistics

    bench_ray(argparse.Namespace(**{**vars(args), "steps": args.report_every}))  # start Ray, warm caches
    rounds = []
    for _ in range(args.ray_pairs):
        bare, ray = bench_loop(args)["img_per_s_reports"], bench_ray(args)["img_per_s"]
        rounds.append({"loop": bare, "ray": ray, "overhead": 1 - ray / bare})
        print(json.dumps(rounds[-1]), flush=True)
    return {"name": f"loop on Ray (1 worker), median of {args.ray_pairs} rounds",
            "img_per_s": statistics.median(r["ray"] for r in rounds),
            "img_per_s_loop": statistics.median(r["loop"] for r in rounds),
            "overhead": statistics.median(r["overhead"] for r in rounds), "rounds": rounds}


def host_decided_step(t, x: Tensor, labels: Tensor | None) -> None:
    """`Trainer.train_step` before the sync-free skip (one host read of `finite` per step)."""
    import math

    x = x.to(t.device, non_blocking=True)
    labels = labels.to(t.device, non_blocking=True) if t.null_label is not None else None
    for group in t.optimizer.param_groups:
        group["lr"] = t.lr_at(t.position.step)
    per_sample, _ = t.loss_fn.forward_with_noise(t.model, x, labels, generator=t.generator)
    loss = per_sample.mean()
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = t.config.grad_clip if t.config.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(t.net.parameters(), clip)
    if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
        t.optimizer.step()
        t.ema.update(t.net, batch_size=t.config.batch_size)
        a = t._accum
        a.loss_sum += per_sample.detach().double().sum()
        a.grad_norm_sum += grad_norm.detach().double()
    else:
        t.optimizer.zero_grad(set_to_none=True)
        t.position.skipped_steps += 1
    t.position.step += 1


def bench_step_ab(args: argparse.Namespace, repeats: int = 5) -> dict[str, Any]:
    """img/s of the sync-free step and of the host-decided one, alternating blocks in one process."""
    import statistics

    from pipeline.models import preset_config
    from pipeline.training.loop import Trainer

    cfg = preset_config(args.preset)
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    config = train_config(args)
    data = SyntheticBatches((args.batch_size, *shape), cfg["num_classes"], device=args.device)
    pair = {"sync-free": (Trainer(config, device=args.device), Trainer.train_step),
            "host-decided": (Trainer(config, device=args.device), host_decided_step)}
    pair["sync-free"][0].sync_free_skip = True  # the on-device skip even on a CPU (where it is off)
    rates: dict[str, list[float]] = {k: [] for k in pair}
    for r in range(repeats + 1):
        for name, (trainer, step) in (pair.items() if r % 2 else reversed(pair.items())):
            sync(args.device)
            t0 = time.perf_counter()
            for i in range(args.warmup if r == 0 else args.steps):
                step(trainer, data.x[i % 4], data.y[i % 4])
            sync(args.device)
            if r > 0:  # round 0 warms both up
                rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
    ratios = [a / b for a, b in zip(rates["sync-free"], rates["host-decided"], strict=True)]
    return {"name": "step A/B", "img_per_s": statistics.median(rates["sync-free"]),
            "img_per_s_host_decided": statistics.median(rates["host-decided"]),
            "sync_free_over_host_decided": statistics.median(ratios), "repeats": repeats}


def measure_peak_tflops(device: str, n: int = 8192, reps: int = 20) -> float:
    """Dense bf16 matmul rate on this device (TFLOP/s)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="ddpm-cifar10")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=200, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=None, help="default: 50 on CUDA, 2 on CPU")
    p.add_argument("--report-every", type=int, default=None,
                   help="steps between reports (default: 50 on CUDA, --warmup on CPU); divide --warmup")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile both networks (default: on CUDA only)")
    p.add_argument("--cpus", type=float, default=None,
                   help="CPU threads for every row (default: 1 on CPU, 8 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: 790 on CUDA)")
    p.add_argument("--measure-peak", action="store_true", help="time a bf16 matmul for the MFU denominator")
    p.add_argument("--skip", nargs="*", default=[], choices=("loop", "diffusers", "ray"))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--ray-pairs", type=int, default=1,
                   help="> 1: the Ray row alternates with the bare loop this many rounds (median overhead)")
    p.add_argument("--compare-step", action="store_true",
                   help="only the step A/B: sync-free train_step against the host-decided one")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    args.warmup = args.warmup if args.warmup is not None else (50 if cuda else 2)
    args.report_every = args.report_every or (50 if cuda else max(1, args.warmup))
    args.compile = cuda if args.compile is None else args.compile
    args.cpus = args.cpus or (8.0 if cuda else 1.0)
    if args.steps < 1 or args.warmup < 0 or args.report_every < 1:
        raise SystemExit("--steps and --report-every must be >= 1, --warmup >= 0")
    torch.set_num_threads(max(1, int(args.cpus)))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    peak = args.peak_tflops
    if args.measure_peak:
        peak = measure_peak_tflops(args.device)
    elif peak is None and cuda:
        peak = H100_BF16_PEAK_TFLOPS
    rows = []
    benches = (("loop", bench_loop), ("diffusers", bench_diffusers),
               ("ray", bench_ray_pairs if args.ray_pairs > 1 else bench_ray))
    for name, fn in ((("step", bench_step_ab),) if args.compare_step else benches):
        if name in args.skip:
            continue
        row = fn(args)
        if "flops_per_image" in row and peak:
            row["mfu"] = row["flops_per_image"] * row["img_per_s"] / (peak * 1e12)
        rows.append(row)
        print(json.dumps(row), flush=True)

    by = {r["name"]: r for r in rows}
    summary: dict[str, Any] = {}
    if "loop" in by and "diffusers" in by and "img_per_s" in by["diffusers"]:
        summary["loop_over_diffusers"] = by["loop"]["img_per_s"] / by["diffusers"]["img_per_s"]
    ray_row = next((r for r in rows if r["name"].startswith("loop on Ray")), None)
    if ray_row is not None and "overhead" in ray_row:
        summary["ray_overhead"] = ray_row["overhead"]
    elif "loop" in by and ray_row is not None:
        # Both from the loop's own reports over the same steps, so report costs are counted alike.
        summary["ray_overhead"] = 1 - ray_row["img_per_s"] / by["loop"]["img_per_s_reports"]
    env = {"command": " ".join([sys.executable, *sys.argv]), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
           "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
           "precision": args.precision, "compile": args.compile, "peak_tflops": peak}
    print(_table(rows, summary, env))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "summary": summary}, f, indent=2)
    return 0


def _table(rows: list[dict[str, Any]], summary: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [f"\n{env['preset']}, batch {env['batch_size']}, {env['precision']}, compile={env['compile']}, "
             f"{env['device']}, torch {env['torch']}",
             "| row | img/s | params | GFLOP/img (fwd+bwd) | MFU |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | |")
            continue
        gf = f"{r['flops_per_image'] / 1e9:.2f}" if "flops_per_image" in r else ""
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        params = f"{r['params'] / 1e6:.2f}M" if "params" in r else ""
        lines.append(f"| {r['name']} | {r['img_per_s']:,.0f} | {params} | {gf} | {mfu} |")
    for r in rows:
        if "sync_free_over_host_decided" in r:
            lines.append(f"host-decided step: {r['img_per_s_host_decided']:,.0f} img/s; sync-free / "
                         f"host-decided = {r['sync_free_over_host_decided']:.3f} "
                         f"(median of {r['repeats']} alternating blocks)")
    for k, v in summary.items():
        lines.append(f"{k}: {100 * v:.1f}%" if k == "ray_overhead" else f"{k}: {v:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
