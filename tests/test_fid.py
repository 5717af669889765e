"""Fréchet distance, KID, feature statistics and cached reference statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline import storage
from pipeline.diffusion.dequantize import to_display_uint8 as quantize_uint8
from pipeline.evaluation.features import FeatureExtractor
from pipeline.evaluation.fid import (
    FeatureStats,
    StatsAccumulator,
    feature_stats,
    frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
    reference_stats,
)


def pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The formula as pytorch-fid computes it (scipy sqrtm of Σ₁Σ₂, offset on failure, real part)."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _features(rng, n, d, shift=0.0, scale=1.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a * scale + shift


def test_frechet_matches_pytorch_fid_formula():
    rng = np.random.default_rng(0)
    for d, shift, scale in ((16, 0.3, 1.0), (64, 0.0, 2.0), (64, 1.0, 0.5)):
        f1 = _features(rng, 600, d)
        f2 = _features(rng, 500, d, shift, scale)
        s1, s2 = feature_stats(f1), feature_stats(f2)
        # Statistics themselves are the textbook ones (np.cov is what pytorch-fid uses).
        np.testing.assert_allclose(s1.mu, f1.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s1.sigma, np.cov(f1, rowvar=False), rtol=1e-10, atol=1e-12)
        ours = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
        ref = pytorch_fid_reference(s1.mu, s1.sigma, s2.mu, s2.sigma)
        assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_closed_form_commuting_covariances():
    # Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ commute, so d² = ‖Δμ‖² + Σ (√a − √b)².
    rng = np.random.default_rng(1)
    d = 40
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.01, 3, d), rng.uniform(0.01, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(exact, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_even_rank_deficient():
    rng = np.random.default_rng(2)
    for n, d in ((500, 32), (20, 128)):  # the second has N < d: Σ is singular
        s = feature_stats(_features(rng, n, d))
        assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) <= 1e-6 * np.trace(s.sigma)


def test_frechet_bad_input():
    mu, sig = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu, sig, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(mu, np.eye(2), mu, sig)
    bad = sig.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(mu, bad, mu, sig)


def test_streaming_statistics_match_numpy():
    rng = np.random.default_rng(3)
    f = _features(rng, 1000, 24, shift=5.0)  # a large mean tests the merge's numerical stability
    acc = StatsAccumulator()
    for chunk in np.split(f, [1, 7, 300, 301, 999]):
        acc.update(chunk)
    s = acc.stats()
    assert s.n == 1000
    np.testing.assert_allclose(s.mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)
    a, b = StatsAccumulator(), StatsAccumulator()
    a.update(f[:400])
    b.update(f[400:])
    np.testing.assert_allclose(a.merged(b).stats().sigma, s.sigma, rtol=1e-9, atol=1e-12)


def test_stats_round_trip_and_corruption(tmp_path):
    rng = np.random.default_rng(4)
    s = feature_stats(_features(rng, 50, 8), extractor_id="x", weights_sha256="ab" * 32, meta={"k": 1})
    s.features = rng.normal(size=(10, 8)).astype(np.float32)
    uri = s.save(str(tmp_path / "s.npz"))
    t = FeatureStats.load(uri)
    assert t.sha256() == s.sha256() and t.n == 50 and t.meta == {"k": 1}
    np.testing.assert_array_equal(t.sigma, s.sigma)
    np.testing.assert_array_equal(t.features, s.features)
    other = feature_stats(_features(rng, 50, 8), extractor_id="x", weights_sha256="ab" * 32)
    assert other.sha256() != s.sha256()
    data = bytearray(storage.read_bytes(uri))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(uri, bytes(data))
    with pytest.raises(ValueError, match=r"s\.npz"):
        FeatureStats.load(uri)


def naive_mmd2_unbiased(x, y):
    """Unbiased MMD² written out from its definition with k(a, b) = (aᵀb/d + 1)³."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_definition_and_ranks():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(15, 6)), rng.normal(size=(12, 6)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(naive_mmd2_unbiased(x, y), rel=1e-10)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    shifted = rng.normal(size=(400, 16)) + 0.3
    same_mean, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=200, seed=0)
    diff_mean, diff_std = kernel_inception_distance(a, shifted, subsets=20, subset_size=200, seed=0)
    assert same_std > 0 and diff_std > 0
    assert abs(same_mean) < 3 * same_std  # unbiased: zero in expectation for one distribution
    assert diff_mean > 5 * diff_std and diff_mean > 10 * abs(same_mean)
    with pytest.raises(ValueError, match="subsets"):
        kernel_inception_distance(a, b, subsets=0)


def test_kid_on_inception_sized_features_equals_the_unbiased_estimator_written_out():
    """2048-d features of Inception's scale (pool3 activations are ReLU'd, order one): one subset of
    every feature is exactly the unbiased MMD² with k(x, y) = (xᵀy/d + 1)³, written as plain sums."""
    rng = np.random.default_rng(11)
    d = 2048
    x = np.abs(rng.normal(size=(40, d))) * 0.5
    y = np.abs(rng.normal(size=(30, d))) * 0.5 + 0.05
    k = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    direct = ((k[0].sum() - np.trace(k[0])) / (40 * 39) + (k[1].sum() - np.trace(k[1])) / (30 * 29)
              - 2 * k[2].mean())
    assert mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-12)
    # One subset of 30: KID draws 30 of x's 40 rows with its seeded generator, and all of y (in some
    # order, to which the estimator is blind).
    mean, _ = kernel_inception_distance(x, y, subsets=1, subset_size=30, seed=0)
    ix = np.random.default_rng(0).choice(40, 30, replace=False)
    kxx, kyy, kxy = (x[ix] @ x[ix].T / d + 1) ** 3, k[1], (x[ix] @ y.T / d + 1) ** 3
    expected = ((kxx.sum() - np.trace(kxx)) / (30 * 29) + (kyy.sum() - np.trace(kyy)) / (30 * 29)
                - 2 * kxy.mean())
    assert mean == pytest.approx(expected, rel=1e-10) and expected > 0


