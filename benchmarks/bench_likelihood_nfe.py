"""NFE for the same accuracy: PF-ODE log-likelihood against the exact density of a Gaussian mixture,
score_sde's algorithm against `ode_likelihood`, side by side in one run.

    .venv/bin/python benchmarks/bench_likelihood_nfe.py [--score-sde /path/to/score_sde] [--batch 32]

score_sde (yang-song/score_sde, `likelihood.py::get_likelihood_fn`) is JAX/flax code. It is not
imported here (JAX is not a dependency of this project): its algorithm is reproduced in this script
only, exactly as the file does it — the state [x, Δlogp] flattened into one float64 vector, scipy's
`solve_ivp(method="RK45")` from eps to T with its defaults rtol = atol = 1e-5, eps = 1e-5, one call of
the drift and one of the divergence per `ode_func` evaluation, NFE = `solution.nfev`. With
`--score-sde` (a checkout or a bare git directory, e.g. what the `fetch` tool brings) the script reads
that likelihood.py and checks those defaults are still what it says before measuring.

Both sides use the exact trace (a Hutchinson probe's variance would hide the solver's error) and the
mixture's closed-form score, so the only error is the solver's. Accuracy is the largest error over the
samples of all --batches batches (NFE is summed over them), in bits/dim, against
log p_eps(x) − log p_T(z) + log π(z), exact for any latent z the solve reaches.
For `ode_likelihood` every (variable, method, tolerance) is measured; a row "matches" score_sde when
its error is no larger; the cheapest matching row gives the ratio.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusion.likelihood import VARIABLES, Integration, exact_divergence, ode_likelihood
from pipeline.diffusion.sde import SDE, VESDE, VPSDE, SubVPSDE
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_max=200.0)}


def mixture(d: int = 8, seed: int = 0) -> GaussianMixture:
    """The mixture of tests/test_likelihood.py: 3 components, full covariances, d = 8."""
    g = torch.Generator().manual_seed(seed)
    means = 0.2 * torch.randn(3, d, generator=g, dtype=F64)
    A = 0.4 * torch.randn(3, d, d, generator=g, dtype=F64) / math.sqrt(d)
    covs = A @ A.transpose(1, 2) + 0.05 * torch.eye(d, dtype=F64)
    return GaussianMixture(torch.tensor([0.2, 0.3, 0.5], dtype=F64), means, covs)


def score_sde_defaults(path: str | None) -> str:
    """Check score_sde's likelihood.py (file, checkout or git dir) still has the defaults used here."""
    if path is None:
        return "not checked (no --score-sde given)"
    p = Path(path)
    if p.is_file():
        text, where = p.read_text(), str(p)
    elif (p / "likelihood.py").is_file():
        text, where = (p / "likelihood.py").read_text(), str(p / "likelihood.py")
    else:
        git = ["git", "--git-dir", str(p) if not (p / ".git").exists() else str(p / ".git")]
        text = subprocess.run([*git, "show", "HEAD:likelihood.py"], capture_output=True, text=True,
                              check=True).stdout
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        where = f"score_sde@{commit[:12]}:likelihood.py"
    sig = re.search(r"def get_likelihood_fn\((.*?)\):", text, re.S)
    params = re.sub(r"\s", "", sig.group(1)) if sig else ""
    missing = [w for w in ("rtol=1e-5", "atol=1e-5", "method='RK45'", "eps=1e-5") if w not in params]
    missing += [w for w in ("integrate.solve_ivp", "solution.nfev") if w not in text]
    if missing:
        raise SystemExit(f"{where}: no longer matches the reproduced algorithm (missing {missing})")
    return f"checked against {where}"


