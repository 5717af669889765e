"""Forward SDEs against their defining equations: moment ODEs, prior, inverses, discretisations, reversal."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.stats import multivariate_normal

from pipeline.diffusion.sde import VESDE, VPSDE, CosineVPSDE, SubVPSDE, build_sde
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64
SDES = {
    "vp": lambda: VPSDE(beta_min=0.1, beta_max=20.0),
    "subvp": lambda: SubVPSDE(beta_min=0.1, beta_max=20.0),
    "ve": lambda: VESDE(sigma_min=0.01, sigma_max=50.0),
    "cosine-vp": lambda: CosineVPSDE(s=0.008, t_max=0.999),
}


def _f_g(sde, t: float) -> tuple[float, float]:
    """Drift coefficient f(t) (drift = f(t) x) and diffusion g(t), read off `sde.sde` at x = 1."""
    drift, g = sde.sde(torch.ones(1, 1, dtype=F64), torch.tensor([t], dtype=F64))
    return drift.item(), g.item()


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_coeffs_solve_the_moment_odes(name):
    # For dx = f(t) x dt + g(t) dw the kernel mean m(t) x0 and variance v(t) obey dm/dt = f m,
    # dv/dt = 2 f v + g² (Särkkä & Solin 2019, eq. 5.51). Solved to rtol 1e-10, so agreement to 1e-7
    # leaves three orders of margin for the solver's global error.
    sde = SDES[name]()
    v0 = sde.sigma_min**2 if name == "ve" else 0.0  # VE's kernel std is σ(t), so v(0) = σ_min²

    def rhs(t, y):
        f, g = _f_g(sde, t)
        return [f * y[0], 2 * f * y[1] + g**2]

    ts = np.array([1e-3, 0.05, 0.2, 0.5, 0.8, 0.95, sde.T])
    sol = solve_ivp(rhs, (0.0, sde.T), [1.0, v0], method="DOP853", t_eval=ts, rtol=1e-10, atol=1e-14)
    assert sol.success
    alpha, sigma = sde.marginal_coeffs(torch.tensor(ts, dtype=F64))
    np.testing.assert_allclose(alpha.numpy(), sol.y[0], rtol=1e-7)
    np.testing.assert_allclose(sigma.numpy() ** 2, sol.y[1], rtol=1e-7)


@pytest.mark.parametrize("name", ["vp", "subvp", "cosine-vp"])
def test_vp_family_marginal_at_T_is_the_standard_normal_prior(name):
    sde = SDES[name]()
    T = torch.tensor([sde.T], dtype=F64)
    alpha, sigma = (v.item() for v in sde.marginal_coeffs(T))
    if name == "cosine-vp":  # ᾱ(T) = cos²(φ(T))/cos²(φ(0)), Nichol & Dhariwal 2021, eq. 17
        phi = lambda u: (u + 0.008) / 1.008 * math.pi / 2  # noqa: E731
        abar = math.cos(phi(sde.T)) ** 2 / math.cos(phi(0.0)) ** 2
    else:  # ᾱ(1) = exp(-∫β) = exp(-(β_min + β_max)/2)
        abar = math.exp(-(0.1 + 20.0) / 2)
    assert alpha == pytest.approx(math.sqrt(abar), rel=1e-12, abs=0)
    var = (1 - abar) ** 2 if name == "subvp" else 1 - abar
    assert sigma**2 == pytest.approx(var, rel=1e-12, abs=0)
    # KL(N(α x0, σ²) ‖ N(0, 1)) for a unit-norm x0: small enough that starting at the prior is harmless.
    kl = 0.5 * (alpha**2 + sigma**2 - 1 - math.log(sigma**2))
    assert 0 <= kl < 1e-4


def test_ve_marginal_at_T_is_the_prior():
    sde = SDES["ve"]()
    alpha, sigma = sde.marginal_coeffs(torch.tensor([0.0, sde.T], dtype=F64))
    assert torch.equal(alpha, torch.ones(2, dtype=F64))
    assert sigma[1].item() == pytest.approx(50.0, rel=1e-12, abs=0)
    assert sigma[0].item() == pytest.approx(0.01, rel=1e-12, abs=0)


@pytest.mark.parametrize("name", list(SDES))
def test_prior_logp_is_the_gaussian_logpdf(name):
    sde = SDES[name]()
    std = 50.0 if name == "ve" else 1.0
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, 2, 2, generator=g, dtype=F64) * std * 1.3
    flat = z.reshape(5, -1).numpy()
    ref = multivariate_normal(mean=np.zeros(12), cov=std**2 * np.eye(12)).logpdf(flat)
    np.testing.assert_allclose(sde.prior_logp(z).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("name", list(SDES))
def test_prior_sampling_has_the_prior_moments(name):
    sde = SDES[name]()
    std = 50.0 if name == "ve" else 1.0
    shape = (20000, 2, 3)
    x = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(2)).double()
    assert x.shape == shape
    flat = x.reshape(shape[0], -1)
    n = shape[0]
    # 5-standard-error bounds: mean std/√n, variance std² √(2/n), correlation 1/√n.
    assert (flat.mean(0).abs() < 5 * std / math.sqrt(n)).all()
    assert ((flat.var(0) - std**2).abs() < 5 * std**2 * math.sqrt(2 / n)).all()
    corr = torch.corrcoef(flat.T) - torch.eye(flat.shape[1], dtype=F64)
    assert corr.abs().max() < 5 / math.sqrt(n)
    again = sde.prior_sampling(shape, generator=torch.Generator().manual_seed(2)).double()
    assert torch.equal(x, again)


@pytest.mark.parametrize("name", list(SDES))
def test_edm_sigma_inv_inverts_edm_sigma(name):
    sde = SDES[name]()
    t = torch.cat([torch.logspace(-5, -1, 9, dtype=F64), torch.linspace(0.15, sde.T, 12, dtype=F64)])
    sig = sde.edm_sigma(t)
    assert (sig.diff() > 0).all()
    # Round-off: cosine inverts through arccos near φ(0) = 0.0125, whose condition number is
    # 1/sin φ(0) ≈ 80, so |Δt| ≲ 80 · 2⁻⁵² · π/2 ≈ 3e-14; the others are better conditioned.
    np.testing.assert_allclose(sde.edm_sigma_inv(sig).numpy(), t.numpy(), rtol=1e-11, atol=1e-13)
    s = torch.logspace(-2.5, 1.5, 17, dtype=F64)
    np.testing.assert_allclose(sde.edm_sigma(sde.edm_sigma_inv(s)).numpy(), s.numpy(), rtol=1e-10)


def test_edm_sigma_is_sigma_over_alpha():
    for name, make in SDES.items():
        sde = make()
        t = torch.linspace(0.01, sde.T, 7, dtype=F64)
        alpha, sigma = sde.marginal_coeffs(t)
        torch.testing.assert_close(sde.edm_sigma(t), sigma / alpha, rtol=1e-14, atol=0, msg=name)


def test_vp_discretize_is_the_ddpm_step_and_matches_the_sde():
    # On the grid t = i/(N-1), β_i = β(t)/N exactly, so G = g √dt; the drift √(1-β_i) - 1 differs from
    # -β_i/2 = f dt by β²/8 + β³/16 + ... ≤ β²/(8(1-β)) (every later Taylor coefficient is ≤ 1/8).
    sde = VPSDE(N=1000)
    i = torch.tensor([1, 100, 500, 999])
    t = i.double() / (sde.N - 1)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    f_d, G = sde.discretize(x, t)
    drift, g = sde.sde(x, t)
    dt = sde.T / sde.N
    torch.testing.assert_close(G, g * math.sqrt(dt), rtol=1e-12, atol=0)
    beta = (g**2 * dt)[:, None]
    assert ((f_d - drift * dt).abs() <= beta**2 / (8 * (1 - beta)) * x.abs() * (1 + 1e-9)).all()
    assert ((f_d - drift * dt).abs() >= beta**2 / 8 * x.abs() * (1 - 1e-9)).all()


def test_subvp_discretize_is_euler_maruyama():
    sde = SubVPSDE(N=500)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=F64)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    f_d, G = sde.discretize(x, t)
    drift, g = sde.sde(x, t)
    torch.testing.assert_close(f_d, drift / 500, rtol=1e-14, atol=0)
    torch.testing.assert_close(G, g / math.sqrt(500), rtol=1e-14, atol=0)


def test_ve_discretize_matches_the_sde_to_first_order():
    # G² = σ_i² - σ_{i-1}² = σ_i² (1 - e^{-x}), x = 2 log(σ_max/σ_min)/(N-1); g² dt = σ_i² x (N-1)/N.
    # Since 1 - x/2 ≤ (1 - e^{-x})/x ≤ 1, the ratio G²/(g² dt) lies in [N/(N-1) (1 - x/2), N/(N-1)].
    sde = VESDE(N=1000)
    i = torch.tensor([1, 10, 400, 999])
    t = i.double() / (sde.N - 1)
    x = torch.zeros(4, 2, dtype=F64)
    f_d, G = sde.discretize(x, t)
    _, g = sde.sde(x, t)
    assert torch.equal(f_d, torch.zeros_like(x))
    ratio = G**2 / (g**2 * sde.T / sde.N)
    xx = 2 * math.log(50.0 / 0.01) / (sde.N - 1)
    lo, hi = sde.N / (sde.N - 1) * (1 - xx / 2), sde.N / (sde.N - 1)
    assert ((ratio >= lo * (1 - 1e-12)) & (ratio <= hi * (1 + 1e-12))).all(), ratio


def test_cosine_discretize_brackets_the_sde_increment():
    # Cosine step i has 1 - β_i = ᾱ((i+1)/N)/ᾱ(i/N) = exp(-∫β over [i/N, (i+1)/N]); β increases, so
    # Δ = -log(1 - β_i) lies in [β(i/N)/N, β((i+1)/N)/N], and f = (√(1-β_i) - 1) x = (e^{-Δ/2} - 1) x.
    sde = CosineVPSDE(N=1000)
    i = torch.tensor([0, 10, 300, 700, 990])
    t = i.double() * sde.T / (sde.N - 1)  # exactly the grid that `discretize` indexes
    x = torch.ones(5, 1, dtype=F64)
    f_d, G = sde.discretize(x, t)
    delta = -2 * torch.log1p(f_d[:, 0])
    lo, hi = sde.beta(i.double() / sde.N) / sde.N, sde.beta((i.double() + 1) / sde.N) / sde.N
    assert ((delta >= lo * (1 - 1e-9)) & (delta <= hi * (1 + 1e-9))).all()
    torch.testing.assert_close(G**2, -torch.expm1(-delta), rtol=1e-9, atol=0)
    # Against the SDE's own increment f dt = -½ β(t) dt with t = i/N, dt = T/N: -f_d = 1 - e^{-Δ/2} lies in
    # [½Δ(1 - Δ/4), ½Δ], so the relative gap is at most max(hi/(T lo) - 1, 1 - (1 - hi/4)/T): O(1/N)
    # in the bulk, larger where β varies fastest (β'/β ≈ 125 at t = 0, ≈ 1/(1 - t) near T).
    drift, _ = sde.sde(x, t)
    assert torch.allclose(t, i.double() / sde.N, rtol=1e-15, atol=0)
    rel = ((f_d - drift * sde.T / sde.N) / (drift * sde.T / sde.N)).abs()[:, 0]
    bound = torch.maximum(hi / (sde.T * lo) - 1, (1 - (1 - hi / 4) / sde.T).abs())
    assert (rel <= bound * (1 + 1e-9)).all(), (rel, bound)
    assert bound[2:4].max() < 5e-3


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_drift_uses_the_exact_score(name, probability_flow):
    sde = SDES[name]()
    gm = GaussianMixture.isotropic([[-1.0, 0.5], [1.5, -0.5]], std=[0.3, 0.6],
                                   weights=torch.tensor([0.3, 0.7]))
    score = gm.score_fn(sde)
    g_ = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, generator=g_, dtype=F64) * 2
    t = torch.rand(6, generator=g_, dtype=F64) * sde.T * 0.98 + 0.01
    rev = sde.reverse(score, probability_flow=probability_flow)
    drift, diffusion = rev.sde(x, t)
    f, g = sde.sde(x, t)
    c = 0.5 if probability_flow else 1.0  # Song et al. 2021, eq. 6 (SDE) and eq. 13 (ODE)
    torch.testing.assert_close(drift, f - c * g[:, None] ** 2 * gm.score_t(x, t, sde), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diffusion, torch.zeros_like(g) if probability_flow else g)
    rf, rG = rev.discretize(x, t)
    fd, Gd = sde.discretize(x, t)
    torch.testing.assert_close(rf, fd - c * Gd[:, None] ** 2 * gm.score_t(x, t, sde), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rG, torch.zeros_like(Gd) if probability_flow else Gd)
    assert rev.T == sde.T and rev.N == sde.N


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: VPSDE(beta_min=20.0, beta_max=0.1), "beta_max"),
        (lambda: VPSDE(beta_min=5.0, beta_max=5.0), "beta_max"),
        (lambda: SubVPSDE(beta_min=0.0, beta_max=20.0), "beta_min"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: VESDE(sigma_min=-1.0), "sigma_min"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: VPSDE(N=0), "N"),
        (lambda: VESDE(N=-3), "N"),
        (lambda: CosineVPSDE(s=0.0), "s"),
        (lambda: CosineVPSDE(t_max=1.0), "t_max"),
        (lambda: build_sde("vpp"), "sde name"),
    ],
)
def test_bad_constructor_arguments_raise(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make()


@pytest.mark.parametrize("name", list(SDES))
def test_wrong_t_shape_raises(name):
    sde = SDES[name]()
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"\bt\b.*1-D"):
        sde.sde(x, torch.full((4, 1), 0.5))
    with pytest.raises(ValueError, match=r"\bt\b.*1-D"):
        sde.marginal_prob(x, torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"\bt has 3 times\b"):
        sde.marginal_prob(x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"\bt has 3 times\b"):
        sde.discretize(x, torch.full((3,), 0.5))
