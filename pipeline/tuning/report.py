"""Search reports: a table of trials, the best configuration, and PNG plots (FID versus w; the
FID-versus-bits/dim Pareto front), written next to the search on storage."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .. import storage
from ..plots import png, pyplot

SCHEDULE_COLUMNS = (
    "trial_id",
    "status",
    "sde",
    "weighting",
    "params",
    "step",
    "heldout_loss",
    "fid",
    "precision",
    "bpd",
    "loss",
    "attempts",
)
GUIDANCE_COLUMNS = ("sampler", "steps", "nfe", "interval", "guide", "w", "fid", "floor", "precision", "n",
                    "status")


# ---- rows ------------------------------------------------------------------------------------------


def schedule_rows(search: Any, trials: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per Tune trial: status, point, last reported metrics, attempts."""
    from . import spaces
    from .store import load_trial

    rows = []
    for trial in trials:
        m = trial.last_result or {}
        point = spaces.resolve(trial.config)
        rec = load_trial(search.out, trial.trial_id)
        step = m.get("step")
        status = str(trial.status)
        if status == "TERMINATED" and (step or 0) < search.steps:
            status = "STOPPED"  # ended by the scheduler before `steps`
        rows.append(
            {
                "trial_id": trial.trial_id,
                "status": status,
                "sde": point["sde"],
                "weighting": point["weighting"],
                "params": _relevant(point),
                "point": dict(trial.config),
                "step": step,
                **{k: _num(m.get(k)) for k in ("heldout_loss", "fid", "precision", "bpd", "loss")},
                "attempts": rec["attempts"],
                "stopped_early": status == "STOPPED",
                "train_config": rec.get("train_config"),
            }
        )
    return rows


def _relevant(point: dict[str, Any]) -> str:
    """The SDE's own parameters, as text for the table."""
    if point["sde"] in ("vp", "subvp"):
        return f"β∈[{point['beta_min']:g}, {point['beta_max']:g}]"
    if point["sde"] == "ve":
        return f"σ∈[{point['sigma_min']:g}, {point['sigma_max']:g}]"
    if point["sde"] == "ddpm-cosine":
        return f"s={point['cosine_s']:g}"
    return "β∈[1e-4, 0.02], N=1000"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def best_row(
    rows: Sequence[dict[str, Any]], metric: str, mode: str, *, steps: int | None = None
) -> dict | None:
    """The best row by `metric` among trials that trained all `steps` (all trials, when none did):
    a trial stopped early was behind at its rung and its early number is not comparable."""
    scored = [r for r in rows if r.get(metric) is not None and math.isfinite(r[metric])]
    full = [r for r in scored if steps is None or r.get("step") == steps]
    pool = full or scored
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda r: r[metric])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (x, y), both minimised, in order of x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


# ---- tables ----------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


# ---- plots -----------------------------------------------------------------------------------------


