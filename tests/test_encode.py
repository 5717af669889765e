"""PF-ODE encoding/decoding and slerp against closed forms (Gaussian data) and the mixture's exact score."""

import inspect
import math

import pytest
import torch

from pipeline.diffusion import encode as enc
from pipeline.diffusion.encode import decode, encode, interpolate, slerp
from pipeline.diffusion.likelihood import ode_likelihood
from pipeline.diffusion.sde import VESDE, VPSDE
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64
MIXTURE = GaussianMixture.isotropic([[-1.5, 0.0], [1.0, 1.0], [1.0, -1.5]], std=0.5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_defaults_are_the_likelihood_solver_and_tolerances():
    defaults = {k: v.default for k, v in inspect.signature(ode_likelihood).parameters.items()}
    expected = (defaults["rtol"], defaults["atol"], defaults["eps"], defaults["integration"].method)
    assert expected == (enc.RTOL, enc.ATOL, enc.EPS, enc.SOLVER)
    for fn in (encode, decode, interpolate):
        params = inspect.signature(fn).parameters
        assert (params["rtol"].default, params["atol"].default, params["eps"].default,
                params["method"].default) == (enc.RTOL, enc.ATOL, enc.EPS, enc.SOLVER)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=10.0)], ids=["vp", "ve"])
def test_decode_inverts_encode_on_the_mixture_within_the_solver_tolerance(sde):
    x = MIXTURE.sample(256, _gen(0)).double()
    score = MIXTURE.score_fn(sde)
    errors = {}
    for tol in (1e-5, 1e-7):
        z, nfe_e = encode(score, sde, x, rtol=tol, atol=tol, data_range=None)
        back, nfe_d = decode(score, sde, z, rtol=tol, atol=tol)
        err = (back - x).abs()
        errors[tol] = (err.median().item(), err.max().item())
        assert nfe_e > 10 and nfe_d > 10
    print(f"{sde.name}: |decode(encode(x)) − x| median {errors[1e-5][0]:.1e}, max {errors[1e-5][1]:.1e} "
          f"(tol 1e-5); median {errors[1e-7][0]:.1e}, max {errors[1e-7][1]:.1e} (tol 1e-7)")
    # Measured at tol 1e-5: VP median 9e-6, max 1.0e-3; VE median 1.4e-5, max 2.5e-4. The typical point
    # returns within the tolerance; the worst of 256 lie between modes, where the flow stretches most.
    assert errors[1e-5][0] < 10 * 1e-5 and errors[1e-5][1] < 300 * 1e-5
    # It shrinks with the tolerance: the error is the solver's, not a wrong map.
    assert errors[1e-7][0] < errors[1e-5][0] / 10 and errors[1e-7][1] < errors[1e-5][1] / 10


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=10.0)], ids=["vp", "ve"])
def test_encode_of_gaussian_data_is_the_closed_form_whitening_map(sde):
    # x0 ~ N(μ, Σ): p_t = N(α_t μ, Σ_t), Σ_t = α_t² Σ + σ_t² I. Each eigen-direction of Σ is a 1-D Gaussian
    # whose PF-ODE keeps the standardised coordinate fixed, so
    #     Φ_{eps→T}(x) = α_T μ + Σ_T^{1/2} Σ_eps^{−1/2} (x − α_eps μ),
    # for VP (α_T ≈ 0, Σ_T ≈ I) the whitening map Σ_eps^{−1/2}(x − α_eps μ).
    mu = torch.tensor([0.5, -0.3, 0.2], dtype=F64)
    A = torch.tensor([[0.6, 0.2, 0.0], [0.1, 0.4, 0.3], [0.0, -0.2, 0.5]], dtype=F64)
    cov = A @ A.T + 0.05 * torch.eye(3, dtype=F64)
    gauss = GaussianMixture(torch.ones(1, dtype=F64), mu[None], cov[None])
    x = gauss.sample(64, _gen(1)).double()
    z, _ = encode(gauss.score_fn(sde), sde, x, data_range=None)
    lam, U = torch.linalg.eigh(cov)

    def cov_power(t, p):
        alpha, sigma = sde.marginal_coeffs(torch.tensor([t], dtype=F64))
        return U @ torch.diag((alpha**2 * lam + sigma**2) ** p) @ U.T, alpha

    half_T, a_T = cov_power(sde.T, 0.5)
    inv_half_eps, a_eps = cov_power(enc.EPS, -0.5)
    expected = a_T * mu + (x - a_eps * mu) @ (half_T @ inv_half_eps).T
    err = (z - expected).abs().max().item()
    assert err < 1e-3, err
    if isinstance(sde, VPSDE):  # whitened: the latents of the data batch have ≈ identity covariance
        white = (x - a_eps * mu) @ inv_half_eps.T
        assert (z - white).abs().max() < 1e-3 + 1e-2 * white.abs().max()


