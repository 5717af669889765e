"""Probability-flow ODE likelihood against closed-form Gaussian-mixture densities."""

import math

import pytest
import torch

from pipeline.diffusion.dequantize import (
    bin_width,
    check_on_grid,
    logp_offset,
    offset_bits_per_dim,
    uniform_dequantize,
)
from pipeline.diffusion.likelihood import exact_divergence, hutchinson_divergence, ode_likelihood
from pipeline.diffusion.param import make_score_fn
from pipeline.diffusion.sde import VESDE, VPSDE, SubVPSDE
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64


def mixture(d: int = 8, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 0.2 * torch.randn(3, d, generator=g, dtype=F64)
    A = 0.4 * torch.randn(3, d, d, generator=g, dtype=F64) / math.sqrt(d)
    covs = A @ A.transpose(1, 2) + 0.05 * torch.eye(d, dtype=F64)
    return GaussianMixture(torch.tensor([0.2, 0.3, 0.5], dtype=F64), means, covs)


def full(n: int, t: float) -> torch.Tensor:
    return torch.full((n,), t, dtype=F64)


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


@pytest.mark.parametrize("name", sorted(SDES))
def test_exact_trace_matches_the_mixture_density(name):
    gm, d, B, eps = mixture(), 8, 6, 1e-5
    # σ_max = 200 keeps VE's prior N(0, σ_max²) within 1e-3 nats/dim of p_T for this data.
    sde = VESDE(sigma_max=200.0) if name == "ve" else SDES[name]()
    x = gm.sample(B, generator=torch.Generator().manual_seed(1)).double()
    res = ode_likelihood(gm.score_fn(sde), sde, x, trace="exact", rtol=1e-7, atol=1e-7, eps=eps)

    # The ODE from the exact score gives log p_eps(x) - log p_T(z) + log π(z) with z = x(T): this holds
    # to solver accuracy whatever the prior mismatch.
    identity = (gm.log_prob_t(x, full(B, eps), sde) - gm.log_prob_t(res.latent, full(B, sde.T), sde)
                + sde.prior_logp(res.latent))
    assert ((res.logp - identity).abs() / d).max() < 1e-5
    # Against the data density itself. VE's marginal at t = eps has std σ_min (score_sde's
    # convention, data taken as already blurred), so its truth is log p_eps, not log p_0.
    truth = gm.log_prob_t(x, full(B, eps), sde) if name == "ve" else gm.log_prob(x)
    assert ((res.logp - truth).abs() / d).max() < 1e-3
    assert torch.allclose(res.bpd, -res.logp / (d * math.log(2)))
    assert res.nfe > 10 and torch.equal(res.stderr, torch.zeros(B, dtype=F64))


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_hutchinson_agrees_with_exact_trace_within_three_standard_errors(probes):
    gm, sde, B = mixture(), VPSDE(), 6
    x = gm.sample(B, generator=torch.Generator().manual_seed(2)).double()
    exact = ode_likelihood(gm.score_fn(sde), sde, x, trace="exact", rtol=1e-6, atol=1e-6)
    est = ode_likelihood(gm.score_fn(sde), sde, x, trace="hutchinson", probes=probes, n_probes=16,
                         rtol=1e-6, atol=1e-6, generator=torch.Generator().manual_seed(3))
    assert est.samples.shape == (B, 16)
    assert torch.all(est.stderr > 0)
    z = (est.logp - exact.logp) / est.stderr
    # The B samples' estimates are independent: their sum is within 3 of its standard errors, and no
    # single sample is off by more than 4.
    assert abs(float((est.logp - exact.logp).sum() / est.stderr.pow(2).sum().sqrt())) < 3
    assert z.abs().max() < 4


def test_rademacher_variance_is_below_gaussian_variance_and_matches_theory():
    """For Gaussian data ∂f̃/∂x does not depend on x, so ∫∇·f̃ dt = tr A with the symmetric
    A = Q diag(a_k) Qᵀ, a_k = ½ log((α_T² λ_k + σ_T²)/(α_ε² λ_k + σ_ε²)), and a probe held fixed over
    the solve gives vᵀAv: Var = 2‖A‖_F² (Gaussian), 2 Σ_{i≠j} A_ij² (Rademacher)."""
    d, B, P, eps = 4, 8, 32, 1e-5
    g = torch.Generator().manual_seed(3)
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    cov = R @ torch.diag(torch.tensor([0.02, 0.1, 0.8, 3.0], dtype=F64)) @ R.T  # rotated: A is not diagonal
    gm = GaussianMixture(torch.ones(1, dtype=F64), torch.full((1, d), 0.3, dtype=F64), cov[None])
    sde = VPSDE()
    x = gm.sample(B, generator=g).double()

    lam, Q = torch.linalg.eigh(cov)
    (aT, ae), (sT, se) = sde.marginal_coeffs(torch.tensor([sde.T, eps], dtype=F64))
    A = Q @ torch.diag(0.5 * torch.log((aT**2 * lam + sT**2) / (ae**2 * lam + se**2))) @ Q.T
    var_gauss = 2 * (A**2).sum()
    var_rad = var_gauss - 2 * (torch.diagonal(A) ** 2).sum()
    assert var_rad < 0.5 * var_gauss  # the data makes the comparison informative

    var = {}
    for probes in ("rademacher", "gaussian"):
        res = ode_likelihood(gm.score_fn(sde), sde, x, probes=probes, n_probes=P, rtol=1e-6, atol=1e-6,
                             eps=eps, generator=torch.Generator().manual_seed(5))
        var[probes] = float(res.samples.var(1).mean())
    assert var["rademacher"] < var["gaussian"]
    assert 0.6 < var["gaussian"] / float(var_gauss) < 1.5
    assert 0.6 < var["rademacher"] / float(var_rad) < 1.5


def test_dequantisation_offset_against_hand_computation():
    # 8-bit data: Δ = 2/255, offset log₂(127.5) bits/dim = 7 + log₂(1 - 1/256) = 6.99435343685886.
    assert offset_bits_per_dim(256) == pytest.approx(6.99435343685886, abs=1e-12)
    # 3072 dims (CIFAR-10): D·log Δ = -3072·ln 127.5, ln 127.5 = 7 ln 2 + ln(255/256) = 4.848116364598481.
    assert logp_offset(256, 3072) == pytest.approx(-3072 * 4.848116364598481, rel=1e-12)
    assert logp_offset(256, 3072) == pytest.approx(-14893.413472046534, rel=1e-12)
    # sklearn digits, levels 0..16: Δ = 2/16 = 1/8, exactly 3 bits/dim; 64 dims: -64·ln 8 = -192·ln 2.
    assert offset_bits_per_dim(17) == 3.0
    assert logp_offset(17, 64) == pytest.approx(-192 * 0.6931471805599453, rel=1e-12)
    assert bin_width(17) == 0.125


def test_dequantised_likelihood_matches_the_expected_gaussian_bound():
    """Isotropic data N(μ, s²I) on the 17-level grid, exact model: E_u log N(x + (u-½)Δ) =
    log N(x) - D Δ²/(24 s²), so bpd = -(log N(x) - DΔ²/(24s²) + D log Δ)/(D ln 2)."""
    D, L, s, K = 16, 17, 0.5, 8
    gm = GaussianMixture.isotropic(torch.zeros(1, D), s)
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, D, generator=g, dtype=F64) * s).clamp(-1, 1)
    x = torch.round((x + 1) * (L - 1) / 2) * 2 / (L - 1) - 1
    delta = 2 / (L - 1)
    expected = -(gm.log_prob(x) - D * delta**2 / (24 * s**2) + D * math.log(delta)) / (D * math.log(2))
    # ∂f̃/∂x ∝ I for isotropic Gaussian data, so one Rademacher probe gives the trace exactly.
    res = ode_likelihood(gm.score_fn(sde), sde, x, probes="rademacher", n_probes=1, rtol=1e-6, atol=1e-6,
                         dequantize={"levels": L, "draws": K}, generator=g)
    assert res.samples.shape == (3, K)
    assert torch.all(res.bpd_stderr > 0)
    assert torch.all((res.bpd - expected).abs() < 3 * res.bpd_stderr + 2e-4)


