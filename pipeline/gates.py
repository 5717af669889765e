"""Quality gates: plain verdicts on whether a run trained a good model, each with the rule it was judged
by. They read the run summary (`stages.summary_stage`); `diffusion-pipeline run --require-gates` turns a
failed gate into a failed command, which is how `make demo` holds the embedded run to them.

The rules, and why:
  * FID ≤ 2 × the real-vs-real floor at the samples' own N: FID's upward bias at small N is what the
    floor measures, so the ratio is what says "close to real data".
  * class accuracy of conditional samples at w = 0 ≥ 0.95: the domain classifier recognises what the
    unguided model draws for each label.
  * class accuracy does not fall as w grows (within one sample in a hundred): guidance must sharpen
    the conditional, not blur it.
  * bits/dim through the ODE below log₂ L (a uniform distribution over the L data levels) and not better
    than the continuous ELBO's bound by more than 3 standard errors (the bound must bound it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

FID_FLOOR_RATIO = 2.0
MIN_ACCURACY_W0 = 0.95
ACCURACY_SLACK = 0.01


@dataclass(frozen=True)
class Verdict:
    name: str
    passed: bool
    value: str
    rule: str

    def line(self) -> str:
        return f"**{'PASS' if self.passed else 'FAIL'}** {self.name}: {self.value} (rule: {self.rule})"


def judge(summary: dict[str, Any], *, levels: int | None = None) -> list[Verdict]:
    """The verdicts a run's summary supports (a gate whose numbers are missing is left out)."""
    out: list[Verdict] = []
    ev = summary.get("evaluate") or {}
    fid = ev.get("fid") or {}
    floor = (fid.get("floor") or {}).get("fid")
    if fid.get("fid") is not None and floor:
        out.append(Verdict("FID", fid["fid"] <= FID_FLOOR_RATIO * floor,
                           f"{fid['fid']:.3f} vs floor {floor:.3f} at N={fid.get('n')}",
                           f"FID ≤ {FID_FLOOR_RATIO:g} × real-vs-real floor at the same N"))
    swept = (summary.get("tune") or {}).get("rows") or []
    rows = sorted((r for r in swept if r.get("precision") is not None), key=lambda r: r["w"])
    # At w = 0: the evaluated samples' accuracy when they were drawn at w = 0 (the larger N), else the
    # sweep's w = 0 point.
    w0 = None
    if fid.get("class_accuracy") is not None and (ev.get("samples") or {}).get("guidance_w") == 0:
        w0 = (fid["class_accuracy"], fid.get("n"))
    elif rows and rows[0]["w"] == 0:
        w0 = (rows[0]["precision"], rows[0].get("n"))
    if w0 is not None:
        out.append(Verdict("class accuracy at w = 0", w0[0] >= MIN_ACCURACY_W0, f"{w0[0]:.3f} (N={w0[1]})",
                           f"≥ {MIN_ACCURACY_W0:g}"))
    if len(rows) > 1:
        falls = [(a["w"], b["w"]) for a, b in itertools.pairwise(rows)
                 if b["precision"] < a["precision"] - ACCURACY_SLACK]
        curve = ", ".join(f"w={r['w']:g}: {r['precision']:.3f}" for r in rows)
        out.append(Verdict("class accuracy versus w", not falls, curve,
                           f"never falls by more than {ACCURACY_SLACK:g} as w grows"))
    like = ev.get("likelihood") or {}
    if like.get("bpd_ode") is not None:
        ok = like["bpd_elbo"] + 3 * (like["bpd_elbo_stderr"] + like["bpd_ode_stderr"]) >= like["bpd_ode"]
        rule = "ODE bits/dim ≤ ELBO bits/dim + 3 s.e."
        value = f"ODE {like['bpd_ode']:.4f}, ELBO {like['bpd_elbo']:.4f}"
        if levels:
            uniform = math.log2(levels)
            ok = ok and like["bpd_ode"] < uniform
            rule += f", and < log₂ {levels} = {uniform:.3f} (uniform over the data's levels)"
        out.append(Verdict("bits/dim", ok, value, rule))
    return out


def markdown(verdicts: list[Verdict]) -> str:
    if not verdicts:
        return ""
    return "\n".join(["## Verdicts", "", *(f"- {v.line()}" for v in verdicts), ""])


def as_dicts(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    return [asdict(v) for v in verdicts]


__all__ = ["Verdict", "as_dicts", "judge", "markdown"]
