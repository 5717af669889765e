"""Variational bounds against exact Gaussian log-likelihoods."""

import math

import pytest
import torch
from scipy.stats import norm

from pipeline.diffusion.elbo import (
    continuous_elbo,
    ddpm_elbo,
    discretized_gaussian_log_likelihood,
    eps_fn_from_score,
    normal_kl,
)
from pipeline.diffusion.schedules import DDPMSchedule
from pipeline.diffusion.sde import VESDE, VPSDE, SubVPSDE
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64


def gaussian(d: int = 4, seed: int = 0) -> tuple[GaussianMixture, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    M = 0.3 * torch.randn(d, d, generator=g, dtype=F64)
    cov = M @ M.T + 0.05 * torch.eye(d, dtype=F64)
    mu = torch.full((d,), 0.3, dtype=F64)
    return GaussianMixture(torch.ones(1, dtype=F64), mu[None], cov[None]), mu, cov


def exact_chain_eps(schedule: DDPMSchedule, mu: torch.Tensor, cov: torch.Tensor):
    """E[ε | x_t] of the discrete chain for data N(μ, Σ): q(x_t) = N(√ᾱ_t μ, ᾱ_t Σ + (1-ᾱ_t) I)."""
    ab = schedule.alphas_cumprod
    eye = torch.eye(mu.shape[0], dtype=F64)

    def eps_fn(x, i):
        a, s = ab[i].sqrt(), (1 - ab[i]).sqrt()
        C = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * eye
        score = -torch.linalg.solve(C, (x - a[:, None] * mu).unsqueeze(-1)).squeeze(-1)
        return -s[:, None] * score

    return eps_fn


def test_ddpm_bound_holds_and_its_gap_shrinks_with_the_number_of_steps():
    # Narrow data (variances 0.005-0.1, like pixels given their neighbours): the reverse kernels of
    # a 10-step chain are far from the fixed variances β_t, so the gap at N = 10 is large.
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 4, generator=g, dtype=F64)
    cov = 0.05 * (M @ M.T / 4 + 0.1 * torch.eye(4, dtype=F64))
    mu = torch.full((4,), 0.3, dtype=F64)
    gm = GaussianMixture(torch.ones(1, dtype=F64), mu[None], cov[None])
    B, R = 300, 4  # each point's bound averaged over R noise draws
    x = gm.sample(B, generator=torch.Generator().manual_seed(1)).double()
    nll = -gm.log_prob(x)
    gaps = {}
    for N in (10, 100, 1000):
        sched = DDPMSchedule.cosine(N)
        res = ddpm_elbo(exact_chain_eps(sched, mu, cov), sched, x.repeat(R, 1), variance="beta",
                        decoder="gaussian", generator=torch.Generator().manual_seed(2))
        gap = res.nats.reshape(R, B).mean(0) - nll
        gaps[N] = (float(gap.mean()), float(gap.std() / math.sqrt(B)))
        assert res.terms.shape == (R * B, N + 1) and res.nfe == N
        assert torch.allclose(res.terms.sum(1), res.bpd)
    for N, (mean, se) in gaps.items():
        assert mean > -3 * se, f"N={N}: the bound is below the exact NLL by {-mean:.3f} ± {se:.3f} nats"
    (g10, s10), (g100, s100), (g1000, s1000) = gaps[10], gaps[100], gaps[1000]
    assert g10 - g100 > 3 * math.hypot(s10, s100)
    assert g1000 < g100 + 3 * math.hypot(s100, s1000)
    assert g10 > 0.25 * 4 and g1000 < 0.1 * 4  # from > 0.25 to < 0.1 nats/dim


def test_ddpm_bound_from_a_score_model_through_eps_fn_from_score():
    gm, _, _ = gaussian()
    B = 200
    x = gm.sample(B, generator=torch.Generator().manual_seed(3)).double()
    sched = DDPMSchedule.linear(100)
    eps_fn = eps_fn_from_score(gm.score_fn(sched.vp_sde()), sched)
    res = ddpm_elbo(eps_fn, sched, x, decoder="gaussian", generator=torch.Generator().manual_seed(4))
    gap = res.nats + gm.log_prob(x)
    assert gap.mean() > -3 * gap.std() / math.sqrt(B)
    assert gap.mean() < 0.1 * 4


