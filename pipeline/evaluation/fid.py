"""Fréchet distance, KID and feature statistics that are saved to and loaded from storage.

FID (Heusel et al. 2017, eq. 6) between Gaussians fitted to two feature sets,
    d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}).
(Σ₁Σ₂)^{1/2} is not symmetric, and the usual `scipy.linalg.sqrtm(Σ₁Σ₂)` can return complex or
non-finite results when the covariances are rank-deficient (N < d). Only its trace enters d², and
Σ₁Σ₂ is similar to the symmetric PSD matrix Σ₁^{1/2} Σ₂ Σ₁^{1/2}, so
    tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ(Σ₁^{1/2} Σ₂ Σ₁^{1/2}),
which two symmetric eigendecompositions give stably (negative round-off eigenvalues clip to 0).

KID (Bińkowski et al. 2018): the unbiased MMD² estimate with the cubic polynomial kernel
k(x, y) = (xᵀy / d + 1)³, averaged over random subsets, with its standard deviation over subsets.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage

STATS_FORMAT = "feature-stats/1"


# ---- Fréchet distance ----------------------------------------------------------------------------


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root through eigh; round-off negative eigenvalues are clipped to 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ₁Σ₂)^{1/2} = Σ √λ(Σ₁^{1/2} Σ₂ Σ₁^{1/2}) for PSD Σ₁, Σ₂."""
    r = _sqrtm_psd(sigma1)
    m = r @ sigma2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _check_gaussian(name: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu must be [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu and sigma must be finite (features contain NaN or inf)")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) in float64 (Heusel et al. 2017, eq. 6)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_gaussian("first", mu1, sigma1)
    _check_gaussian("second", mu2, sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # A distance is ≥ 0; tiny negatives are round-off on (near-)identical statistics.
    return float(max(d2, 0.0))


# ---- KID --------------------------------------------------------------------------------------------


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    k = a @ b.T / a.shape[1] + 1.0
    return k * k * k  # cheaper than a float power


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (Bińkowski et al. 2018, eq. 2 with k of §2.2)."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.mean()
    )


def kernel_inception_distance(
    f1: np.ndarray, f2: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD² over random subsets (Bińkowski et al. 2018)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be [N, d] with equal d, got {f1.shape} and {f2.shape}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {f1.shape[0]} and {f2.shape[0]}")
    rng = np.random.default_rng(seed)
    vals = np.array(
        [
            mmd2_unbiased(
                f1[rng.choice(f1.shape[0], m, replace=False)], f2[rng.choice(f2.shape[0], m, replace=False)]
            )
            for _ in range(subsets)
        ]
    )
    return float(vals.mean()), float(vals.std(ddof=1) if subsets > 1 else 0.0)


# ---- feature statistics ----------------------------------------------------------------------------


class StatsAccumulator:
    """Streaming mean and covariance in float64, merged batch by batch (Chan et al. 1979)."""

    def __init__(self, dim: int | None = None) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None if dim is None else np.zeros(dim)
        self.m2: np.ndarray | None = None if dim is None else np.zeros((dim, dim))

    def update(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {f.shape}")
        nb = f.shape[0]
        if nb == 0:
            return
        mb = f.mean(0)
        c = f - mb
        m2b = c.T @ c
        if self.mean is None or self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        if f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature dimension changed from {self.mean.shape[0]} to {f.shape[1]}")
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def merged(self, other: StatsAccumulator) -> StatsAccumulator:
        out = StatsAccumulator()
        for acc in (self, other):
            if acc.n == 0:
                continue
            if out.n == 0:
                out.n, out.mean, out.m2 = acc.n, acc.mean.copy(), acc.m2.copy()
                continue
            n = out.n + acc.n
            delta = acc.mean - out.mean
            out.mean = out.mean + delta * (acc.n / n)
            out.m2 = out.m2 + acc.m2 + np.outer(delta, delta) * (out.n * acc.n / n)
            out.n = n
        return out

    def stats(self, **meta: Any) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"feature statistics need at least 2 samples, got {self.n}")
        return FeatureStats(mu=self.mean.copy(), sigma=self.m2 / (self.n - 1), n=self.n, **meta)


@dataclass
class FeatureStats:
    """μ, Σ (float64, unbiased covariance as in pytorch-fid's np.cov) of a feature set, with provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor_id: str = ""
    weights_sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # Optional subset of the raw features (float32) kept for KID, which needs samples, not moments.
    features: np.ndarray | None = None

    def sha256(self) -> str:
        """Content hash of the statistics (μ, Σ, N, extractor): what a result cites."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.mu, np.float64).tobytes())
        h.update(np.ascontiguousarray(self.sigma, np.float64).tobytes())
        h.update(json.dumps([self.n, self.extractor_id, self.weights_sha256]).encode())
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        header = {
            "format": STATS_FORMAT,
            "n": self.n,
            "extractor_id": self.extractor_id,
            "weights_sha256": self.weights_sha256,
            "meta": self.meta,
            "sha256": self.sha256(),
        }
        arrays = {
            "mu": self.mu,
            "sigma": self.sigma,
            "header": np.frombuffer(json.dumps(header).encode(), np.uint8),
        }
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, np.float32)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<bytes>") -> FeatureStats:
        try:
            z = np.load(io.BytesIO(data), allow_pickle=False)
            header = json.loads(z["header"].tobytes().decode())
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            features = z["features"] if "features" in z.files else None
        except Exception as e:
            raise ValueError(f"{source}: not a feature-statistics file ({e})") from e
        if header.get("format") != STATS_FORMAT:
            raise ValueError(f"{source}: format {header.get('format')!r}, expected {STATS_FORMAT!r}")
        stats = cls(
            mu=mu,
            sigma=sigma,
            n=int(header["n"]),
            extractor_id=header["extractor_id"],
            weights_sha256=header["weights_sha256"],
            meta=header.get("meta", {}),
            features=features,
        )
        if stats.sha256() != header["sha256"]:
            raise ValueError(f"{source}: statistics do not match their recorded sha256 (corrupt file)")
        return stats

    def save(self, uri: str) -> str:
        storage.write_bytes(uri, self.to_bytes())
        return uri

    @classmethod
    def load(cls, uri: str) -> FeatureStats:
        return cls.from_bytes(storage.read_bytes(uri), source=uri)


def feature_stats(features: np.ndarray, **meta: Any) -> FeatureStats:
    """μ and unbiased Σ of [N, d] features in float64."""
    acc = StatsAccumulator()
    acc.update(features)
    return acc.stats(**meta)


# ---- reference statistics, cached per dataset -------------------------------------------------------

STATS_DIR = "fid-stats"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in s).strip("-")


def reference_key(
    manifest_sha256: str, extractor_id: str, weights_sha256: str, resolution: tuple[int, int], split: str
) -> str:
    """Cache file name: manifest hash, extractor id and weights, data resolution and split."""
    H, W = resolution
    return f"{manifest_sha256[:16]}_{_slug(extractor_id)}_{weights_sha256[:12]}_{H}x{W}_{split}.npz"


def reference_stats(
    data_uri: str,
    extractor: Any,
    *,
    split: str = "train",
    cache_uri: str | None = None,
    batch_size: int = 256,
    kid_features: int = 5000,
    kid_subsets: int = 100,
    refresh: bool = False,
) -> FeatureStats:
    """μ, Σ of a dataset split's features, computed once and cached on storage.

    Cached under `cache_uri` (default: `{dataset}/fid-stats/`) with a key of the manifest's sha256, the
    extractor id and weights hash, the image resolution and the split. Also recorded: the real-vs-real
    floor, FID and KID between the two disjoint halves (even and odd source positions) of the split,
    and the first `kid_features` raw features for KID.
    """
    from ..data import manifest as mf
    from ..data.loader import make_loader

    muri = mf.manifest_uri(data_uri)
    manifest_bytes = storage.read_bytes(muri)
    manifest = mf.read_manifest(muri)
    H, W, _ = manifest["image"]["shape"]
    mhash = hashlib.sha256(manifest_bytes).hexdigest()
    root = mf.dataset_root(muri)
    cache = (cache_uri or storage.join(root, STATS_DIR)).rstrip("/")
    uri = storage.join(cache, reference_key(mhash, extractor.id, extractor.weights_sha256, (H, W), split))
    if not refresh and storage.exists(uri):
        stats = FeatureStats.load(uri)
        if (stats.meta.get("manifest_sha256"), stats.extractor_id, stats.weights_sha256) == (
            mhash,
            extractor.id,
            extractor.weights_sha256,
        ):
            stats.meta["cache_uri"] = uri
            return stats

    loader = make_loader(muri, split, batch_size, shuffle_buffer=0, with_index=True, rank=0, world_size=1)
    halves = (StatsAccumulator(), StatsAccumulator())
    keep: list[np.ndarray] = []
    kept_pos: list[np.ndarray] = []
    n_kept = 0
    for x, _, pos in loader:
        f = extractor.extract(x, levels=int(manifest["levels"]), batch_size=batch_size)
        odd = (pos.numpy() % 2).astype(bool)
        halves[0].update(f[~odd])
        halves[1].update(f[odd])
        if n_kept < kid_features:
            keep.append(f[: kid_features - n_kept])
            kept_pos.append(odd[: kid_features - n_kept])
            n_kept += keep[-1].shape[0]
    full = halves[0].merged(halves[1])
    if full.n < 4:
        raise ValueError(f"{muri}: split {split!r} has {full.n} images; reference statistics need at least 4")
    kid_f = np.concatenate(keep, 0)
    kid_odd = np.concatenate(kept_pos, 0)
    a, b = halves[0].stats(), halves[1].stats()
    floor: dict[str, Any] = {
        "fid": frechet_distance(a.mu, a.sigma, b.mu, b.sigma),
        "n_per_half": [a.n, b.n],
        "halves": "even / odd source positions",
    }
    half = int(min(kid_odd.sum(), (~kid_odd).sum()))
    if half >= 4:
        # Subsets of at most half of each half, so that they differ and their spread means something.
        floor["kid_mean"], floor["kid_std"] = kernel_inception_distance(
            kid_f[~kid_odd], kid_f[kid_odd], subsets=kid_subsets, subset_size=min(1000, half // 2)
        )
    meta = {
        "manifest_uri": muri,
        "manifest_sha256": mhash,
        "split": split,
        "resolution": [H, W],
        "levels": int(manifest["levels"]),
        "extractor": extractor.describe(),
        "floor": floor,
    }
    stats = full.stats(extractor_id=extractor.id, weights_sha256=extractor.weights_sha256, meta=meta)
    stats.features = kid_f.astype(np.float32)
    stats.save(uri)
    stats.meta["cache_uri"] = uri
    return stats


def matched_floor(ref: FeatureStats, n: int, *, draws: int = 5, seed: int = 0) -> dict[str, Any]:
    """Real-vs-real FID at the samples' own N: `draws` sets of n real images (drawn without replacement
    from the reference's kept raw features) scored against the reference statistics, as the samples
    are. FID is biased upward roughly like 1/N, so a sample's FID means something only beside a floor
    at its N. The real images belong to the reference itself, which makes this floor a little lower
    than independent real images would score: a gate "FID ≤ k × floor" judged by it is strict."""
    if ref.features is None or ref.features.shape[0] < 2:
        raise ValueError("the reference statistics kept no raw features: recompute them (refresh=True)")
    pool = ref.features.shape[0]
    m = min(int(n), pool)
    if m < 2:
        raise ValueError(f"a floor needs n >= 2 images, got n={n}")
    rng = np.random.default_rng(seed)
    fids = []
    for _ in range(draws):
        acc = StatsAccumulator()
        acc.update(ref.features[rng.choice(pool, m, replace=False)].astype(np.float64))
        s = acc.stats()
        fids.append(frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma))
    return {"fid": float(np.mean(fids)), "min": float(np.min(fids)), "max": float(np.max(fids)), "n": m,
            "draws": draws, "rule": f"{draws} draws of {m} real reference images against the reference"}


__all__ = [
    "FeatureStats",
    "StatsAccumulator",
    "feature_stats",
    "frechet_distance",
    "kernel_inception_distance",
    "matched_floor",
    "mmd2_unbiased",
    "reference_key",
    "reference_stats",
    "trace_sqrt_product",
]