def score_sde_rk45(score_fn, sde: SDE, x: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """score_sde's likelihood_fn with the exact trace: (log p, z, nfev). Reproduced, not imported."""
    from scipy import integrate

    shape, B = x.shape, x.shape[0]
    ode = sde.reverse(score_fn, probability_flow=True)

    def ode_func(t: float, state: np.ndarray) -> np.ndarray:
        sample = torch.from_numpy(state[:-B]).reshape(shape)
        vec_t = torch.full((B,), t, dtype=F64)
        with torch.enable_grad():
            xt = sample.clone().requires_grad_(True)
            drift, _ = ode.sde(xt, vec_t)
            div = exact_divergence(drift, xt)
        return np.concatenate([drift.detach().reshape(-1).numpy(), div.detach().numpy()])

    init = np.concatenate([x.reshape(-1).numpy(), np.zeros(B)])
    sol = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    zp = sol.y[:, -1]
    z = torch.from_numpy(zp[:-B]).reshape(shape)
    delta = torch.from_numpy(zp[-B:])
    return sde.prior_logp(z) + delta, z, int(sol.nfev)


def error_bpd(gm: GaussianMixture, sde: SDE, x: torch.Tensor, logp: torch.Tensor, z: torch.Tensor,
              eps: float) -> float:
    B, D = x.shape[0], x[0].numel()
    full = lambda t: torch.full((B,), t, dtype=F64)  # noqa: E731
    exact = gm.log_prob_t(x, full(eps), sde) - gm.log_prob_t(z, full(sde.T), sde) + sde.prior_logp(z)
    return float(((logp - exact).abs() / (D * math.log(2))).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sdes", nargs="+", default=["vp", "subvp", "ve"], choices=sorted(SDES))
    p.add_argument("--score-sde", default=None, help="score_sde checkout/git dir to check the defaults in")
    p.add_argument("--batches", type=int, default=3, help="independent batches (seeds 1..K); NFE summed, "
                   "error the largest over all samples")
    p.add_argument("--tols", default="5e-6,1e-5,2e-5,4e-5,1e-4,3e-4,1e-3,1e-2")
    p.add_argument("--methods", default="dopri5,dopri8")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    checked = score_sde_defaults(args.score_sde)
    gm, eps = mixture(), 1e-5
    xs = [gm.sample(args.batch, generator=torch.Generator().manual_seed(k + 1)).double()
          for k in range(args.batches)]
    tols = [float(t) for t in args.tols.split(",")]
    print(f"mixture d=8, {args.batches} batches of {args.batch}, exact trace, eps={eps}; "
          f"score_sde defaults: {checked}")
    print(f"machine: {platform.machine()}, torch {torch.__version__}\n")
    print("| SDE | method | NFE | max error (bits/dim) | matches score_sde | × fewer NFE |")
    print("|---|---|---:|---:|:---:|---:|")
    summary = {}
    for name in args.sdes:
        sde = SDES[name]()
        sf = gm.score_fn(sde)
        ref_nfe, ref_err = 0, 0.0
        for x in xs:
            logp, z, n = score_sde_rk45(sf, sde, x, eps=eps)
            ref_nfe, ref_err = ref_nfe + n, max(ref_err, error_bpd(gm, sde, x, logp, z, eps))
        ref_row = "score_sde: scipy RK45 in t, rtol=atol=1e-5 (reproduced)"
        print(f"| {name} | {ref_row} | {ref_nfe} | {ref_err:.2e} | – | 1.00 |")
        rows = []
        for variable in VARIABLES:
            for method in args.methods.split(","):
                for tol in tols:
                    nfe, err = 0, 0.0
                    for x in xs:
                        r = ode_likelihood(sf, sde, x, trace="exact", rtol=tol, atol=tol, eps=eps,
                                           integration=Integration(method=method, variable=variable))
                        nfe, err = nfe + r.nfe, max(err, error_bpd(gm, sde, x, r.logp, r.latent, eps))
                    rows.append((variable, method, tol, nfe, err))
        best = min((r for r in rows if r[4] <= ref_err), key=lambda r: r[3], default=None)
        for variable, method, tol, nfe, err in rows:
            ok = err <= ref_err
            mark = " **(best)**" if best is not None and (variable, method, tol) == best[:3] else ""
            row = f"ode_likelihood variable={variable!r}, {method}, rtol=atol={tol:g}{mark}"
            print(f"| {name} | {row} | {nfe} | {err:.2e} | {'yes' if ok else 'no'} | {ref_nfe / nfe:.2f} |")
        summary[name] = (ref_nfe, best)
    print()
    for name, (ref_nfe, best) in summary.items():
        if best is None:
            print(f"{name}: no ode_likelihood row reached score_sde's accuracy")
        else:
            print(f"{name}: score_sde {ref_nfe} NFE; ode_likelihood variable={best[0]!r} {best[1]} "
                  f"rtol=atol={best[2]:g}: {best[3]} NFE for error {best[4]:.2e} bits/dim "
                  f"→ {ref_nfe / best[3]:.2f}× fewer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
