"""Post-hoc EMA snapshots on storage (EDM2): where training writes them, and the reconstruction of any
σ_rel from them into an EMA export that every evaluation reads unchanged (`checkpoint.load_model`).

    {run}/phema/{step:08d}-{sigma_rel:.4f}.pt   {"state_dict", "step", "sigma_rel"}, weights_only

Each snapshot is written atomically; the reconstruction streams them (`models.phema.reconstruct` loads
one at a time), so it never holds more than two networks whatever the number of snapshots.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from .. import storage
from ..models.phema import PowerEMA, Snapshot, reconstruct
from .checkpoint import EMA_EXPORT, export_ema, load_checkpoint

PHEMA_DIR = "phema"
_NAME = re.compile(r"^(\d{8,})-(\d+\.\d+)\.pt$")


def snapshot_uri(run: str, step: int, sigma_rel: float) -> str:
    return storage.join(run, PHEMA_DIR, f"{int(step):08d}-{sigma_rel:.4f}.pt")


def write_snapshots(run: str, tracker: PowerEMA) -> list[str]:
    """Write every profile of `tracker` at its current step (what training calls at a chosen interval)."""
    uris = []
    for snap in tracker.snapshot():
        uri = snapshot_uri(run, snap["step"], snap["sigma_rel"])
        with storage.atomic_write(uri, "wb") as f:
            torch.save(snap, f)
        uris.append(uri)
    return uris


def list_snapshots(run: str) -> list[Snapshot]:
    """The snapshots under `run`, oldest first, each loaded only when `reconstruct` asks for it."""
    folder = storage.join(run, PHEMA_DIR)
    found = []
    for name in storage.listdir(folder) if storage.exists(folder) else []:
        m = _NAME.match(name)
        if m:
            uri = storage.join(folder, name)
            found.append(Snapshot(step=int(m.group(1)), sigma_rel=float(m.group(2)),
                                  load=lambda uri=uri: _load_state(uri)))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def _load_state(uri: str) -> dict[str, torch.Tensor]:
    data = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    return data["state_dict"]


def reconstruct_export(run: str, sigma_rel: float, dest: str) -> dict[str, Any]:
    """The EMA of `sigma_rel` rebuilt from `run`'s snapshots, written as an EMA export at `dest` (the
    run's own config and network, so `load_model` reads it like `ema-final.pt`)."""
    snaps = list_snapshots(run)
    if len(snaps) < 2:
        raise ValueError(f"run {run}: {len(snaps)} post-hoc EMA snapshot(s) under {PHEMA_DIR}/; "
                         "reconstruction needs at least 2 (train with phema_every > 0)")
    final = load_checkpoint(storage.join(run, EMA_EXPORT))
    state = reconstruct(snaps, sigma_rel)
    export_ema(dest, ema=state, config=final["config"], step=max(s.step for s in snaps),
               network=final.get("network"))
    return {"uri": dest, "sigma_rel": sigma_rel, "snapshots": len(snaps),
            "steps": sorted({s.step for s in snaps}), "profiles": sorted({s.sigma_rel for s in snaps})}


__all__ = ["PHEMA_DIR", "list_snapshots", "reconstruct_export", "snapshot_uri", "write_snapshots"]
