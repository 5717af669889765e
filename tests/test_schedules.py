"""Noise schedules against hand computations: DDPM chains, posteriors, the DDPM↔VP map, σ ladders, grids."""

import math

import numpy as np
import pytest
import torch

from pipeline.diffusion.schedules import (
    DDPMSchedule,
    cosine_alpha_bar,
    cosine_betas,
    karras_sigmas,
    linear_betas,
    ncsn_sigmas,
    time_grid,
)
from pipeline.diffusion.sde import VESDE, VPSDE, CosineVPSDE, SubVPSDE

F64 = torch.float64


def _eq17(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17, written out with numpy."""
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return f / np.cos(s / (1 + s) * np.pi / 2) ** 2


def test_linear_alpha_bar_matches_a_hand_computation():
    sched = DDPMSchedule.linear(1000)
    by_hand = np.prod(1 - np.linspace(1e-4, 0.02, 1000))
    assert sched.alphas_cumprod[-1].item() == pytest.approx(by_hand, rel=1e-12, abs=0)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.036e-05, abs=5e-9)  # Ho et al. 2020 setup
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)),
                               rtol=1e-12)
    # A shorter chain keeps the process: N = 250 uses β ∈ [4e-4, 0.08].
    short = DDPMSchedule.linear(250)
    np.testing.assert_allclose(short.betas.numpy(), np.linspace(4e-4, 0.08, 250), rtol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_matches_eq7_and_gaussian_conditioning(kind):
    sched = DDPMSchedule.linear(1000) if kind == "linear" else DDPMSchedule.cosine(1000)
    beta = sched.betas.numpy()
    abar = np.cumprod(1 - beta)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    # Ho et al. 2020, eq. 7.
    np.testing.assert_allclose(sched.posterior_variance.numpy(), beta * (1 - abar_prev) / (1 - abar),
                               rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(sched.posterior_mean_coef1.numpy(), np.sqrt(abar_prev) * beta / (1 - abar),
                               rtol=1e-12)
    np.testing.assert_allclose(sched.posterior_mean_coef2.numpy(),
                               np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar), rtol=1e-12)
    # Independently: given x0, (x_{t-1}, x_t) is jointly Gaussian with
    #   Var x_{t-1} = 1 - ᾱ_{t-1},  Cov = √α_t (1 - ᾱ_{t-1}),  Var x_t = 1 - ᾱ_t,
    # so x_{t-1} | x_t, x0 has mean √ᾱ_{t-1} x0 + Cov/Var x_t · (x_t - √ᾱ_t x0), variance V - Cov²/Var x_t.
    var_prev, var_t = 1 - abar_prev, 1 - abar
    cov = np.sqrt(1 - beta) * var_prev
    gain = cov / var_t
    cond_var = var_prev - cov**2 / var_t
    np.testing.assert_allclose(sched.posterior_mean_coef2.numpy(), gain, rtol=1e-12)
    np.testing.assert_allclose(sched.posterior_mean_coef1.numpy(), np.sqrt(abar_prev) - gain * np.sqrt(abar),
                               rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(sched.posterior_variance.numpy(), cond_var, rtol=1e-9, atol=1e-15)
    # q_posterior applies them per sample.
    g = torch.Generator().manual_seed(0)
    i = torch.tensor([0, 1, 17, 500, 999])
    x0, xt = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    mean, var, logvar = sched.q_posterior(x0, xt, i)
    ii = i.numpy()
    ref = ((np.sqrt(abar_prev) - gain * np.sqrt(abar))[ii, None] * x0.numpy() + gain[ii, None] * xt.numpy())
    np.testing.assert_allclose(mean.numpy(), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var.numpy()[:, 0], cond_var[ii], rtol=1e-9, atol=1e-15)
    # β̃_1 = 0; the clipped log-variance uses β̃_2 there (improved-diffusion), β̃_t elsewhere.
    np.testing.assert_allclose(logvar.numpy()[:, 0], np.log(cond_var[np.where(ii == 0, 1, ii)]), rtol=1e-9)


def test_cosine_alpha_bar_is_eq17():
    t = np.linspace(0, 1, 101)
    np.testing.assert_allclose(cosine_alpha_bar(torch.tensor(t)).numpy(), _eq17(t), rtol=1e-12, atol=1e-300)
    sched = DDPMSchedule.cosine(1000)
    # ᾱ_i = Π_{j≤i} ᾱ((j+1)/N)/ᾱ(j/N) telescopes to ᾱ((i+1)/N) until the last β is clipped at 0.999.
    i = np.arange(999)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy()[:-1], _eq17((i + 1) / 1000), rtol=1e-12)
    assert sched.betas[-1].item() == 0.999
    assert cosine_betas(1000).max().item() == 0.999


def test_linear_ddpm_chain_is_the_vp_sde_up_to_second_order_in_beta():
    # DDPM's β_j = β(j/(N-1))/N with β(t) = 0.1 + 19.9 t. With t_i = (i+1)/N:
    #   log ᾱ_i = Σ_{j≤i} log(1 - β_j) = -Σβ_j - ½Σβ_j² - R,   0 ≤ R ≤ Σβ_j³ / (3(1 - β_max)),
    #   log α(t_i)² = -∫_0^{t_i} β = -B(t_i),
    #   Σ_{j≤i} β_j - B(t_i) = -(β_1 - β_0)(i+1)(N-1-i) / (2N²(N-1))   (the grid's first-order offset).
    # So the gap is first order (≤ (β_1-β_0)/(8(N-1)) ≈ 2.5e-3) plus second order ½Σβ² (≤ 0.067 at
    # i = N-1); after removing both, what is left is bounded by the third-order term.
    N, b0, b1 = 1000, 0.1, 20.0
    sched = DDPMSchedule.linear(N)
    sde = sched.vp_sde()
    assert isinstance(sde, VPSDE) and (sde.beta_0, sde.beta_1, sde.N) == pytest.approx((b0, b1, N))
    i = np.arange(N)
    t = sched.continuous_time(torch.tensor(i)).numpy()
    np.testing.assert_allclose(t, (i + 1) / N, rtol=1e-15)
    assert torch.equal(sched.discrete_index(torch.tensor(t)), torch.tensor(i))
    alpha, _ = sde.marginal_coeffs(torch.tensor(t, dtype=F64))
    gap = np.log(sched.alphas_cumprod.numpy()) - np.log(alpha.numpy() ** 2)

    beta = (b0 + (b1 - b0) * i / (N - 1)) / N
    first = -(b1 - b0) * (i + 1) * (N - 1 - i) / (2 * N**2 * (N - 1))
    second, third = np.cumsum(beta**2) / 2, np.cumsum(beta**3) / (3 * (1 - beta.max()))
    # Coarse bound: first + second-order terms.
    assert (np.abs(gap) <= np.abs(first) + second / (1 - beta.max()) + 1e-12).all()
    # Sharp: the remainder R is non-negative and bounded by the third-order term.
    remainder = -(gap + first + second)
    assert (remainder >= -1e-12).all() and (remainder <= third + 1e-12).all()
    assert third.max() < 1e-3  # small next to the terms it separates (0.067 and 2.5e-3)


def test_cosine_ddpm_chain_is_the_cosine_vp_sde():
    sched = DDPMSchedule.cosine(1000)
    sde = sched.vp_sde()
    assert isinstance(sde, CosineVPSDE)
    i = torch.arange(999)  # t_i = (i+1)/N ≤ T = 0.999; the last step is clipped
    alpha, _ = sde.marginal_coeffs(sched.continuous_time(i))
    np.testing.assert_allclose(sched.alphas_cumprod[:-1].numpy(), alpha.numpy() ** 2, rtol=1e-12)
    # β = 1 - ratio with ratio ≈ 1 in both: absolute round-off of a few ulps of 1.
    torch.testing.assert_close(sde.discrete_betas, sched.betas, rtol=1e-12, atol=4 * 2.0**-52)


def test_karras_sigmas_follow_the_rho_rule():
    n, lo, hi = 18, 0.002, 80.0
    for rho in (7.0, 3.0, 1.0):
        s = karras_sigmas(n, lo, hi, rho)
        assert s.shape == (n + 1,) and s.dtype == F64
        assert s[0].item() == pytest.approx(hi, rel=1e-12, abs=0)
        # σ = root^ρ: a root off by δ ≈ 8 ulp · σ_max^{1/ρ} moves σ_min by the relative ρ δ / σ_min^{1/ρ}.
        assert s[n - 1].item() == pytest.approx(lo, rel=8 * 2.0**-52 * rho * (hi / lo) ** (1 / rho), abs=0)
        assert s[n].item() == 0.0
        assert (s.diff() < 0).all()
        # Karras et al. 2022, eq. 5: σ_i^{1/ρ} is linear in i.
        # Round-off of hi + r (lo - hi) is a few ulps of the larger end, σ_max^{1/ρ}.
        root = s[:-1].numpy() ** (1 / rho)
        np.testing.assert_allclose(root, np.linspace(hi ** (1 / rho), lo ** (1 / rho), n), rtol=1e-13,
                                   atol=8 * 2.0**-52 * hi ** (1 / rho))
    np.testing.assert_allclose(karras_sigmas(1, lo, hi).numpy(), [hi, 0.0])


def test_ncsn_sigmas_are_geometric():
    s = ncsn_sigmas(0.01, 50.0, 232).numpy()
    assert s.shape == (232,)
    assert s[0] == pytest.approx(50.0, rel=1e-12, abs=0) and s[-1] == pytest.approx(0.01, rel=1e-12, abs=0)
    ratio = s[1:] / s[:-1]
    np.testing.assert_allclose(ratio, (0.01 / 50.0) ** (1 / 231), rtol=1e-12)


SDES = [VPSDE(), SubVPSDE(), VESDE(), CosineVPSDE()]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["uniform", "karras"])
def test_time_grid_endpoints_and_monotone(sde, kind):
    eps, n = 1e-3, 20
    t = time_grid(sde, n, eps=eps, kind=kind)
    assert t.shape == (n + 1,) and t.dtype == F64
    assert t[0].item() == sde.T and t[-1].item() == eps
    assert (t.diff() < 0).all()
    if kind == "uniform":
        np.testing.assert_allclose(t.diff().numpy(), -(sde.T - eps) / n, rtol=1e-10)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: s.name)
@pytest.mark.parametrize("rho", [7.0, 2.0])
def test_karras_time_grid_spaces_edm_sigma_by_the_rho_rule(sde, rho):
    eps, n = 1e-3, 16
    t = time_grid(sde, n, eps=eps, kind="karras", rho=rho)
    sig = sde.edm_sigma(t).numpy()
    ends = sde.edm_sigma(torch.tensor([sde.T, eps], dtype=F64)).numpy()
    ref = np.linspace(ends[0] ** (1 / rho), ends[1] ** (1 / rho), n + 1)
    np.testing.assert_allclose(sig ** (1 / rho), ref, rtol=1e-9)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: linear_betas(10, 0.02, 1e-4), "beta_start"),
        (lambda: cosine_betas(10, s=0.0), "s"),
        (lambda: DDPMSchedule(torch.tensor([0.1, 1.0])), "betas"),
        (lambda: ncsn_sigmas(1.0, 0.5), "sigma_min"),
        (lambda: ncsn_sigmas(0.01, 50.0, L=1), "L"),
        (lambda: karras_sigmas(0), "n"),
        (lambda: karras_sigmas(5, 1.0, 0.5), "sigma_min"),
        (lambda: karras_sigmas(5, rho=0.0), "rho"),
        (lambda: time_grid(VPSDE(), 0), "steps"),
        (lambda: time_grid(VPSDE(), 10, eps=0.0), "eps"),
        (lambda: time_grid(CosineVPSDE(), 10, eps=0.9995), "eps"),
        (lambda: time_grid(VPSDE(), 10, kind="linear"), "kind"),
    ],
)
def test_bad_schedule_arguments_raise(call, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        call()


def test_time_grid_eps_scale():
    # eps close to T still gives a valid grid (t = eps is inside (0, T)).
    t = time_grid(VPSDE(), 4, eps=0.9)
    assert t[-1].item() == 0.9 and math.isclose(t[0].item(), 1.0)
