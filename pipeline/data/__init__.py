"""Data: image sources → WebDataset shards with a manifest on any storage URI → a streaming loader.

    from pipeline.data import shard_dataset, make_loader
    shard_dataset("digits", "s3://bucket/datasets/digits", shard_size=500)
    for x, labels in make_loader("s3://bucket/datasets/digits", "train", 128, seed=0, epoch=0):
        ...  # x float32 [B, C, H, W] in [-1, 1], labels long [B]

Names are imported on first use, so `import pipeline.data` (and the CLI) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_source": "pipeline.data.sources",
    "Source": "pipeline.data.sources",
    "shard_dataset": "pipeline.data.shard",
    "ShardReport": "pipeline.data.shard",
    "make_loader": "pipeline.data.loader",
    "Loader": "pipeline.data.loader",
    "read_manifest": "pipeline.data.manifest",
    "verify_manifest": "pipeline.data.manifest",
    "shard_urls": "pipeline.data.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
