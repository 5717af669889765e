"""PSNR and SSIM against values computed by hand."""

import math

import pytest
import torch

from pipeline.evaluation.image_metrics import gaussian_window, psnr, reconstruction_metrics, ssim

F64 = torch.float64


def test_psnr_hand_values():
    x = torch.zeros(2, 1, 4, 4, dtype=F64)
    y = torch.stack([torch.full((1, 4, 4), 0.1, dtype=F64), torch.zeros(1, 4, 4, dtype=F64)])
    p = psnr(x, y)
    # MSE 0.01 on range 2: 10 log10(4 / 0.01) = 26.0206 dB; identical images: +inf.
    assert p[0].item() == pytest.approx(10 * math.log10(400), abs=1e-9) and math.isinf(p[1].item())
    # One pixel of 16 off by 1 on range 1: MSE 1/16 → 10 log10(16) = 12.0412 dB.
    z = torch.zeros(1, 1, 4, 4)
    z[0, 0, 0, 0] = 1
    assert psnr(z, torch.zeros_like(z), data_range=1.0).item() == pytest.approx(10 * math.log10(16), abs=1e-9)
    metrics = reconstruction_metrics(y, x, win_size=3)  # the inf PSNR of the identical pair is left out
    assert metrics["psnr"] == pytest.approx(10 * math.log10(400), abs=1e-9)
    assert metrics["ssim"] == pytest.approx(0.5 * (4e-4 / (0.01 + 4e-4)) + 0.5, abs=1e-12)


def test_ssim_of_constant_images_is_the_luminance_term():
    # σ = 0 everywhere: SSIM = (2ab + C1)/(a² + b² + C1), C1 = (0.01 · 2)² = 4e-4.
    a, b = 0.2, 0.5
    x, y = torch.full((1, 3, 8, 8), a, dtype=F64), torch.full((1, 3, 8, 8), b, dtype=F64)
    expected = (2 * a * b + 4e-4) / (a * a + b * b + 4e-4)  # = 0.2004 / 0.2904
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-12)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_an_affine_pair_in_one_window_by_hand():
    # A 3×3 image and one 3×3 window: weights w_ij ∝ exp(−(i² + j²)/(2·1.5²)), i, j ∈ {−1, 0, 1}.
    e1, e2 = math.exp(-1 / 4.5), math.exp(-2 / 4.5)
    Z = 1 + 4 * e1 + 4 * e2
    w = torch.tensor([[e2, e1, e2], [e1, 1, e1], [e2, e1, e2]], dtype=F64) / Z
    torch.testing.assert_close(gaussian_window(3), w)
    x = torch.tensor([[0.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 0.0]], dtype=F64)
    # μ_x = (1 + 4·0.5 e1)/Z, E_w[x²] = (1 + 4·0.25 e1)/Z; y = −0.5 x + 0.3: μ_y = −0.5 μ_x + 0.3,
    # σ_y² = 0.25 σ_x², σ_xy = −0.5 σ_x².
    mu = (1 + 2 * e1) / Z
    var = (1 + e1) / Z - mu**2
    mu_y, C1, C2 = -0.5 * mu + 0.3, 4e-4, 36e-4
    expected = ((2 * mu * mu_y + C1) * (2 * -0.5 * var + C2)) / ((mu**2 + mu_y**2 + C1) * (1.25 * var + C2))
    got = ssim(x[None, None], (-0.5 * x + 0.3)[None, None], win_size=3)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert got.item() < 0  # anti-correlated structure


def test_ssim_averages_windows_and_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 5, 5, generator=g, dtype=F64)
    y = torch.rand(2, 2, 5, 5, generator=g, dtype=F64)
    per_channel = torch.stack([ssim(x[:, c:c + 1], y[:, c:c + 1], win_size=3) for c in range(2)], 1)
    torch.testing.assert_close(ssim(x, y, win_size=3), per_channel.mean(1))
    # 3×3 windows on 5×5 images: 9 positions; the top-left one alone is the 3×3 crop's SSIM.
    crop = ssim(x[:, :, :3, :3], y[:, :, :3, :3], win_size=3)
    assert not torch.allclose(crop, ssim(x, y, win_size=3))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5)),
         r"\(1, 1, 4, 4\) and \(1, 1, 4, 5\)"),
        (lambda: psnr(torch.zeros(4, 4), torch.zeros(4, 4)), r"\[B, C, H, W\]"),
        (lambda: psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), data_range=0), r"data_range"),
        (lambda: ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), win_size=11),
         r"win_size 11.*8×8.*<= 7"),
        (lambda: ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), win_size=4), r"odd"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
