"""The exact discrete chain (`DDPMChain`): ᾱ at its timesteps, the continuous-time convention, labels,
the PF-ODE and the discrete VLB on it, respaced timesteps, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.diffusion.chain import DDPMChain, chain_max_log_gap
from pipeline.diffusion.elbo import continuous_elbo, ddpm_elbo, eps_fn_from_score
from pipeline.diffusion.likelihood import ode_likelihood
from pipeline.diffusion.param import make_score_fn, noise_label
from pipeline.diffusion.respace import chain_timesteps
from pipeline.diffusion.samplers import sample
from pipeline.diffusion.schedules import DDPMSchedule
from pipeline.diffusion.sde import VPSDE, build_sde
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64

# Pinned ᾱ_i at fixed timesteps, in the manner of diffusers' scheduler tests (float64 tables).
PINNED = {
    "linear": {0: 0.9999, 1: 0.9997800920720721, 249: 0.5240853738253606, 499: 0.07858724288177824,
               999: 4.0358297653756754e-05},
    "cosine": {0: 0.999958715775178, 249: 0.8470121613269047, 499: 0.49384359044063775,
               999: 2.4287669070348542e-09},
}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_is_the_chains_at_every_timestep(schedule):
    chain = DDPMChain(schedule)
    betas = chain.betas.numpy()
    want = np.cumprod(1.0 - betas)  # ᾱ_i = Π_{j≤i} (1-β_j), computed apart from the class
    t = chain.timestep_time(torch.arange(chain.N))
    assert torch.equal(t, (torch.arange(chain.N, dtype=F64) + 1) / 1000)  # t_i = (i+1)/N
    alpha, sigma = chain.marginal_coeffs(t)
    np.testing.assert_allclose(alpha.numpy() ** 2, want, rtol=1e-14, atol=0)
    np.testing.assert_allclose(sigma.numpy() ** 2, 1 - want, rtol=1e-12, atol=0)
    for i, v in PINNED[schedule].items():
        assert float(alpha[i]) ** 2 == pytest.approx(v, rel=1e-13)
    # Float32 times hit the same table (their round-off is snapped to the grid).
    a32, _ = chain.marginal_coeffs(t.float())
    np.testing.assert_allclose(a32.double().numpy() ** 2, want, rtol=2e-7)


def test_the_continuous_convention_interpolates_log_alpha_bar_linearly():
    chain = DDPMChain("linear", N=10, beta_start=0.01, beta_end=0.3)
    L = np.concatenate([[0.0], np.cumsum(np.log1p(-chain.betas.numpy()))])  # log ᾱ at t_k = k/N
    t = torch.tensor([0.0, 0.03, 0.25, 0.5, 0.99, 1.0], dtype=F64)
    alpha, sigma = chain.marginal_coeffs(t)
    want = np.interp(t.numpy(), np.arange(11) / 10, L)
    np.testing.assert_allclose(2 * np.log(alpha.numpy()), want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(sigma.numpy() ** 2, -np.expm1(want), rtol=1e-12, atol=1e-15)
    assert float(alpha[0]) == 1.0 and float(sigma[0]) == 0.0  # t = 0 is the data
    # The SDE's β(t) is d(-log ᾱ)/dt: check against a finite difference inside a step.
    h = 1e-6
    beta = chain.beta(torch.tensor([0.234], dtype=F64))
    grid = np.arange(11) / 10
    fd = -(np.interp(0.234 + h, grid, L) - np.interp(0.234 - h, grid, L)) / (2 * h)
    assert float(beta) == pytest.approx(fd, rel=1e-8)
    # edm_sigma_inv inverts σ̃(t) on and between grid points.
    tt = torch.linspace(0.001, 1.0, 97, dtype=F64)
    torch.testing.assert_close(chain.edm_sigma_inv(chain.edm_sigma(tt)), tt, rtol=0, atol=1e-12)


def test_the_vp_sde_is_not_the_linear_chain():
    """The issue's numbers: VPSDE(0.1, 20) misses the linear chain's log ᾱ by 6.8% at worst."""
    chain = DDPMChain("linear")
    from_schedule = DDPMChain.from_schedule(DDPMSchedule.linear(1000))
    assert torch.equal(from_schedule.alphas_cumprod, chain.alphas_cumprod)
    assert chain.alphas_cumprod[999].item() == pytest.approx(4.0358e-05, rel=1e-4)
    assert chain_max_log_gap(chain, VPSDE(0.1, 20)) == pytest.approx(0.0677, abs=5e-4)
    assert chain_max_log_gap(chain, chain) < 1e-13


def test_integer_timestep_labels():
    chain = DDPMChain("linear")
    i = torch.arange(1000)
    for dtype in (F64, torch.float32):
        t = chain.timestep_time(i).to(dtype)
        labels = noise_label(chain, t, "time")
        assert labels.dtype == dtype and torch.equal(labels, i.to(dtype))
    # Between grid points the label is continuous: N t - 1.
    assert float(chain.time_label(torch.tensor([0.5005], dtype=F64))) == pytest.approx(499.5, abs=1e-9)
    # The VP SDE keeps score_sde's 999·t.
    assert float(noise_label(VPSDE(), torch.tensor([1.0]), "time")) == pytest.approx(999.0)


def test_build_sde_rebuilds_the_chain_from_its_config():
    for chain in (DDPMChain("linear"), DDPMChain("cosine", N=50), DDPMChain("custom", betas=[0.1, 0.2, 0.3]),
                  DDPMChain("scaled_linear", beta_start=0.00085, beta_end=0.012)):
        cfg = chain.config()
        again = build_sde(cfg.pop("name"), **cfg)
        assert isinstance(again, DDPMChain) and torch.equal(again.alphas_cumprod, chain.alphas_cumprod)


def test_spacings_match_diffusers_integer_rules():
    # Values from diffusers' set_timesteps formulas for N = 1000, n = 50 (and n = 3 for half-even rounding).
    assert chain_timesteps(1000, 50, "leading")[:3] == [980, 960, 940]
    assert chain_timesteps(1000, 50, "leading", steps_offset=1)[-2:] == [21, 1]
    trailing = chain_timesteps(1000, 50, "trailing")
    assert trailing[:2] == [999, 979] and trailing[-1] == 19
    assert chain_timesteps(1000, 50, "linspace")[:3] == [999, 979, 958]
    assert chain_timesteps(1000, 3, "linspace") == [999, 500, 0]  # 499.5 rounds half to even
    assert chain_timesteps(1000, 1000, "leading") == list(range(999, -1, -1))


def test_bad_chain_input_is_refused():
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\) at every timestep, got β_1 = 1.0"):
        DDPMChain("custom", betas=[0.1, 1.0, 0.2])
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\).*β_0 = -0.1"):
        DDPMChain("custom", betas=[-0.1, 0.2])
    with pytest.raises(ValueError, match="β increasing"):
        DDPMChain("linear", beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="schedule must be one of"):
        DDPMChain("sigmoid")
    with pytest.raises(ValueError, match="spacing must be one of"):
        chain_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match=r"steps must be an int in \[1, N=1000\]"):
        chain_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="first timestep at 1000"):
        chain_timesteps(1000, 1000, "leading", steps_offset=1)
    score = lambda x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match="spacing must be one of"):
        sample("ddim", score, DDPMChain("linear"), (2, 2), steps=10, seed=0, spacing="quadratic")
    with pytest.raises(ValueError, match="steps_offset is an option of sampling an exact discrete chain"):
        sample("ddim", score, VPSDE(), (2, 2), steps=10, seed=0, steps_offset=1)


# ---- likelihoods on the chain ---------------------------------------------------------------------


def test_pf_ode_is_a_density_of_the_interpolated_chain_and_below_the_discrete_vlb():
    """Gaussian data, exact scores of the interpolated process: the PF-ODE log-density equals the data's
    own (it is a density of the interpolated process), and the chain's discrete VLB is an upper bound
    on the NLL that the ODE's NLL does not exceed."""
    chain = DDPMChain("linear", N=200, beta_start=5e-4, beta_end=0.1)  # the 1000-step chain, 200 steps
    data = GaussianMixture.isotropic(torch.tensor([[0.3, -0.2, 0.1]], dtype=F64), 0.4)
    x = data.sample(16, generator=torch.Generator().manual_seed(0)).double()
    true_nll = -data.log_prob(x)
    res = ode_likelihood(data.score_fn(chain), chain, x, trace="exact", rtol=1e-6, atol=1e-6, eps=1e-5)
    ode_nll = -res.logp
    # The adaptive solver stops at each of the 200 kinks of β(t); at rtol = 1e-6 it lands within 1.2e-2
    # nats (VPSDE(0.1, 20) on the same data: 5e-3), and a wrong convention misses by far more.
    assert ode_nll.dtype == F64 and (ode_nll - true_nll).abs().max() < 2e-2
    # The chain's own discrete VLB (one noise draw per step: a Monte Carlo estimate, so compare means
    # within 3 standard errors): an upper bound on the NLL, close to it with exact scores and σ² = β.
    xs = data.sample(256, generator=torch.Generator().manual_seed(2)).double()
    bound = ddpm_elbo(eps_fn_from_score(data.score_fn(chain), chain), chain, xs, decoder="gaussian",
                      generator=torch.Generator().manual_seed(1))
    gap = bound.nats - (-data.log_prob(xs))
    se = float(gap.std()) / math.sqrt(gap.numel())
    assert -3 * se < float(gap.mean()) < 0.1 + 3 * se


