"""Inverse problems against the closed-form Gaussian posterior of linear Gaussian measurements."""

import math

import pytest
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from pipeline.diffusion.inverse import (
    ClassMixture,
    Colorization,
    Inpainting,
    SuperResolution,
    helmert,
    linear_matrix,
    sample_posterior,
    sample_replacement,
    sample_smc,
)
from pipeline.diffusion.sde import VPSDE
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64
IMG = (3, 2, 2)
D = 12
MU = torch.linspace(-0.5, 0.5, D, dtype=F64)
GAUSS = GaussianMixture(torch.ones(1, dtype=F64), MU[None], torch.eye(D, dtype=F64)[None])  # N(μ, I)
MASK = torch.zeros(IMG)
MASK[0, 0, :] = 1
MASK[1, :, 0] = 1
MASK[2, 1, 1] = 1
OPERATORS = {"inpainting": lambda: Inpainting(MASK), "colorization": Colorization,
             "super_resolution": lambda: SuperResolution(2)}
N = 4000
# Discretisation allowance added to 5 standard errors: measured errors of the exact-score runs below are
# ≤ 0.025 on means and ≤ 0.07 on covariance entries (PC, 500 steps) / 0.06 (Euler–Maruyama, 500 steps).
MEAN_ALLOW, COV_ALLOW = 0.01, 0.03


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _posterior(op, sigma_y, seed=0):
    """y for a fixed x*, and the exact posterior N(m, S) of x | y under the prior N(μ, I)."""
    g = _gen(seed)
    x_star = (MU + torch.randn(D, generator=g, dtype=F64)).reshape(1, *IMG)
    A = linear_matrix(op, (1, *IMG))
    y = op.measure(x_star)
    yv = y.flatten()
    eye = torch.eye(D, dtype=F64)
    if sigma_y > 0:
        yv = yv + sigma_y * torch.randn(yv.shape, generator=g, dtype=F64)
        S = torch.linalg.inv(eye + A.T @ A / sigma_y**2)
        m = S @ (MU + A.T @ yv / sigma_y**2)
    else:  # conditioning on A x = y exactly (pinv: inpainting's A has zero rows for unknown pixels)
        K = A.T @ torch.linalg.pinv(A @ A.T)
        m, S = MU + K @ (yv - A @ MU), eye - K @ A
    return yv.reshape(y.shape), m, S


def _assert_matches(x, m, S):
    x = x.reshape(x.shape[0], -1).double()
    n = x.shape[0]
    se_m = (S.diagonal() / n).sqrt()
    se_C = ((S.diagonal()[:, None] * S.diagonal()[None] + S**2) / n).sqrt()
    mean_err, cov_err = (x.mean(0) - m).abs(), (torch.cov(x.T) - S).abs()
    assert (mean_err <= 5 * se_m + MEAN_ALLOW).all(), (mean_err.max(), se_m.max())
    assert (cov_err <= 5 * se_C + COV_ALLOW).all(), (cov_err.max(), se_C.max())


def test_measurement_operators_are_orthogonal_transforms_with_A_At_equal_c_I():
    H = helmert(9)
    torch.testing.assert_close(H @ H.T, torch.eye(9, dtype=F64))
    x = torch.randn(2, *IMG, generator=_gen(1), dtype=F64)
    for name, make in OPERATORS.items():
        op = make()
        torch.testing.assert_close(op.from_u(op.to_u(x)), x, msg=name)
        torch.testing.assert_close(op.to_u(x).pow(2).sum(), x.pow(2).sum(), msg=name)  # orthogonal
        A = linear_matrix(op, (1, *IMG))
        G = A @ A.T
        rows = G.diagonal() > 0  # inpainting: the unknown pixels give zero rows
        torch.testing.assert_close(G[rows][:, rows], op.c * torch.eye(int(rows.sum()), dtype=F64), msg=name)
        # lift(y) is the measured part of Q x
        u, u_y = op.to_u(x), op.lift(op.measure(x), x.shape)
        known = op.known(u).expand_as(u)
        torch.testing.assert_close(u_y[known], u[known], msg=name)
    torch.testing.assert_close(Colorization().measure(x), x.mean(1, keepdim=True))
    torch.testing.assert_close(SuperResolution(2).measure(x), x.reshape(2, 3, 1, 2, 1, 2).mean((3, 5)))


