"""Every GPU figure benchmarks/RESULTS.md waits for, in one run: one JSON file and one markdown table.

    python benchmarks/gpu_suite.py --out /tmp/gpu-suite [--wheels wheels/]    # one H100/H200, ≤ 10 min
    python benchmarks/gpu_suite.py --tiny --out /tmp/gpu-suite-tiny           # CPU, tiny sizes, ~minutes

Steps (each a subprocess of an existing benchmark script, with its own time limit; a step that fails
or runs out of time is recorded as such and the suite goes on):
  train-compile   `ddpm-cifar10` training img/s and MFU, bf16, torch.compile, beside diffusers' UNet2DModel
  train-eager     the same without compile
  ray             Ray Train at one worker against the bare loop (same threads, same report cadence)
  step            sync-free `train_step` against the host-decided one (the step A/B)
  fid-sampling    Inception feature img/s and sampling img-evals/s (DDIM)
  bpd             PF-ODE bits/dim img/s (`ode_likelihood`, one Rademacher probe)
--wheels DIR installs the wheels found there first (`pip install --no-deps --no-index`), e.g. diffusers
and its small dependencies for the UNet2DModel row, so the run needs no network; without them that row
says diffusers is not installed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def steps(tiny: bool, out: Path) -> list[tuple[str, list[str], int]]:
    """(name, argv, time limit in s) of each step; --tiny shrinks everything to CPU smoke sizes."""
    py = [sys.executable]
    if tiny:
        train = ["--device", "cpu", "--preset", "tiny-digits", "--batch-size", "8", "--steps", "4",
                 "--warmup", "2", "--report-every", "2", "--cpus", "1"]
        return [
            ("train-compile", [*py, str(HERE / "bench_train.py"), *train, "--compile", "--skip", "ray",
                               "--json", str(out / "train-compile.json")], 300),
            ("train-eager", [*py, str(HERE / "bench_train.py"), *train, "--no-compile", "--skip", "ray",
                             "--json", str(out / "train-eager.json")], 120),
            ("ray", [*py, str(HERE / "bench_train.py"), *train, "--no-compile", "--skip", "diffusers",
                     "--json", str(out / "ray.json")], 300),
            ("step", [*py, str(HERE / "bench_train.py"), *train, "--compare-step",
                      "--json", str(out / "step.json")], 120),
            ("fid-sampling", [*py, str(HERE / "bench_fid.py"), "--device", "cpu", "--n", "4", "--batch-size",
                              "2", "--steps", "2", "--inception-n", "2", "--inception-batch", "2",
                              "--precision", "fp32"], 300),
            ("bpd", [*py, str(HERE / "bench_bpd.py"), "--preset", "tiny-digits", "--batch-sizes", "2",
                     "--device", "cpu", "--batches", "1", "--threads", "1", "--rtol", "1e-3",
                     "--atol", "1e-3"], 120),
        ]
    train = ["--device", "cuda", "--preset", "ddpm-cifar10", "--batch-size", "512", "--precision", "bf16"]
    return [
        ("train-compile", [*py, str(HERE / "bench_train.py"), *train, "--compile", "--steps", "100",
                           "--warmup", "30", "--report-every", "10", "--skip", "ray",
                           "--json", str(out / "train-compile.json")], 220),
        ("train-eager", [*py, str(HERE / "bench_train.py"), *train, "--no-compile", "--steps", "50",
                         "--warmup", "10", "--report-every", "10", "--skip", "ray",
                         "--json", str(out / "train-eager.json")], 70),
        ("ray", [*py, str(HERE / "bench_train.py"), *train, "--no-compile", "--steps", "60", "--warmup", "20",
                 "--report-every", "20", "--skip", "diffusers", "--json", str(out / "ray.json")], 100),
        ("step", [*py, str(HERE / "bench_train.py"), *train, "--no-compile", "--steps", "20", "--warmup", "5",
                  "--compare-step", "--json", str(out / "step.json")], 50),
        ("fid-sampling", [*py, str(HERE / "bench_fid.py"), "--device", "cuda", "--n", "2048", "--steps", "50",
                          "--inception-n", "5000"], 100),
        ("bpd", [*py, str(HERE / "bench_bpd.py"), "--preset", "ddpm-cifar10", "--batch-sizes", "64,128",
                 "--device", "cuda", "--batches", "1", "--nonzero-init"], 60),
    ]


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables in a benchmark's output, as lists of {column: cell}."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1]):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(head, (c.strip() for c in row.strip("|").split("|")), strict=False)))
            tables.append(rows)
    return tables


def install_wheels(folder: str) -> str:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        return f"no wheels in {folder}"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *wheels],
                       capture_output=True, text=True)
    return f"installed {len(wheels)} wheels" if r.returncode == 0 else f"pip failed: {r.stderr[-500:]}"


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        return f"{platform.machine()} CPU ×{os.cpu_count()}, torch {torch.__version__}"
    except ImportError:
        return platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-suite", help="folder for suite.json, suite.md and step outputs")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: proves the suite runs end to end")
    p.add_argument("--wheels", default=None, help="folder of extra wheels to install first (diffusers)")
    p.add_argument("--only", nargs="*", default=None, help="run only these steps")
    p.add_argument("--budget", type=float, default=600.0, help="seconds for the whole suite")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    suite = {"machine": machine(), "tiny": args.tiny, "command": " ".join([sys.executable, *sys.argv]),
             "wheels": install_wheels(args.wheels) if args.wheels else "none given", "steps": {}}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    for name, cmd, limit in steps(args.tiny, out):
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - started)
        if left < 10:
            suite["steps"][name] = {"status": "not run: suite budget spent"}
            continue
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=min(limit, left), env=env,
                               cwd=ROOT)
            status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
            text = r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timed out after {min(limit, left):.0f} s"
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        (out / f"{name}.log").write_text(text)
        entry = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                 "command": " ".join(cmd), "tables": markdown_tables(text)}
        js = out / f"{name}.json"
        if js.exists():
            entry["results"] = json.loads(js.read_text())
        if status != "ok":
            entry["log_tail"] = text[-2000:]
        suite["steps"][name] = entry
        print(f"{name}: {status} in {entry['seconds']} s", flush=True)
    suite["seconds"] = round(time.perf_counter() - started, 1)
    (out / "suite.json").write_text(json.dumps(suite, indent=2))
    md = [f"# GPU suite{' (tiny, CPU)' if args.tiny else ''}", "", f"machine: {suite['machine']}  ",
          f"command: `{suite['command']}`  ", f"wheels: {suite['wheels']}; total {suite['seconds']} s", ""]
    for name, entry in suite["steps"].items():
        took = f" ({entry['seconds']} s)" if "seconds" in entry else ""
        md += [f"## {name}: {entry['status']}{took}", ""]
        for table in entry.get("tables", []):
            if table:
                cols = list(table[0])
                md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                md += ["| " + " | ".join(row.get(c, "") for c in cols) + " |" for row in table]
                md.append("")
        summary = entry.get("results", {}).get("summary")
        if summary:
            md += [f"summary: `{json.dumps(summary)}`", ""]
        for row in entry.get("results", {}).get("rows", []):
            if "sync_free_over_host_decided" in row:
                md += [f"sync-free / host-decided step: {row['sync_free_over_host_decided']:.3f}", ""]
    (out / "suite.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")
    return 0 if all(e["status"] == "ok" for e in suite["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
