"""Sample error against NFE for every sampler, on the Gaussian-mixture ground truth with the exact score.

    .venv/bin/python benchmarks/bench_solvers.py                       # VP and VE, 20,000 samples
    .venv/bin/python benchmarks/bench_solvers.py --sdes vp --n 5000 --plot /tmp/solvers.png

The measure is that of tests/test_samplers.py (and tests/test_multistep.py): the statistics the sampler
tests check, summed into one number, |Δ mean|₁ + |Δ cov|₁ + |Δ within-component spread| +
|Δ component fractions|₁ against the exact mixture. Every run starts from the same prior draw (seed 0),
so deterministic samplers differ only by their discretisation. The "floor" row is the same measure for
n exact samples of the mixture (the Monte-Carlo error of n samples). Prints one markdown table per
process (rows: sampler, columns: target NFE; each cell "error (NFE used)") and saves a log-log plot.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusion.samplers import sample
from pipeline.diffusion.sde import VESDE, VPSDE
from tests.test_samplers import MIX, _assign, _spread

F64 = torch.float64
TARGETS = (10, 20, 40, 80, 160)

# sampler label -> (method, options, steps for a target NFE): NFE = steps (+1 for a final Tweedie step).
SAMPLERS = {
    "ancestral": ("ancestral", {}, lambda n: n - 1),
    "ddim": ("ddim", {}, lambda n: n - 1),
    "euler_maruyama": ("euler_maruyama", {}, lambda n: n - 1),
    "pc (1 corrector)": ("pc", {}, lambda n: n // 2),
    "ode rk4": ("ode", {"solver": "rk4"}, lambda n: n // 4),
    "heun (EDM)": ("heun", {}, lambda n: (n + 1) // 2),
    "heun + churn 10": ("heun", {"S_churn": 10.0}, lambda n: (n + 1) // 2),
    "annealed_langevin (5/level)": ("annealed_langevin", {"n_steps_each": 5, "step_lr": 1e-4},
                                    lambda n: (n - 1) // 5),
    "dpmpp_2m": ("dpmpp_2m", {}, lambda n: n),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, lambda n: n),
    "unipc (order 3)": ("unipc", {}, lambda n: n),
    "unipc (order 2)": ("unipc", {"order": 2}, lambda n: n),
}


def moment_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    C = torch.cov(x.T)
    p = torch.bincount(_assign(x), minlength=MIX.K).double() / x.shape[0]
    p_ref = torch.bincount(_assign(ref), minlength=MIX.K).double() / ref.shape[0]
    return float((x.mean(0) - MIX.mean()).abs().sum() + (C - MIX.cov()).abs().sum()
                 + (_spread(x).mean() - _spread(ref).mean()).abs() + (p - p_ref).abs().sum())


def run(sde_name: str, n: int) -> dict[str, list[tuple[float, int] | None]]:
    sde = VPSDE() if sde_name == "vp" else VESDE(sigma_min=0.01, sigma_max=20.0)
    ref = MIX.sample(400_000, generator=torch.Generator().manual_seed(12345)).double()
    rows: dict[str, list[tuple[float, int] | None]] = {}
    floor = moment_error(MIX.sample(n, generator=torch.Generator().manual_seed(1)).double(), ref)
    rows["floor (n exact samples)"] = [(floor, 0)] * len(TARGETS)
    for label, (method, opts, steps_for) in SAMPLERS.items():
        if method == "annealed_langevin" and sde_name != "ve":
            continue
        cells: list[tuple[float, int] | None] = []
        for target in TARGETS:
            steps = steps_for(target)
            # The 𝑠-step VP chain of pc needs β_i = β(t)/s < 1: at least 20 steps for β_max = 20.
            if steps < 1 or (method == "pc" and sde_name == "vp" and steps < 21):
                cells.append(None)
                continue
            x, nfe = sample(method, MIX.score_fn(sde), sde, (n, 2), steps=steps, seed=0, dtype=F64, **opts)
            cells.append((moment_error(x.double(), ref), nfe))
        rows[label] = cells
    return rows


DETERMINISTIC = ("ddim", "ode rk4", "heun (EDM)", "dpmpp_2m", "unipc (order 3)", "unipc (order 2)")


def run_ode_map(sde_name: str, n: int) -> dict[str, list[tuple[float, int] | None]]:
    """Mean ‖x − x*‖ to the probability-flow ODE solution x* from the same x_T (dopri5, rtol 1e-9):
    the discretisation error alone, with no Monte-Carlo floor (DDIM without its final Tweedie step)."""
    from pipeline.diffusion.samplers import sample_ode

    sde = VPSDE() if sde_name == "vp" else VESDE(sigma_min=0.01, sigma_max=20.0)
    x_T = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(0)).to(F64)
    exact = sample_ode(MIX.score_fn(sde), sde, x_T, steps=1, rtol=1e-9, atol=1e-9)
    rows: dict[str, list[tuple[float, int] | None]] = {}
    for label in DETERMINISTIC:
        method, opts, steps_for = SAMPLERS[label]
        opts = {**opts, "denoise": False} if method == "ddim" else opts
        cells: list[tuple[float, int] | None] = []
        for target in TARGETS:
            x, nfe = sample(method, MIX.score_fn(sde), sde, (n, 2), steps=steps_for(target), seed=0,
                            dtype=F64, **opts)
            cells.append((float((x.double() - exact).norm(dim=1).mean()), nfe))
        rows[label] = cells
    return rows


def table(sde_name: str, rows: dict[str, list[tuple[float, int] | None]], what: str = "moment error") -> str:
    head = "| sampler | " + " | ".join(f"NFE ≈ {t}" for t in TARGETS) + " |"
    lines = [head, "|---|" + "---:|" * len(TARGETS)]
    for label, cells in rows.items():
        txt = ["–" if c is None else (f"{c[0]:.3g}" if c[1] == 0 else f"{c[0]:.3g} ({c[1]})") for c in cells]
        lines.append(f"| {label} | " + " | ".join(txt) + " |")
    return f"**{sde_name.upper()}, {what}**\n\n" + "\n".join(lines)


Rows = dict[str, list[tuple[float, int] | None]]


def plot(results: dict[str, tuple[Rows, Rows]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(SAMPLERS)
    colors = {lab: plt.get_cmap("tab20")(k % 20) for k, lab in enumerate(labels)}
    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 9), squeeze=False)
    for col, (sde_name, both) in enumerate(results.items()):
        for row, (rows, what) in enumerate(zip(both, ("moment error (sum of |Δ|)", "mean ‖x − x*_ODE‖"),
                                               strict=True)):
            ax = axes[row][col]
            for label, cells in rows.items():
                pts = [c for c in cells if c is not None]
                if label.startswith("floor"):
                    ax.axhline(pts[0][0], color="gray", ls=":", label=label)
                    continue
                style = "-o" if label.startswith(("dpmpp", "unipc")) else "--."
                ax.loglog([p[1] for p in pts], [p[0] for p in pts], style, label=label, ms=4,
                          color=colors[label])
            ax.set_xlabel("NFE")
            ax.set_ylabel(what)
            ax.set_title(f"{sde_name.upper()}: Gaussian mixture, exact score")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdes", default="vp,ve")
    ap.add_argument("--n", type=int, default=20_000, help="samples per run")
    ap.add_argument("--plot", default=str(Path(__file__).with_name("bench_solvers.png")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.sdes.split(","):
        start = time.perf_counter()
        results[name] = (run(name, args.n), run_ode_map(name, args.n))
        print(table(name, results[name][0]))
        print()
        print(table(name, results[name][1], "mean distance to the exact ODE map"))
        print(f"\n({time.perf_counter() - start:.1f} s, n = {args.n})\n")
    plot(results, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