@pytest.mark.parametrize("name", list(OPERATORS))
def test_replacement_reproduces_the_posterior_when_measured_and_unmeasured_parts_are_independent(name):
    # Prior N(μ, I) is isotropic, so in u = Q x the known and unknown coordinates are independent: there
    # the replacement method is exact (module docstring), and its samples must match N(m, S).
    # One measurement y [1, ...] serves the whole batch.
    op = OPERATORS[name]()
    y, m, S = _posterior(op, 0.0)
    sde = VPSDE()
    x, nfe = sample_replacement(GAUSS.score_fn(sde), sde, op, y.float(), (N, *IMG), steps=500, seed=1)
    assert nfe == 1000 and x.shape == (N, *IMG)
    torch.testing.assert_close(op.measure(x.double()), y.expand(N, *y.shape[1:]), atol=1e-6, rtol=0)
    _assert_matches(x, m, S)


def test_replacement_is_biased_where_theory_says():
    # x = (k, u) ~ N(0, [[1, ρ], [ρ, 1]]), k known = y. True posterior u | y ~ N(ρy, 1 − ρ²). Without
    # corrector and in the small-step limit, replacement runs u's reverse SDE with the joint score at
    # k_t = α(t) y (the fresh noise of the replaced k averages out), a linear SDE whose mean and variance
    # solve dm/dt = ½βm − β(P_uu m + P_uk α y), dv/dt = 2(½β − βP_uu) v + β backwards from (0, 1) at T,
    # P = (α²Σ + σ²I)⁻¹. The sampler lands on that limit, not on the posterior.
    sde, rho, y0, eps, n = VPSDE(), 0.9, 1.5, 1e-3, 20000
    cov = torch.tensor([[1, rho], [rho, 1]], dtype=F64)
    gauss = GaussianMixture(torch.ones(1, dtype=F64), torch.zeros(1, 2, dtype=F64), cov[None])

    def moments(t, mv):
        tt = torch.tensor([t], dtype=F64)
        alpha, sigma = (c.item() for c in sde.marginal_coeffs(tt))
        beta = sde.beta(tt).item()
        P = torch.linalg.inv(alpha**2 * cov + sigma**2 * torch.eye(2, dtype=F64))
        drift = 0.5 * beta - beta * P[1, 1].item()
        return [-(drift * mv[0] - beta * P[1, 0].item() * alpha * y0), -(2 * drift * mv[1] + beta)]

    m_lim, v_lim = solve_ivp(moments, [sde.T, eps], [0.0, 1.0], rtol=1e-10, atol=1e-12).y[:, -1]
    y = torch.tensor([y0, 0.0]).reshape(1, 1, 1, 2).expand(n, 1, 1, 2)
    x, _ = sample_replacement(gauss.score_fn(sde), sde, Inpainting(torch.tensor([[[1.0, 0.0]]])), y,
                              (n, 1, 1, 2), steps=500, seed=3, eps=eps, n_corrector=0)
    u = x[:, 0, 0, 1].double()
    se_m, se_v = math.sqrt(v_lim / n), v_lim * math.sqrt(2 / (n - 1))
    assert abs(u.mean() - m_lim) < 5 * se_m + 0.01 and abs(u.var() - v_lim) < 5 * se_v + 0.01
    # The bias: measured mean 0.94 and variance 0.31 against the posterior's 1.35 and 0.19.
    assert rho * y0 - u.mean() > 50 * se_m and u.var() - (1 - rho**2) > 20 * se_v


