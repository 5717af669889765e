"""Plots a run shows (PNG bytes): training loss curves and search learning curves. matplotlib is
imported on first use with the Agg backend: cluster nodes have no display."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def loss_curves(history: Sequence[Mapping[str, Any]], *, title: str = "training loss") -> bytes:
    """The total loss and each σ̃-bucket's loss (EDM's σ/α, comparable across processes) against step,
    on a log scale: the buckets show which noise levels the network is still learning."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h.get("loss") for h in history], "k-", lw=2, label="loss (all σ)")
    buckets = sorted({k for h in history for k in h if k.startswith("loss_sigma_")})
    for key in buckets:
        pts = [(h["step"], h[key]) for h in history if _finite(h.get(key))]
        if pts:
            lo, hi = key.removeprefix("loss_sigma_").split("_")
            ax.plot(*zip(*pts, strict=True), "-", lw=1, label=f"σ̃ ∈ [{lo}, {hi})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(_finite(h.get("loss")) and h["loss"] > 0 for h in history):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return png(fig)


def learning_curves(curves: Mapping[str, Sequence[tuple[int, float]]], metric: str) -> bytes:
    """One line per trial: `metric` against step (a search's learning curves)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, pts in sorted(curves.items()):
        pts = [(s, v) for s, v in pts if _finite(v)]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by trial")
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    return png(fig)


__all__ = ["learning_curves", "loss_curves", "png", "pyplot"]
