"""Training progress while it runs: rank 0 writes `{out}/progress.json` at every report (a few hundred
bytes, at the report cadence, never per step), and a watcher on the driver reads it and hands each new
report to a callback, which is how the Prefect UI shows a progress bar and a live metrics table for a
run whose workers are Ray processes on other nodes."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import storage

PROGRESS_FILE = "progress.json"


def progress_uri(out: str) -> str:
    return storage.join(out, PROGRESS_FILE)


def write_progress(out: str, metrics: dict[str, Any], total: int) -> None:
    """Rank 0, at a report: where the run is and its latest metrics."""
    storage.write_json(progress_uri(out), {"step": int(metrics["step"]), "total": int(total),
                                          "time": time.time(), "metrics": metrics})


def read_progress(out: str) -> dict[str, Any] | None:
    uri = progress_uri(out)
    try:
        return storage.read_json(uri) if storage.exists(uri) else None
    except (OSError, ValueError):  # a write in flight or a flaky read: the next poll sees it
        return None


@contextlib.contextmanager
def watch_progress(out: str, callback: Callable[[dict[str, Any]], None], *,
                   interval_s: float = 2.0) -> Iterator[None]:
    """Call `callback(progress)` from a background thread whenever a new report lands, for the duration
    of the block, and once more at its end. The thread runs in a copy of the caller's context (so an
    orchestrator's run context reaches the callback); a failing callback never fails the training."""
    stop = threading.Event()
    seen: list[int] = [-1]

    def poll() -> None:
        p = read_progress(out)
        if p is not None and p["step"] != seen[0]:
            seen[0] = p["step"]
            with contextlib.suppress(Exception):
                callback(p)

    def loop() -> None:
        while not stop.wait(interval_s):
            poll()

    ctx = contextvars.copy_context()
    thread = threading.Thread(target=ctx.run, args=(loop,), name="progress-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s + 5)
        ctx.run(poll)


__all__ = ["PROGRESS_FILE", "progress_uri", "read_progress", "watch_progress", "write_progress"]