def test_continuous_elbo_accepts_the_chain():
    """The continuous bound of the interpolated process: with exact scores it equals the NLL in
    expectation (Song et al. 2021, Thm. 3 is tight at the true score), within Monte Carlo error."""
    chain = DDPMChain("linear", N=200, beta_start=5e-4, beta_end=0.1)
    data = GaussianMixture.isotropic(torch.tensor([[0.3, -0.2, 0.1]], dtype=F64), 0.4)
    x = data.sample(64, generator=torch.Generator().manual_seed(4)).double()
    res = continuous_elbo(data.score_fn(chain), chain, x, n_samples=64,
                          generator=torch.Generator().manual_seed(5))
    gap = res.nats - (-data.log_prob(x))
    se = float(res.nats_stderr.pow(2).mean().sqrt()) / math.sqrt(x.shape[0])
    assert abs(float(gap.mean())) < 4 * se + 0.01


def test_pc_on_a_chain_needs_its_own_steps():
    with pytest.raises(ValueError, match="pc on a ddpm-chain needs steps == N = 1000"):
        sample("pc", lambda x, t: -x, DDPMChain("linear"), (2, 2), steps=100, seed=0)


def test_chain_sampling_recovers_gaussian_data_with_a_chain_trained_eps_net():
    """A network that takes integer labels: ε̂(x, i) exact for Gaussian data N(m, s² I); sampling the
    chain with it on all 1000 timesteps (ancestral β and β̃, DDIM) recovers mean and std. (At 50 steps
    ancestral sampling with β̃ is known to shrink the spread, std 0.447 here; not a test of the chain.)"""
    chain = DDPMChain("linear")
    m, s = 0.7, 0.5
    abar = chain.alphas_cumprod

    def net(x, labels, _cls=None):
        i = labels.round().long()
        assert torch.equal(labels, i.to(labels.dtype))  # integer labels on the chain's timesteps
        ab = abar[i].to(x.dtype).reshape(-1, 1)
        var = ab * s**2 + 1 - ab
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / var  # E[ε | x_i]

    score = make_score_fn(net, chain, "eps", noise_label_kind="time")
    for method, opts in (("ancestral", {"variance": "beta"}), ("ancestral", {}), ("ddim", {"eta": 0.0})):
        x, nfe = sample(method, score, chain, (4000, 1), steps=1000, seed=3, dtype=F64, **opts)
        assert nfe == 1000
        assert abs(float(x.mean()) - m) < 5 * s / math.sqrt(4000)
        assert abs(float(x.std()) - s) < 5 * s / math.sqrt(2 * 4000), (method, float(x.std()))