def test_kid_is_reported_for_inception_features_only():
    from pipeline.evaluation.fid import FeatureStats
    from pipeline.evaluation.report import KID_OMITTED, kid_applies, score_features

    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(100, 8)) + 0.2
    stats = feature_stats(real)
    for extractor_id, has_kid in (("inception-v3-fid/pool3", True),
                                  ("domain-classifier/digits/penultimate", False)):
        ref = FeatureStats(mu=stats.mu, sigma=stats.sigma, n=300, extractor_id=extractor_id,
                           weights_sha256="w")
        ref.features = real.astype(np.float32)
        out = score_features(fake, ref, kid_subsets=5, kid_subset_size=50)
        assert kid_applies(extractor_id) is has_kid
        assert ("kid" in out) is has_kid and (out.get("kid_note") == KID_OMITTED) is (not has_kid)
        # The floor is real-vs-real at the samples' N = 100 against the same reference.
        assert out["floor"]["n"] == 100 and out["floor"]["min"] <= out["floor"]["fid"] <= out["floor"]["max"]
        assert 0 < out["floor"]["fid"] < out["fid"]


def test_matched_floor_falls_with_n():
    from pipeline.evaluation.fid import matched_floor

    rng = np.random.default_rng(4)
    real = rng.normal(size=(2000, 6))
    stats = feature_stats(real)
    stats.features = real
    small, large = matched_floor(stats, 50)["fid"], matched_floor(stats, 800)["fid"]
    assert small > 3 * large > 0  # FID's small-N bias: the reason a floor must match N


class PixelFeatures(FeatureExtractor):
    """A real (if plain) extractor for the cache tests: the image's 8-bit pixels."""

    def __init__(self, tag: str = "v1") -> None:
        self.id, self.dim, self.weights_sha256 = "pixels", 64, tag * 8
        self.device = torch.device("cpu")
        self.calls = 0

    def forward_batch(self, x, levels=256):
        self.calls += 1
        return quantize_uint8(x, levels).flatten(1)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    from pipeline.data.shard import shard_dataset

    dest = str(tmp_path_factory.mktemp("digits"))
    shard_dataset("digits", dest, shard_size=400, seed=0, parallel="none")
    return dest


def test_reference_stats_cached_by_manifest_and_extractor(digits_shards, tmp_path):
    from sklearn.datasets import load_digits

    ext = PixelFeatures()
    s1 = reference_stats(digits_shards, ext, split="train", batch_size=128, kid_subsets=5)
    assert ext.calls > 0 and storage.exists(s1.meta["cache_uri"])
    calls = ext.calls
    s2 = reference_stats(digits_shards, ext, split="train", batch_size=128, kid_subsets=5)
    assert ext.calls == calls, "second call must come from the cache"
    assert s2.sha256() == s1.sha256()
    # Another weights hash or another split is another key.
    s3 = reference_stats(digits_shards, PixelFeatures("v2"), split="train", kid_subsets=5)
    assert s3.meta["cache_uri"] != s1.meta["cache_uri"]
    s4 = reference_stats(digits_shards, ext, split="test", kid_subsets=5)
    assert s4.meta["cache_uri"] != s1.meta["cache_uri"] and s4.n < s1.n

    # The statistics and the floor, recomputed here from scikit-learn's digits and the manifest's split.
    from pipeline.data.manifest import read_manifest

    m = read_manifest(digits_shards)
    n_test = m["counts"]["test"]
    perm = np.random.default_rng(0).permutation(1797)  # the shard plan's split (seed 0)
    train_ids = np.sort(perm[n_test:])
    imgs = load_digits().images.reshape(1797, -1)
    pix = np.round(imgs * (255 / 16))  # 8-bit values of the 17 grey levels
    feats = pix[train_ids]
    assert s1.n == len(train_ids)
    np.testing.assert_allclose(s1.mu, feats.mean(0), rtol=1e-9)
    np.testing.assert_allclose(s1.sigma, np.cov(feats, rowvar=False), rtol=1e-7, atol=1e-7)
    even, odd = feats[train_ids % 2 == 0], feats[train_ids % 2 == 1]
    floor = pytorch_fid_reference(
        even.mean(0), np.cov(even, rowvar=False), odd.mean(0), np.cov(odd, rowvar=False)
    )
    assert s1.meta["floor"]["fid"] == pytest.approx(floor, rel=1e-5)
    assert s1.meta["floor"]["n_per_half"] == [len(even), len(odd)]
    assert frechet_distance(s1.mu, s1.sigma, s1.mu, s1.sigma) < 1e-6 * np.trace(s1.sigma)


def test_reference_stats_bad_split(digits_shards):
    with pytest.raises(ValueError, match="split"):
        reference_stats(digits_shards, PixelFeatures(), split="validation")
