"""Guidance interval and autoguidance against exact mixture scores (tests/test_guidance.py's toy)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.diffusion.guidance import (
    autoguidance_score_fn,
    autoguided,
    cfg_score_fn,
    check_interval,
    classifier_free,
    guidance_interval,
)
from pipeline.diffusion.param import make_score_fn
from pipeline.diffusion.samplers import sample
from pipeline.diffusion.sde import VPSDE, SubVPSDE
from pipeline.diffusion.toy import GaussianMixture
from tests.test_guidance import MIX, NULL, SDES, ToyNet, _inputs

F64 = torch.float64


# ---- guidance interval ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", list(SDES))
def test_full_interval_is_plain_cfg_exactly(sde_name):
    sde = SDES[sde_name]()
    x, t, labels = _inputs(sde)
    plain = cfg_score_fn(ToyNet(sde, "eps", "log_sigma"), sde, "eps", labels, NULL, 2.0)
    full = cfg_score_fn(ToyNet(sde, "eps", "log_sigma"), sde, "eps", labels, NULL, 2.0,
                        sigma_lo=0.0, sigma_hi=math.inf)
    assert torch.equal(full(x, t), plain(x, t))
    cfg = classifier_free(MIX.score_fn(sde, label=labels), MIX.score_fn(sde), 2.0)
    assert guidance_interval(cfg, MIX.score_fn(sde, label=labels), sde, 0.0, math.inf) is cfg


@pytest.mark.parametrize("sde_name", list(SDES))
def test_interval_guides_inside_and_is_conditional_outside(sde_name):
    sde = SDES[sde_name]()
    x, t, labels = _inputs(sde, n=128, seed=3)
    lo, hi = 0.3, 2.0
    inside = (sde.edm_sigma(t) > lo) & (sde.edm_sigma(t) <= hi)
    assert 10 < int(inside.sum()) < 118  # a mixed batch
    net = ToyNet(sde, "score", "time")
    got = cfg_score_fn(net, sde, "score", labels, NULL, 2.0, sigma_lo=lo, sigma_hi=hi,
                       noise_label_kind="time")(x, t)
    cond = MIX.score_fn(sde, label=labels)(x, t)
    guided = classifier_free(MIX.score_fn(sde, label=labels), MIX.score_fn(sde), 2.0)(x, t)
    torch.testing.assert_close(got[inside], guided[inside], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[~inside], cond[~inside], rtol=1e-9, atol=1e-9)
    assert (guided[~inside] - cond[~inside]).abs().max() > 1e-2  # the two differ where it matters
    # A batch wholly outside the interval costs one B-row forward (no unconditional half).
    net.batches.clear()
    t_out = torch.full_like(t, float(sde.edm_sigma_inv(torch.tensor(5.0, dtype=F64))))
    cfg_score_fn(net, sde, "score", labels, NULL, 2.0, sigma_lo=lo, sigma_hi=hi,
                 noise_label_kind="time")(x, t_out)
    assert net.batches == [128]


@pytest.mark.parametrize(("lo", "hi", "match"), [
    (1.0, 1.0, "sigma_lo < sigma_hi"), (2.0, 1.0, "sigma_lo < sigma_hi"), (-0.1, 1.0, "sigma_lo must be"),
    (float("nan"), 1.0, "sigma_lo must be"), (0.0, -1.0, "sigma_hi must be"),
    (math.inf, math.inf, "sigma_lo < sigma_hi"),
])
def test_bad_interval_rejected(lo, hi, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        check_interval(lo, hi)
    with pytest.raises(ValueError, match=match):
        cfg_score_fn(ToyNet(sde, "score", "time"), sde, "score", torch.zeros(2, dtype=torch.long), NULL, 1.0,
                     sigma_lo=lo, sigma_hi=hi)


# ---- autoguidance -----------------------------------------------------------------------------------------

WEAK = GaussianMixture(torch.ones(1, dtype=F64), MIX.mean()[None], MIX.cov()[None])  # the moments only


class MixNet(nn.Module):
    """An exact 'network' (score output, time labels) for a mixture, with a U-Net's shape attributes."""

    def __init__(self, mix, sde, *, in_channels=2, image_size=1, num_classes=None):
        super().__init__()
        self.mix, self.sde, self.calls = mix, sde, 0
        self.in_channels, self.out_channels, self.image_size = in_channels, in_channels, image_size
        self.num_classes = num_classes

    def forward(self, x, noise_labels, class_labels=None):
        self.calls += 1
        return self.mix.score_t(x, noise_labels / 999.0, self.sde)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_autoguidance_w1_is_main_and_w0_is_guide_exactly(sde_name):
    sde = SDES[sde_name]()
    x, t, _ = _inputs(sde)
    main, guide = MixNet(MIX, sde), MixNet(WEAK, sde)
    kw = {"noise_label_kind": "time"}
    s_main = make_score_fn(main, sde, "score", **kw)(x, t)
    s_guide = make_score_fn(guide, sde, "score", **kw)(x, t)
    main.calls = guide.calls = 0
    assert torch.equal(autoguidance_score_fn(main, guide, sde, "score", 1.0, **kw)(x, t), s_main)
    assert guide.calls == 0  # w = 1 does not evaluate the guide
    assert torch.equal(autoguidance_score_fn(main, guide, sde, "score", 0.0, **kw)(x, t), s_guide)
    assert main.calls == 1
    assert (s_main - s_guide).abs().max() > 1e-2