@pytest.mark.parametrize("name", list(OPERATORS))
def test_pigdm_reproduces_the_posterior_of_a_noisy_measurement(name):
    # For N(μ, I) data with the exact score, ΠGDM's p(y | x_t) = N(A x̂₀, r_t² A Aᵀ + σ_y² I) is exact, so
    # the guided reverse SDE samples N(m, S) up to discretisation.
    op, sigma_y, sde = OPERATORS[name](), 0.2, VPSDE()
    y, m, S = _posterior(op, sigma_y)
    y_batch = y.expand(N, *y.shape[1:]).float()
    x, nfe = sample_posterior("euler_maruyama", GAUSS.score_fn(sde), sde, op, y_batch, (N, *IMG),
                              sigma_y=sigma_y, steps=500, seed=2)
    assert nfe == 501
    _assert_matches(x, m, S)
    # Power: the posterior is far from the prior (a sampler ignoring y would fail the mean check).
    assert (m - MU).abs().max() > 0.3


def test_smc_reproduces_the_gaussian_posterior():
    # With ΠGDM's twisting exact (N(μ, I) data, exact score) the weights only correct discretisation.
    op, sigma_y, sde = Inpainting(MASK), 0.2, VPSDE()
    y, m, S = _posterior(op, sigma_y)
    x, nfe = sample_smc(GAUSS.score_fn(sde), sde, op, y.float(), (N, *IMG), sigma_y=sigma_y, steps=200,
                        seed=3, particles=4)
    assert nfe == 201 and x.shape == (N, *IMG)
    _assert_matches(x, m, S)


# Two classes in 2-D (a [1, 1, 2] image): x₀ is measured with noise, x₁ is not and tells the class apart.
TWO = GaussianMixture(torch.tensor([0.3, 0.7], dtype=F64),
                      torch.tensor([[-0.5, -1.5], [0.5, 1.5]], dtype=F64),
                      torch.eye(2, dtype=F64).expand(2, 2, 2) * 0.3**2)


def _two_class_posterior(y0: float, sigma_y: float) -> tuple[Tensor, Tensor, Tensor]:
    """p(c | y) [2], and the posterior mean and variance of x [2] under the mixture: per class x₀ | y is
    the scalar Gaussian update and x₁ keeps its prior (the components are isotropic)."""
    tau2, mu = 0.3**2, TWO.means
    p_c = torch.softmax(TWO.weights.log() - (y0 - mu[:, 0]) ** 2 / (2 * (tau2 + sigma_y**2)), 0)
    gain = tau2 / (tau2 + sigma_y**2)
    m_c = torch.stack([mu[:, 0] + gain * (y0 - mu[:, 0]), mu[:, 1]], 1)  # [class, coordinate]
    v_c = torch.tensor([tau2 * (1 - gain), tau2], dtype=F64).expand(2, 2)
    mean = (p_c[:, None] * m_c).sum(0)
    var = (p_c[:, None] * (v_c + m_c**2)).sum(0) - mean**2
    return p_c, mean, var


