"""DSM training: the plain-torch loop (loop.py), checkpoints on any storage (checkpoint.py), and its
distributed run on Ray Train (ray_train.py, the only module that imports Ray).

Nothing is imported eagerly: `diffusion-pipeline` imports `pipeline.training.cli` to build its parser,
and that must not pull in torch or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InMemoryBatches": "loop", "Trainer": "loop", "TrainingDivergedError": "loop", "fit": "loop",
    "unwrap": "loop",
    "export_ema": "checkpoint", "latest_checkpoint": "checkpoint", "list_checkpoints": "checkpoint",
    "load_checkpoint": "checkpoint", "load_model": "checkpoint",
    "SamplingModel": "checkpoint", "save_checkpoint": "checkpoint",
    "train": "ray_train", "TrainResult": "ray_train",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
