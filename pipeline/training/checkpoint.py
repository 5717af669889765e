"""Training checkpoints on any storage URI: plain state_dicts, atomic writes, keep-last-k, EMA export.

A checkpoint is the dict `Trainer.state_dict()` returns (tensors, numbers, strings, lists, dicts:
no pickled classes), so it loads with `torch.load(..., weights_only=True)` on any machine. Each one
is written to a temporary key and moved into place (`storage.atomic_write`): a writer that crashes
or dies mid-write leaves the previous checkpoint as the latest loadable one and nothing at the new key.

Layout under a run's root URI:
    {root}/checkpoints/step-00001000.pt   one per checkpoint, the last `keep_last` kept
    {root}/ema-final.pt                    the EMA weights for sampling: {"ema", "config", "step", "network"}
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch
from torch import nn

from .. import storage

CHECKPOINT_DIR = "checkpoints"
EMA_EXPORT = "ema-final.pt"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")
# What atomic_write leaves behind when its writer process is killed: ".{name}.tmp-{hex}".
_ORPHAN = re.compile(r"^\.step-(\d{8,})\.pt\.tmp-[0-9a-f]+$")


def checkpoint_uri(root: str, step: int) -> str:
    """URI of the checkpoint taken after `step` optimiser steps."""
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return storage.join(root, CHECKPOINT_DIR, f"step-{int(step):08d}.pt")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, uri) of every complete checkpoint under `root`, oldest first."""
    found = []
    for name in storage.listdir(storage.join(root, CHECKPOINT_DIR)):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), storage.join(root, CHECKPOINT_DIR, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """URI of the newest checkpoint under `root`, or None when there is none."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str, state: dict[str, Any], *, step: int | None = None, keep_last: int = 3) -> str:
    """Write `state` atomically to `{root}/checkpoints/step-{step}.pt`, then keep only the newest `keep_last`.

    `step` defaults to `state["position"]["step"]` (what `Trainer.state_dict()` records).
    """
    if int(keep_last) != keep_last or keep_last < 1:
        raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
    if step is None:
        try:
            step = int(state["position"]["step"])
        except (KeyError, TypeError) as e:
            raise ValueError("save_checkpoint: pass step= or a state with state['position']['step']") from e
    uri = checkpoint_uri(root, step)
    # torch.save streams into the temporary object; only a complete file is moved to `uri`.
    with storage.atomic_write(uri, "wb") as f:
        torch.save(state, f)
    prune_checkpoints(root, keep_last=keep_last, up_to_step=step)
    return uri


def prune_checkpoints(root: str, *, keep_last: int, up_to_step: int | None = None) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints, and temporary objects left by killed writers
    for steps ≤ `up_to_step` (a live writer only ever works on a newer step). Returns the removed URIs."""
    folder = storage.join(root, CHECKPOINT_DIR)
    removed = [uri for _, uri in list_checkpoints(root)[:-keep_last]]
    if up_to_step is not None:
        removed += [storage.join(folder, name) for name in storage.listdir(folder)
                    if (m := _ORPHAN.match(name)) and int(m.group(1)) <= up_to_step]
    for uri in removed:
        storage.remove(uri)
    return removed


def load_checkpoint(uri: str, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers, never pickled code."""
    data = storage.read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # a foreign or corrupted file: say which one
        raise ValueError(f"checkpoint {uri} cannot be loaded with weights_only=True: {e}") from e


def export_ema(uri: str, *, ema: dict[str, Any] | nn.Module, config: dict[str, Any], step: int,
               network: dict[str, Any] | None = None) -> str:
    """Write the EMA weights for sampling: {"ema": network state_dict, "config", "step", "network"}.

    `ema` is the EMA module, its state_dict, or an `EMA.state_dict()` (whose "module" entry is used);
    `network` is the U-Net's constructor config (`UNet.config`), so a sampler can rebuild the network
    without knowing the preset.
    """
    if isinstance(ema, nn.Module):
        weights = ema.state_dict()
    elif "module" in ema and isinstance(ema["module"], dict):
        weights = ema["module"]
    else:
        weights = ema
    payload = {"ema": weights, "config": dict(config), "step": int(step)}
    if network is not None:
        payload["network"] = {k: list(v) if isinstance(v, tuple) else v for k, v in network.items()}
    with storage.atomic_write(uri, "wb") as f:
        torch.save(payload, f)
    return uri


def export_ema_from_checkpoint(checkpoint: str, uri: str) -> str:
    """Export the EMA weights of a saved checkpoint (see `export_ema`)."""
    state = load_checkpoint(checkpoint)
    return export_ema(uri, ema=state["ema"], config=state["config"], step=state["position"]["step"])


def load_ema_network(uri: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network of an EMA export and load its averaged weights (eval mode, no grad)."""
    from ..models import build_unet

    payload = load_checkpoint(uri)
    config = payload["config"]
    net = build_unet(config["preset"], **config.get("model_overrides", {}))
    net.load_state_dict(payload["ema"])
    return net.to(device).eval().requires_grad_(False)


__all__ = ["CHECKPOINT_DIR", "EMA_EXPORT", "checkpoint_uri", "export_ema", "export_ema_from_checkpoint",
           "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_ema_network",
           "prune_checkpoints", "save_checkpoint"]
