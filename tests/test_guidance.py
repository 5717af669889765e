"""Guidance against exact answers: with a labelled Gaussian mixture (component k = class k) the
conditional score, the unconditional score and the Bayes classifier p_t(c | x) are all closed-form."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion.guidance import cfg_score_fn, classifier_free, classifier_guided
from pipeline.diffusion.samplers import sample
from pipeline.diffusion.sde import VESDE, VPSDE, SubVPSDE
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64
# Class 0 at the origin, classes 1–3 on a circle of radius 2 around it, all with std 0.7: they overlap.
_ANGLES = torch.tensor([90.0, 210.0, 330.0], dtype=F64) * math.pi / 180
MEANS = torch.cat([torch.zeros(1, 2, dtype=F64), 2 * torch.stack([_ANGLES.cos(), _ANGLES.sin()], 1)])
MIX = GaussianMixture(torch.tensor([0.4, 0.2, 0.2, 0.2], dtype=F64), MEANS,
                      torch.eye(2, dtype=F64).expand(4, 2, 2) * 0.7**2)
NULL = MIX.K  # the "no class" token of the toy network below
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_min=0.01, sigma_max=20.0)}


def _inputs(sde, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.02 + 0.96 * torch.rand(n, generator=g, dtype=F64)
    alpha, sigma = sde.marginal_coeffs(t)
    x0, labels = MIX.sample(n, generator=g, return_labels=True)
    x = alpha[:, None] * x0.double() + sigma[:, None] * torch.randn(n, 2, generator=g, dtype=F64)
    return x, t, labels


def bayes_classifier(sde):
    """Exact logits log π_c + log p_t(x | c); log_softmax of these is log p_t(c | x)."""

    def classifier(x, t):
        cols = [MIX.log_prob_t(x, t, sde, torch.full((x.shape[0],), k)) for k in range(MIX.K)]
        return torch.stack(cols, 1) + MIX.weights.log()

    return classifier


# ---- scores ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", list(SDES))
def test_classifier_free_w0_is_exactly_conditional(sde_name):
    sde = SDES[sde_name]()
    x, t, labels = _inputs(sde)
    cond = MIX.score_fn(sde, label=labels)
    assert torch.equal(classifier_free(cond, MIX.score_fn(sde), 0.0)(x, t), cond(x, t))


@pytest.mark.parametrize("sde_name", list(SDES))
def test_classifier_guidance_with_bayes_classifier_is_conditional_score(sde_name):
    """∇log p_t(x) + ∇log p_t(c | x) = ∇log p_t(x | c) (Song et al. 2021, eq. 14)."""
    sde = SDES[sde_name]()
    x, t, labels = _inputs(sde)
    guided = classifier_guided(MIX.score_fn(sde), bayes_classifier(sde), labels, 1.0)
    expected = MIX.score_t(x, t, sde, labels)
    assert torch.allclose(guided(x, t), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_classifier_free_is_classifier_guidance_by_implicit_classifier(w):
    """(1+w) s_c − w s_∅ = s_∅ + (1+w) ∇log p_t(c | x): CFG at w is guidance at scale 1 + w with the
    classifier implied by the two scores (Ho & Salimans 2022, Sec. 3.2)."""
    sde = VPSDE()
    x, t, labels = _inputs(sde, seed=1)
    cfg = classifier_free(MIX.score_fn(sde, label=labels), MIX.score_fn(sde), w)
    cg = classifier_guided(MIX.score_fn(sde), bayes_classifier(sde), labels, 1.0 + w)
    assert torch.allclose(cfg(x, t), cg(x, t), atol=1e-10, rtol=1e-10)


def test_classifier_guidance_works_under_no_grad():
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    x, t, labels = _inputs(sde)
    guided = classifier_guided(MIX.score_fn(sde), bayes_classifier(sde), labels, 2.0)
    with torch.no_grad():
        out = guided(x, t)
    assert torch.allclose(out, guided(x, t), atol=0, rtol=0)


class ToyNet:
    """An exact 'network' for the mixture: net(x, noise_label, class_labels) in a given output
    parameterisation; label NULL means unconditional. Records the batch size of every call."""

    def __init__(self, sde, parameterization, noise_label_kind):
        self.sde, self.param, self.kind, self.batches = sde, parameterization, noise_label_kind, []

    def _t(self, noise_label):
        if self.kind == "time":
            return noise_label / 999.0
        return self.sde.edm_sigma_inv(torch.exp(4 * noise_label))

    def __call__(self, x, noise_label, class_labels):
        self.batches.append(x.shape[0])
        t = self._t(noise_label)
        cond = MIX.score_t(x, t, self.sde, class_labels.clamp(max=MIX.K - 1))
        score = torch.where((class_labels == NULL)[:, None], MIX.score_t(x, t, self.sde), cond)
        if self.param == "score":
            return score
        return -self.sde.marginal_coeffs(t)[1][:, None] * score  # "eps": ε̂ = −σ score


@pytest.mark.parametrize(("parameterization", "noise_label_kind"), [("score", "time"), ("eps", "log_sigma")])
@pytest.mark.parametrize("w", [0.0, 2.0])
def test_cfg_score_fn_is_one_batched_forward(parameterization, noise_label_kind, w):
    sde = SubVPSDE()
    x, t, labels = _inputs(sde, n=32, seed=2)
    net = ToyNet(sde, parameterization, noise_label_kind)
    fn = cfg_score_fn(net, sde, parameterization, labels, NULL, w, noise_label_kind=noise_label_kind)
    got = fn(x, t)
    expected = classifier_free(MIX.score_fn(sde, label=labels), MIX.score_fn(sde), w)(x, t)
    assert torch.allclose(got, expected, atol=1e-9, rtol=1e-9)
    # One forward pass per score evaluation: 2B rows with guidance, B at w = 0.
    assert net.batches == [64 if w else 32]


# ---- sampling ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_guidance_weight_moves_samples_to_class(sde_name):
    """Sampling class 0 with w ∈ {0, 1, 3}: more samples nearest the class mean, closer to it on average.

    Class 0 sits between the others, so CFG's push away from them concentrates samples on it (for an
    outer class the push overshoots its mean, and only the fraction is monotone).
    """
    sde = SDES[sde_name]()
    fractions, distances = [], []
    for w in (0.0, 1.0, 3.0):
        score = classifier_free(MIX.score_fn(sde, label=0), MIX.score_fn(sde), w)
        x, _ = sample("heun", score, sde, (2000, 2), steps=30, seed=0, dtype=F64)
        fractions.append((torch.cdist(x, MEANS).argmin(1) == 0).double().mean().item())
        distances.append((x - MEANS[0]).norm(dim=1).mean().item())
    # At w = 0 this is the exact class-0 component N(0, 0.49 I): P(nearest mean is 0) ≈ 0.77, E|x| ≈ 0.88.
    assert 0.72 < fractions[0] < 0.82 and abs(distances[0] - 0.7 * math.sqrt(math.pi / 2)) < 0.05
    assert fractions[0] < fractions[1] < fractions[2]
    assert distances[0] > distances[1] > distances[2]


def test_classifier_guided_sampling_through_the_dispatcher():
    """`sample` runs without autograd; classifier guidance still gets its input gradient."""
    sde = VPSDE()
    labels = torch.zeros(500, dtype=torch.long)
    score = classifier_guided(MIX.score_fn(sde), bayes_classifier(sde), labels, 1.0)
    x, nfe = sample("ddim", score, sde, (500, 2), steps=20, seed=0, dtype=F64)
    # Scale 1 with the exact classifier is the class-0 score: samples of N(0, 0.49 I).
    assert nfe == 21 and x.mean(0).abs().max() < 5 * 0.7 / math.sqrt(500) + 0.02
    assert abs(x.var(0).mean() - 0.49) < 5 * 0.49 * math.sqrt(2 / 500) + 0.02


def test_guidance_fraction_grows_for_an_outer_class():
    sde = VPSDE()
    fractions = []
    for w in (0.0, 1.0, 3.0):
        score = classifier_free(MIX.score_fn(sde, label=1), MIX.score_fn(sde), w)
        x, _ = sample("ddim", score, sde, (2000, 2), steps=50, seed=0, dtype=F64)
        fractions.append((torch.cdist(x, MEANS).argmin(1) == 1).double().mean().item())
    assert fractions[0] < fractions[1] <= fractions[2]


# ---- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [-0.5, float("nan"), float("inf")])
def test_negative_or_nonfinite_w_rejected(w):
    sde = VPSDE()
    with pytest.raises(ValueError, match="w must be a finite number >= 0"):
        classifier_free(MIX.score_fn(sde, label=0), MIX.score_fn(sde), w)
    with pytest.raises(ValueError, match="w must be a finite number >= 0"):
        cfg_score_fn(ToyNet(sde, "score", "time"), sde, "score", torch.zeros(4, dtype=torch.long), NULL, w)


def test_negative_scale_rejected():
    sde = VPSDE()
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        classifier_guided(MIX.score_fn(sde), bayes_classifier(sde), torch.zeros(4, dtype=torch.long), -1.0)


def test_label_count_must_match_batch():
    sde = VPSDE()
    x, t, _ = _inputs(sde, n=8)
    five = torch.zeros(5, dtype=torch.long)
    guided = classifier_guided(MIX.score_fn(sde), bayes_classifier(sde), five, 1.0)
    with pytest.raises(ValueError, match="labels has 5 entries for a batch of 8"):
        guided(x, t)
    cfg = cfg_score_fn(ToyNet(sde, "score", "time"), sde, "score", five, NULL, 1.0, noise_label_kind="time")
    with pytest.raises(ValueError, match="class_labels has 5 entries for a batch of 8"):
        cfg(x, t)


def test_labels_must_be_integer_vector():
    sde = VPSDE()
    with pytest.raises(ValueError, match="1-D integer tensor"):
        classifier_guided(MIX.score_fn(sde), bayes_classifier(sde), torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="null_label must be the int label"):
        cfg_score_fn(ToyNet(sde, "score", "time"), sde, "score", torch.zeros(4, dtype=torch.long), None, 1.0)
    with pytest.raises(ValueError, match="parameterization must be one of"):
        cfg_score_fn(ToyNet(sde, "score", "time"), sde, "logits", torch.zeros(4, dtype=torch.long), NULL, 1.0)