def test_encode_is_the_latent_of_the_likelihood_solve():
    sde = VPSDE()
    x = MIXTURE.sample(32, _gen(2)).double()
    z, _ = encode(MIXTURE.score_fn(sde), sde, x, data_range=None)
    latent = ode_likelihood(MIXTURE.score_fn(sde), sde, x, generator=_gen(3)).latent
    assert (z - latent).abs().max() < 1e-3


def test_slerp_follows_the_great_circle():
    g = _gen(4)
    z0, z1 = torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randn(5, 3, 4, generator=g, dtype=F64)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    ts = torch.linspace(0, 1, 7, dtype=F64)
    path = slerp(z0, z1, ts)
    assert path.shape == (7, 5, 3, 4)
    a, b = z0.flatten(1), z1.flatten(1)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)  # equal norms: the great circle
    path = slerp(a, b, ts)
    theta = torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))
    for k, t in enumerate(ts):
        p = path[k]
        # the angle to z0 grows linearly, t·θ, at constant norm
        torch.testing.assert_close(p.norm(dim=1), a.norm(dim=1))
        ang = torch.arccos(((p * a).sum(1) / (p.norm(dim=1) * a.norm(dim=1))).clamp(-1, 1))
        torch.testing.assert_close(ang, t * theta, atol=1e-6, rtol=0)
    # Linear interpolation would shrink the norm half-way (the prior's low-density interior).
    assert ((0.5 * (a + b)).norm(dim=1) < a.norm(dim=1) - 1e-3).all()
    # Parallel latents: no division by sin θ = 0.
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)


def test_interpolate_decodes_the_path_with_the_endpoints_decoded():
    sde = VPSDE()
    score = MIXTURE.score_fn(sde)
    z0, z1 = torch.randn(2, 2, generator=_gen(5), dtype=F64), torch.randn(2, 2, generator=_gen(6), dtype=F64)
    path, nfe = interpolate(score, sde, z0, z1, n=5)
    assert path.shape == (5, 2, 2) and nfe > 0
    x0, _ = decode(score, sde, z0)
    x1, _ = decode(score, sde, z1)
    assert (path[0] - x0).abs().max() < 1e-3 and (path[-1] - x1).abs().max() < 1e-3


def test_data_outside_the_models_range_is_refused_naming_the_range():
    sde, called = VPSDE(), []

    def score(x, t):
        called.append(1)
        return -x

    with pytest.raises(ValueError, match=r"\[-3, 0.5\].*data range \[-1.0, 1.0\]"):
        encode(score, sde, torch.tensor([[-3.0, 0.5]]))
    with pytest.raises(ValueError, match=r"\[0, 255\].*\[-1.0, 1.0\]"):
        encode(score, sde, torch.tensor([[0.0, 255.0]]))
    assert called == []
    z, _ = encode(score, sde, torch.tensor([[0.0, 255.0]]), data_range=(0.0, 255.0), method="euler", steps=4)
    assert torch.isfinite(z).all() and not math.isnan(float(z.sum()))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: encode(s, VPSDE(), torch.zeros(2, 2), method="rk45"), r"method.*'rk45'"),
        (lambda s: encode(s, VPSDE(), torch.zeros(2, 2), rtol=0.0), r"rtol.*0.0"),
        (lambda s: decode(s, VPSDE(), torch.zeros(2, 2), eps=1.0), r"eps.*\(0, T=1.0\)"),
        (lambda s: decode(s, VPSDE(), torch.zeros(2)), r"x must have shape \[B, ...\]"),
        (lambda s: interpolate(s, VPSDE(), torch.zeros(2, 2), torch.zeros(2, 2), n=1), r"\bn\b.*>= 2.*1"),
        (lambda s: slerp(torch.zeros(2, 2), torch.zeros(2, 3), 0.5), r"\(2, 2\) and \(2, 3\)"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(lambda x, t: -x)