@pytest.mark.parametrize("w", [0.5, 2.0, 3.0])
def test_autoguidance_is_the_denoiser_extrapolation(w):
    """D_w = D_guide + w (D_main − D_guide) (Karras et al. 2024b, eq. 1), D = (x + σ² s)/α (Tweedie)."""
    sde = SubVPSDE()
    x, t, _ = _inputs(sde)
    alpha, sigma = (v[:, None] for v in sde.marginal_coeffs(t))
    D = lambda s: (x + sigma**2 * s) / alpha  # noqa: E731
    s_w = autoguided(MIX.score_fn(sde), WEAK.score_fn(sde), w)(x, t)
    d_main, d_guide = D(MIX.score_t(x, t, sde)), D(WEAK.score_t(x, t, sde))
    torch.testing.assert_close(D(s_w), d_guide + w * (d_main - d_guide), rtol=1e-10, atol=1e-10)


def test_autoguided_unconditional_sampling_sharpens_the_modes():
    """Guiding the exact mixture by its moment-matched Gaussian pushes samples towards the modes."""
    sde = VPSDE()

    def spread(w):
        score = autoguidance_score_fn(MixNet(MIX, sde), MixNet(WEAK, sde), sde, "score", w,
                                      noise_label_kind="time")
        x, _ = sample("dpmpp_2m", score, sde, (2000, 2), steps=20, seed=0, dtype=F64)
        return (x - MIX.means[torch.cdist(x, MIX.means).argmin(1)]).norm(dim=1).mean().item()

    assert spread(2.0) < 0.9 * spread(1.0)


@pytest.mark.parametrize(("guide_kw", "match"), [
    ({"image_size": 2}, "image shape"), ({"in_channels": 3}, "image shape"),
    ({"num_classes": 10}, "conditioning"),
])
def test_autoguide_with_other_shape_or_conditioning_fails_before_sampling(guide_kw, match):
    sde = VPSDE()
    main, guide = MixNet(MIX, sde), MixNet(WEAK, sde, **guide_kw)
    with pytest.raises(ValueError, match=f"autoguidance network must match the main network's {match}"):
        autoguidance_score_fn(main, guide, sde, "score", 2.0, noise_label_kind="time")
    assert main.calls == guide.calls == 0


def test_autoguidance_interval_uses_main_outside():
    sde = VPSDE()
    x, t, _ = _inputs(sde, n=128, seed=4)
    inside = (sde.edm_sigma(t) > 0.5) & (sde.edm_sigma(t) <= 3.0)
    got = autoguidance_score_fn(MixNet(MIX, sde), MixNet(WEAK, sde), sde, "score", 2.5, sigma_lo=0.5,
                                sigma_hi=3.0, noise_label_kind="time")(x, t)
    want = autoguided(MIX.score_fn(sde), WEAK.score_fn(sde), 2.5)(x, t)
    torch.testing.assert_close(got[inside], want[inside], rtol=1e-9, atol=1e-9)
    main = make_score_fn(MixNet(MIX, sde), sde, "score", noise_label_kind="time")(x, t)
    assert torch.equal(got[~inside], main[~inside])