def test_uniform_dequantisation_stays_in_its_cell():
    L = 256
    k = torch.arange(L, dtype=F64).repeat(40)
    x = (k * 2 / (L - 1) - 1).reshape(-1, 1)
    check_on_grid(x, L)
    y = uniform_dequantize(x, L, torch.Generator().manual_seed(0))
    # Back on the integer grid, y = k + u lies in [k, k + 1).
    u = (y.flatten() + 1) / bin_width(L) + 0.5 - k
    assert u.min() >= 0 and u.max() < 1 and u.std() > 0.25


def test_unet_through_make_score_fn_reports_its_score_evaluations():
    pytest.importorskip("pipeline.models")
    from pipeline.models import build_unet

    torch.manual_seed(0)
    net = build_unet("tiny-digits", num_classes=None, channels=16, dropout=0.0).eval()
    with torch.no_grad():  # DDPM's zero-initialised output layers would make ε̂ ≡ 0 and the drift linear
        for w in net.parameters():
            if w.dim() > 1 and not w.any():
                w.normal_(0.0, 0.05)
    sde = VPSDE()
    score_fn = make_score_fn(net, sde, "eps", noise_label_kind="time")
    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return score_fn(x, t)

    x = torch.randint(0, 17, (2, 1, 8, 8)).float() / 8 - 1
    res = ode_likelihood(counted, sde, x, rtol=1e-3, atol=1e-3, dequantize={"levels": 17},
                         generator=torch.Generator().manual_seed(0))
    assert res.nfe == len(calls) > 0
    assert torch.isfinite(res.bpd).all() and res.bpd.shape == (2,)

    # The Hutchinson divergence of the U-Net's drift averages to the exact divergence.
    xt = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    drift, _ = sde.reverse(score_fn, probability_flow=True).sde(xt, torch.full((2,), 0.3))
    exact = exact_divergence(drift, xt)
    v = torch.randint(0, 2, (128, *x.shape), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    est = hutchinson_divergence(drift, xt, v)
    assert torch.all((est.mean(1) - exact).abs() < 4 * est.std(1) / math.sqrt(128) + 1e-3)


def test_bad_input_is_rejected_before_solving():
    gm, sde = mixture(d=2), VPSDE()
    f = gm.score_fn(sde)
    x = torch.zeros(3, 2, dtype=F64)
    cases = [
        (dict(x=torch.zeros(3, dtype=F64)), "shape"),
        (dict(trace="jacobian"), "trace"),
        (dict(probes="sphere"), "probes"),
        (dict(n_probes=0), "n_probes"),
        (dict(eps=0.0), "eps"),
        (dict(rtol=-1.0), "rtol"),
        (dict(x=torch.full((3, 2), float("nan"), dtype=F64)), "NaN"),
        (dict(x=torch.full((3, 2), 1.5, dtype=F64), dequantize={"levels": 256}), "data range"),
        (dict(x=torch.full((3, 2), 0.001, dtype=F64), dequantize={"levels": 256}), "grid"),
        (dict(dequantize={"levels": 1}), "levels"),
        (dict(dequantize={"levels": 256, "bins": 3}), "unknown"),
        (dict(dequantize={"levels": 17, "draws": 0}), "draws"),
    ]
    for kwargs, word in cases:
        kw = {"x": x, **kwargs}
        with pytest.raises(ValueError, match=word):
            ode_likelihood(f, sde, **kw)


def test_nan_from_the_model_names_the_time_and_the_sample():
    gm, sde = mixture(d=2), VPSDE()
    f = gm.score_fn(sde)

    def broken(x, t):
        out = f(x, t).clone()
        if float(t[0]) > 0.3:
            out[2] = float("nan")
        return out

    x = gm.sample(4, generator=torch.Generator().manual_seed(0)).double()
    with pytest.raises(ValueError, match=r"t=[0-9.e-]+ for sample index 2 ") as info:
        ode_likelihood(broken, sde, x, trace="exact")
    assert float(str(info.value).split("t=")[1].split()[0]) > 0.3