@pytest.mark.parametrize("prior", ["class mixture", "unconditional score"])
def test_smc_samples_the_class_posterior_of_a_mixture_where_pigdm_is_biased(prior):
    # ΠGDM approximates p(x₀ | x_t) by one Gaussian around the mixture's mean, which misjudges how well
    # each class explains y; TDS's weights correct it in the limit of many particles.
    sde, sigma_y, y0, n = VPSDE(), 0.3, 0.2, 4000
    op = Inpainting(torch.tensor([[[1.0, 0.0]]]))
    y = torch.tensor([y0, 0.0]).reshape(1, 1, 1, 2).expand(n, 1, 1, 2)
    p_c, mean, var = _two_class_posterior(y0, sigma_y)
    fn = (ClassMixture(lambda labels: TWO.score_fn(sde, labels), TWO.weights) if prior == "class mixture"
          else TWO.score_fn(sde))
    x, _ = sample_smc(fn, sde, op, y, (n, 1, 1, 2), sigma_y=sigma_y, steps=200, seed=0, particles=8)
    x = x.reshape(n, 2).double()
    frac, se_frac = (x[:, 1] > 0).double().mean(), math.sqrt(p_c[1] * p_c[0] / n)
    assert abs(frac - p_c[1]) < 5 * se_frac + 0.01, (frac, p_c[1])
    assert ((x.mean(0) - mean).abs() < 5 * (var / n).sqrt() + MEAN_ALLOW).all(), (x.mean(0), mean)
    # Power: ΠGDM alone lands far from p(c | y) here.
    x_pigdm, _ = sample_posterior("euler_maruyama", TWO.score_fn(sde), sde, op, y, (n, 1, 1, 2),
                                  sigma_y=sigma_y, steps=200, seed=0)
    assert abs((x_pigdm[..., 1] > 0).double().mean() - p_c[1]) > 20 * se_frac


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sample_replacement(None, VPSDE(), Inpainting(torch.eye(4)[None]), torch.zeros(2, 3, 4, 4),
                                    (2, 3, 4, 4), steps=5, seed=0),
         r"mask shape \(1, 4, 4\).*image shape \(3, 4, 4\).*\(2, 3, 4, 4\)"),
        (lambda: Inpainting(torch.ones(3, 4, 4)), r"all known"),
        (lambda: Inpainting(torch.zeros(3, 4, 4)), r"all unknown"),
        (lambda: Inpainting(torch.stack([MASK, torch.ones(IMG)])), r"all known"),
        (lambda: Inpainting(torch.full(IMG, 0.5)), r"only 0.*and 1"),
        (lambda: sample_posterior("ode", None, VPSDE(), SuperResolution(3), torch.zeros(2, 3, 1, 1),
                                  (2, 3, 4, 4), sigma_y=0.1, steps=5, seed=0),
         r"factor 3 must divide the image size.*4×4"),
        (lambda: SuperResolution(1), r"factor.*>= 2.*1"),
        (lambda: sample_replacement(None, VPSDE(), Colorization(), torch.zeros(2, 1, 4, 4), (2, 1, 4, 4),
                                    steps=5, seed=0), r"3 colour channels, got 1"),
        (lambda: sample_replacement(None, VPSDE(), Colorization(), torch.zeros(2, 3, 4, 4), (2, 3, 4, 4),
                                    steps=5, seed=0), r"y has shape \(2, 3, 4, 4\).*\(2, 1, 4, 4\)"),
        (lambda: sample_posterior("ddim", None, VPSDE(), Colorization(), torch.zeros(2, 1, 4, 4),
                                  (2, 3, 4, 4), sigma_y=-1.0, steps=5, seed=0), r"sigma_y.*>= 0.*-1.0"),
        (lambda: sample_replacement(None, VPSDE(), Colorization(), torch.zeros(2, 1, 4, 4), (2, 3, 4, 4),
                                    steps=5, seed=0, snr=0.0), r"snr.*> 0"),
        (lambda: sample_replacement(None, VPSDE(), Colorization(), torch.zeros(2, 1, 4, 4), (2, 3, 4, 4),
                                    steps=0, seed=0), r"steps.*>= 1.*0"),
        (lambda: sample_smc(None, VPSDE(), Colorization(), torch.zeros(2, 1, 4, 4), (2, 3, 4, 4), sigma_y=0.1,
                            steps=5, seed=0, particles=0), r"particles.*>= 1.*0"),
        (lambda: sample_smc(None, VPSDE(), Colorization(), torch.zeros(2, 1, 4, 4), (2, 3, 4, 4), sigma_y=0.1,
                            steps=5, seed=0, data_var=0.0), r"data_var.*> 0"),
    ],
)
def test_bad_input_raises_before_sampling(call, match):
    with pytest.raises(ValueError, match=match):
        call()