def plot_pareto(rows: Sequence[dict[str, Any]], uri: str) -> str | None:
    """FID versus bits/dim of every trial with both; the Pareto front joins the trials that trained to
    the end (an early-stopped trial's numbers are from fewer steps and are drawn hollow). None when no
    trial has both numbers."""
    pts = [r for r in rows if _finite(r.get("bpd")) and _finite(r.get("fid"))]
    if not pts:
        return None
    full = [r for r in pts if not r.get("stopped_early")]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r["bpd"] for r in full], [r["fid"] for r in full], c="tab:gray", label="trials")
    early = [r for r in pts if r.get("stopped_early")]
    if early:
        ax.scatter(
            [r["bpd"] for r in early],
            [r["fid"] for r in early],
            facecolors="none",
            edgecolors="tab:gray",
            label="stopped early",
        )
    front = [full[i] for i in pareto_front([(r["bpd"], r["fid"]) for r in full])]
    ax.plot([r["bpd"] for r in front], [r["fid"] for r in front], "o-", c="tab:red", label="Pareto front")
    for r in front:
        ax.annotate(
            f"{r['sde']}/{r['weighting']}",
            (r["bpd"], r["fid"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("bits/dim (ELBO, held-out)")
    ax.set_ylabel("FID (domain features)")
    ax.set_title("FID versus bits/dim")
    ax.legend()
    storage.write_bytes(uri, png(fig))
    return uri


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_learning_curves(search: Any, rows: Sequence[dict[str, Any]], uri: str) -> str | None:
    """The search's metric against step for every trial (from each trial's Train history)."""
    from ..layout import RunLayout
    from ..plots import learning_curves
    from .store import trial_uri

    curves = {}
    for r in rows:
        h_uri = RunLayout.history(trial_uri(search.out, r["trial_id"]))
        if storage.exists(h_uri):
            hist = storage.read_json(h_uri)
            curves[f"{r['sde']}/{r['weighting']}"] = [(h["step"], h.get(search.metric)) for h in hist]
    if not any(curves.values()):
        return None
    storage.write_bytes(uri, learning_curves(curves, search.metric))
    return uri


def plot_fid_vs_w(rows: Sequence[dict[str, Any]], uri: str) -> str:
    """FID (left axis) and classifier precision (right axis) versus w, one line per sampler and NFE."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax2 = ax.twinx()
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("fid") is not None:
            how = "autoguide" if r.get("guide") else "CFG"
            lo, hi = r.get("interval") or (0.0, None)
            band = "" if (lo, hi) == (0.0, None) else f", σ̃ ∈ ({lo:g}, {'∞' if hi is None else f'{hi:g}'}]"
            groups.setdefault((r["sampler"], r["steps"], how, band), []).append(r)
    for (sampler, steps, how, band), g in sorted(groups.items()):
        g = sorted(g, key=lambda r: r["w"])
        label = f"{sampler}, {steps} steps (NFE {g[0].get('nfe')}), {how}{band}"
        (line,) = ax.plot([r["w"] for r in g], [r["fid"] for r in g], "o-", label=label)
        if all(r.get("precision") is not None for r in g):
            ax2.plot([r["w"] for r in g], [r["precision"] for r in g], "s--", c=line.get_color(), alpha=0.6)
    floors = [r["floor"] for r in rows if _finite(r.get("floor"))]
    if floors:  # real-vs-real at the points' N: the FID no sampler can beat
        ax.axhline(sum(floors) / len(floors), color="tab:gray", ls=":", label="real-vs-real floor at N")
    ax.set_xlabel("guidance weight w")
    ax.set_ylabel("FID (solid)")
    ax2.set_ylabel("classifier accuracy (dashed)")
    ax.set_title("FID versus w")
    ax.legend(fontsize=8)
    storage.write_bytes(uri, png(fig))
    return uri


# ---- reports ---------------------------------------------------------------------------------------


def write_schedule_report(
    search: Any, rows: list[dict[str, Any]], best: dict[str, Any] | None, *, complete: bool
) -> dict[str, str]:
    """report.md (table, best configuration), report.json and pareto.png under the search's folder."""
    out = search.out
    uris = {"markdown": storage.join(out, "report.md"), "json": storage.join(out, "report.json")}
    pareto = plot_pareto(rows, storage.join(out, "pareto.png"))
    if pareto:
        uris["pareto"] = pareto
    curves = plot_learning_curves(search, rows, storage.join(out, "learning_curves.png"))
    if curves:
        uris["learning_curves"] = curves
    stopped = sum(r["stopped_early"] for r in rows)
    grace = search.grace_period or search.report_every
    parts = [
        f"# Schedule search `{search.name}`\n",
        f"- Metric: `{search.metric}` ({search.mode}); ASHA on `step`, grace {grace}"
        f" steps, reduction factor {search.reduction_factor:g}; {len(rows)} trials, {stopped} stopped early"
        + (
            ""
            if complete
            else "; **interrupted**: restore it with `diffusion-pipeline tune schedules --restore`"
        ),
        f"- Data: {search.data}; evaluations: {', '.join(search.evaluations) or 'none'}",
        "",
        markdown_table(rows, SCHEDULE_COLUMNS),
    ]
    if best is not None:
        parts += [
            f"## Best trial: `{best['trial_id']}` ({search.metric} = {_fmt(best[search.metric])})\n",
            f"SDE `{best['sde']}` ({best['params']}), weighting `{best['weighting']}`.\n",
            "```json",
            _json(best.get("train_config")),
            "```",
            "",
        ]
    if pareto:
        parts.append("![FID versus bits/dim](pareto.png)\n")
    if curves:
        parts.append(f"![{search.metric} by trial](learning_curves.png)\n")
    storage.write_bytes(uris["markdown"], "\n".join(parts).encode())
    storage.write_json(
        uris["json"], {"search": search.to_dict(), "rows": rows, "best": best, "complete": complete}
    )
    return uris


def write_guidance_report(
    out: str, rows: list[dict[str, Any]], best: dict[str, dict[str, Any]], settings: dict[str, Any]
) -> dict[str, str]:
    """report.md (table, best w per sampler/NFE), report.json and fid_vs_w.png under `out`."""
    uris = {
        "markdown": storage.join(out, "report.md"),
        "json": storage.join(out, "report.json"),
        "plot": plot_fid_vs_w(rows, storage.join(out, "fid_vs_w.png")),
    }
    parts = [
        f"# Guidance sweep of {settings.get('checkpoint')}\n",
        f"- {settings.get('n')} samples per point (seeds {settings.get('seed')}…), FID against "
        f"{settings.get('data')} ({settings.get('reference_split')}), domain features; precision = the "
        "domain classifier's accuracy on the labels the samples were conditioned on.",
        "",
        markdown_table(sorted(rows, key=lambda r: (r["sampler"], r["steps"], r["w"])), GUIDANCE_COLUMNS),
        "## Best w (lowest FID)\n",
    ]
    for key, r in sorted(best.items()):
        parts.append(f"- {key}: w = {r['w']:g} (FID {_fmt(r['fid'])}, precision {_fmt(r.get('precision'))})")
    parts.append("\n![FID versus w](fid_vs_w.png)\n")
    storage.write_bytes(uris["markdown"], "\n".join(parts).encode())
    storage.write_json(uris["json"], {"settings": settings, "rows": rows, "best": best})
    return uris


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


__all__ = [
    "best_row",
    "markdown_table",
    "pareto_front",
    "plot_fid_vs_w",
    "plot_learning_curves",
    "plot_pareto",
    "schedule_rows",
    "write_guidance_report",
    "write_schedule_report",
]
