"""The domain classifier: a small CNN trained on the dataset's train split.

Its penultimate layer is the domain feature extractor for FID on small images (8×8 digits), and its
accuracy on generated samples (the label each was conditioned on vs the label it is read as) is the
precision proxy that the guidance search scores. It is saved as a plain state_dict
(`classifier.pt`, loadable with weights_only=True) beside `classifier.json`, which records its test
accuracy, architecture, data source and the sha256 of the weights.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import storage

WEIGHTS_FILE = "classifier.pt"
META_FILE = "classifier.json"


class DomainClassifier(nn.Module):
    """conv–conv–pool–conv–pool to 4×4 → penultimate `feature_dim` → logits."""

    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 10, width: int = 16, feature_dim: int = 64
    ) -> None:
        super().__init__()
        for name, v in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
            ("feature_dim", feature_dim),
        ):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.arch = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "feature_dim": feature_dim,
        }
        self.feature_dim, self.num_classes = feature_dim, num_classes
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GELU(),
            # Pooled to a fixed 4×4 grid, not to 1×1: where a stroke is matters for a digit.
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations [B, feature_dim]: the domain FID features."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _shift_augment(x: Tensor, g: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random translations by up to `max_shift` pixels; the uncovered border is background (−1)."""
    B, _, H, W = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (B,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (B,), generator=g)
    out = torch.empty_like(x)
    # One slice per distinct offset (at most (2p+1)² of them), not one per image.
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            sel = (dy == oy) & (dx == ox)
            if sel.any():
                out[sel] = padded[sel, :, oy : oy + H, ox : ox + W]
    return out


@torch.no_grad()
def class_probs(model: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    """Softmax class probabilities [N, classes] of the images x (on the CPU)."""
    if x.shape[0] == 0:
        raise ValueError("class probabilities of an empty set are undefined")
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(xb.to(device)).softmax(1).cpu() for xb in x.split(batch_size)])


def accuracy(model: nn.Module, x: Tensor, labels: Tensor, *, batch_size: int = 512) -> float:
    """Fraction of images whose argmax logit equals the label."""
    if x.shape[0] != labels.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {labels.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((class_probs(model, x, batch_size=batch_size).argmax(1) == labels).float().mean())


def train_classifier(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    num_classes: int,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 16,
    feature_dim: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[DomainClassifier, dict[str, Any]]:
    """Adam with cosine decay and ±1-pixel shifts; returns the model and its train/test accuracy."""
    if x_train.ndim != 4 or x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"train/test images must be [N, C, H, W] of one shape, got {tuple(x_train.shape)} "
            f"and {tuple(x_test.shape)}"
        )
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = DomainClassifier(
        in_channels=x_train.shape[1], num_classes=num_classes, width=width, feature_dim=feature_dim
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = max(x_train.shape[0] // batch_size, 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(x_train.shape[0], generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            xb = _shift_augment(x_train[idx], g).to(device)
            loss = F.cross_entropy(model(xb), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    metrics = {
        "train_accuracy": accuracy(model, x_train, y_train),
        "test_accuracy": accuracy(model, x_test, y_test),
        "n_train": int(x_train.shape[0]),
        "n_test": int(x_test.shape[0]),
        "epochs": epochs,
        "seed": seed,
    }
    return model, metrics


def _state_bytes(model: DomainClassifier) -> bytes:
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "arch": model.arch}, buf)
    return buf.getvalue()


def save_classifier(
    model: DomainClassifier,
    uri: str,
    *,
    name: str,
    metrics: dict[str, Any],
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write classifier.pt and classifier.json (with test accuracy and weights sha256) under `uri`."""
    if "test_accuracy" not in metrics:
        raise ValueError("metrics must include test_accuracy: a classifier is saved with its accuracy")
    data = _state_bytes(model)
    meta = {
        "name": name,
        "arch": model.arch,
        **metrics,
        "source": source or {},
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "weights_file": WEIGHTS_FILE,
    }
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), data)
    storage.write_json(storage.join(uri, META_FILE), meta)
    return meta


def load_classifier(
    uri: str, *, device: torch.device | str = "cpu"
) -> tuple[DomainClassifier, dict[str, Any]]:
    """The classifier under `uri` and its metadata; the weights must match the recorded sha256."""
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        raise ValueError(
            f"classifier: no {META_FILE} under {uri!r} (train one with `diffusion-pipeline classifier`)"
        )
    meta = storage.read_json(meta_uri)
    data = storage.read_bytes(storage.join(uri, meta.get("weights_file", WEIGHTS_FILE)))
    if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"classifier under {uri!r}: weights do not match the sha256 in {META_FILE}")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = DomainClassifier(**state["arch"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), meta


# ---- data ----------------------------------------------------------------------------------------


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as x ∈ [-1, 1] [N, 1, 8, 8] with a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = 2 * d.images.astype(np.float32) / 16.0 - 1
    idx_tr, idx_te = train_test_split(
        np.arange(len(x)), test_size=test_fraction, random_state=seed, stratify=d.target
    )
    t = lambda a: torch.as_tensor(a)  # noqa: E731
    return (
        t(x[idx_tr]).unsqueeze(1),
        t(d.target[idx_tr]).long(),
        t(x[idx_te]).unsqueeze(1),
        t(d.target[idx_te]).long(),
    )


def load_split(data_uri: str, split: str, *, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """A whole split of a sharded dataset in memory: x ∈ [-1, 1] [N, C, H, W] and labels [N]."""
    from ..data.loader import make_loader

    loader = make_loader(data_uri, split, batch_size, shuffle_buffer=0, rank=0, world_size=1)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


__all__ = [
    "DomainClassifier",
    "accuracy",
    "class_probs",
    "digits_split",
    "load_classifier",
    "load_split",
    "save_classifier",
    "train_classifier",
]


def train_domain_classifier(
    data: str, out: str, *, epochs: int = 20, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Train the domain classifier on `data` (a sharded dataset URI, or `digits`) and save it under `out`;
    returns its metrics (test accuracy included)."""
    if data == "digits":
        x_tr, y_tr, x_te, y_te = digits_split(seed=seed)
        source: dict[str, Any] = {"data": "sklearn-digits", "split": "stratified 80/20", "seed": seed}
        name, num_classes = "digits", 10
    else:
        from ..data.manifest import read_manifest

        m = read_manifest(data)
        x_tr, y_tr = load_split(data, "train")
        x_te, y_te = load_split(data, "test")
        source = {"data": data, "fingerprint": m.get("source", {}).get("fingerprint")}
        name, num_classes = m.get("source", {}).get("kind", "dataset"), int(m["num_classes"])
    model, metrics = train_classifier(
        x_tr, y_tr, x_te, y_te, num_classes=num_classes, epochs=epochs, seed=seed, device=device
    )
    save_classifier(model, out, name=name, metrics=metrics, source=source)
    return metrics