def test_prior_term_and_decoder_against_reference_formulas():
    gm, mu, cov = gaussian()
    x = gm.sample(5, generator=torch.Generator().manual_seed(5)).double()
    sched = DDPMSchedule.linear(50)
    res = ddpm_elbo(exact_chain_eps(sched, mu, cov), sched, x, decoder="gaussian",
                    generator=torch.Generator().manual_seed(6))
    ab = float(sched.alphas_cumprod[-1])
    # KL(N(√ᾱ x, (1-ᾱ)I) ‖ N(0, I)) = ½ Σ (ᾱ x² + (1-ᾱ) - 1 - log(1-ᾱ)), in bits/dim.
    kl = 0.5 * (ab * x**2 - ab - math.log(1 - ab)).sum(1) / (4 * math.log(2))
    assert torch.allclose(res.prior_bpd, kl, rtol=1e-10)
    # normal_kl against the textbook closed form for scalars.
    m1, v1, m2, v2 = 0.3, 0.2, -0.1, 0.5
    ref = math.log(math.sqrt(v2 / v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    m1_, lv1, m2_, lv2 = (torch.tensor(v, dtype=F64) for v in (m1, math.log(v1), m2, math.log(v2)))
    got = normal_kl(m1_, lv1, m2_, lv2)
    assert float(got) == pytest.approx(ref, rel=1e-12)


def test_discretized_decoder_is_a_distribution_over_the_levels():
    L = 17
    grid = torch.linspace(-1, 1, L, dtype=F64)
    for mean, log_scale in ((0.1, math.log(0.3)), (0.95, math.log(0.01)), (-3.0, math.log(0.2))):
        ll = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean),
                                                 torch.full_like(grid, log_scale), L)
        assert float(ll.exp().sum()) == pytest.approx(1.0, abs=1e-12)
        # Inner bins: Φ((x + Δ/2 - μ)/s) - Φ((x - Δ/2 - μ)/s) by scipy.
        s, h = math.exp(log_scale), 1 / (L - 1)
        k = 5
        ref = norm.cdf((grid[k] + h - mean) / s) - norm.cdf((grid[k] - h - mean) / s)
        if ref > 1e-300:
            assert float(ll[k]) == pytest.approx(math.log(ref), rel=1e-9)
    # Far in a tail the log-probability stays finite and matches log(sf difference).
    x = torch.tensor([0.5], dtype=F64)
    ll = discretized_gaussian_log_likelihood(x, torch.tensor([-0.5], dtype=F64),
                                             torch.tensor([math.log(0.05)], dtype=F64), 256)
    ref = math.log(norm.sf((0.5 - 1 / 255 + 0.5) / 0.05) - norm.sf((0.5 + 1 / 255 + 0.5) / 0.05))
    assert float(ll) == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_continuous_bound_holds_and_is_tight_for_the_exact_score(sde):
    gm, _, _ = gaussian()
    B, d = 64, 4
    x = gm.sample(B, generator=torch.Generator().manual_seed(7)).double()
    res = continuous_elbo(gm.score_fn(sde), sde, x, n_samples=64, generator=torch.Generator().manual_seed(8))
    assert res.samples.shape == (B, 64) and res.nfe == 64
    gap = res.nats + gm.log_prob(x)
    se = float(gap.std() / math.sqrt(B))
    # With the exact score the model's path measure is the forward one: the bound is tight up to the
    # prior mismatch and the eps cut-off, so the gap is 0 within Monte Carlo error, and never below.
    assert float(gap.mean()) > -3 * se
    assert float(gap.mean()) < 3 * se + 0.01 * d
    assert torch.allclose(res.bpd, res.nats / (d * math.log(2)))
    assert torch.allclose(res.bpd_stderr, res.samples.std(1) / 8 / (d * math.log(2)))


def test_continuous_bound_with_dequantisation_matches_the_hand_formula():
    D, L, s = 8, 17, 0.5
    gm = GaussianMixture.isotropic(torch.zeros(1, D), s)
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, D, generator=g, dtype=F64) * s).clamp(-1, 1)
    x = torch.round((x + 1) * (L - 1) / 2) * 2 / (L - 1) - 1
    delta = 2 / (L - 1)
    res = continuous_elbo(gm.score_fn(sde), sde, x, n_samples=32, dequantize={"levels": L}, generator=g)
    # -log P(k) ≈ -E_u log N(x + (u-½)Δ) - D log Δ, and E_u log N = log N(x) - DΔ²/(24 s²).
    expected = -(gm.log_prob(x) - D * delta**2 / (24 * s**2) + D * math.log(delta)) / (D * math.log(2))
    diff = res.bpd - expected
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(32) + 0.01


def test_bad_input_is_rejected():
    gm, _, _ = gaussian(d=2)
    x = torch.zeros(3, 2, dtype=F64)
    sched = DDPMSchedule.linear(50)
    eps_fn = eps_fn_from_score(gm.score_fn(sched.vp_sde()), sched)
    for kwargs, word in [(dict(variance="learned"), "variance"), (dict(decoder="laplace"), "decoder"),
                         (dict(decoder="discretized", levels=256), "grid"),
                         (dict(decoder="discretized", levels=1), "levels")]:
        with pytest.raises(ValueError, match=word):
            ddpm_elbo(eps_fn, sched, x + 0.001, **kwargs)
    with pytest.raises(ValueError, match="schedule"):
        ddpm_elbo(eps_fn, VPSDE(), x)
    with pytest.raises(ValueError, match="shape"):
        ddpm_elbo(eps_fn, sched, torch.zeros(3))
    sde = VPSDE()
    for kwargs, word in [(dict(n_samples=0), "n_samples"), (dict(eps=2.0), "eps"),
                         (dict(sigma_data=0.0), "sigma_data"),
                         (dict(dequantize={"levels": 17, "k": 2}), "dequantize"),
                         (dict(dequantize={"levels": 17}, x=torch.full((3, 2), 2.0)), "data range")]:
        kw = {"x": x, **kwargs}
        with pytest.raises(ValueError, match=word):
            continuous_elbo(gm.score_fn(sde), sde, **kw)
