"""Samplers against closed-form ground truth: exact Gaussian-mixture scores under VP, sub-VP and VE.

Sampling a mixture with its exact diffused score must reproduce the mixture. Each statistic is
compared with its exact value within 5 standard errors (computed for n samples of the true mixture)
plus a stated discretisation allowance, so the tests fail on a wrong drift, noise scale or time grid.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.diffusion import samplers
from pipeline.diffusion.chain import DDPMChain
from pipeline.diffusion.multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_unipc
from pipeline.diffusion.samplers import (
    ChainOptions,
    Churn,
    MultistepOptions,
    ScoreCounter,
    UniPCOptions,
    sample,
    sample_ancestral,
    sample_ddim,
    sample_heun,
    sample_ode,
)
from pipeline.diffusion.schedules import time_grid
from pipeline.diffusion.sde import VESDE, VPSDE, CosineVPSDE, SubVPSDE
from pipeline.diffusion.toy import GaussianMixture

N = 3000  # samples per sampler run
Z = 5.0  # standard errors allowed
# Discretisation allowances (absolute), on top of Z standard errors; the mixture's variances are ~1.3–2.6.
ALLOW_MEAN, ALLOW_COV, ALLOW_WEIGHT, ALLOW_SPREAD = 0.02, 0.05, 0.01, 0.02

F64 = torch.float64
MIX = GaussianMixture(
    torch.tensor([0.5, 0.3, 0.2], dtype=F64),
    torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], dtype=F64),
    torch.tensor([[[0.25, 0.10], [0.10, 0.20]],
                  [[0.16, 0.00], [0.00, 0.30]],
                  [[0.20, -0.05], [-0.05, 0.15]]], dtype=F64),
)
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_min=0.01, sigma_max=20.0)}


def _assign(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, MIX.means).argmin(1)


def _spread(x: torch.Tensor) -> torch.Tensor:
    """Squared distance to the nearest component mean: sensitive to the final noise level."""
    return (x - MIX.means[_assign(x)]).pow(2).sum(1)


def _products(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    c = x - mean
    return torch.stack([c[:, 0] ** 2, c[:, 0] * c[:, 1], c[:, 1] ** 2], 1)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """Per-statistic standard errors for N samples, from a large exact sample of the mixture."""
    ref = MIX.sample(400_000, generator=torch.Generator().manual_seed(12345)).double()
    counts = torch.bincount(_assign(ref), minlength=MIX.K).double()
    p = counts / ref.shape[0]
    return {
        "mean_se": torch.diagonal(MIX.cov()).sqrt() / math.sqrt(N),
        "cov_se": _products(ref, MIX.mean()).std(0) / math.sqrt(N),
        "p": p,
        # Binomial SE of a fraction, for N samples and the reference's own sampling error.
        "p_se": (p * (1 - p) * (1 / N + 1 / ref.shape[0])).sqrt(),
        "spread": _spread(ref).mean(),
        "spread_se": _spread(ref).std() / math.sqrt(N),
    }


def assert_reproduces_mixture(x: torch.Tensor, ref: dict[str, torch.Tensor]) -> None:
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    x = x.double()
    mean_err = (x.mean(0) - MIX.mean()).abs()
    assert (mean_err <= Z * ref["mean_se"] + ALLOW_MEAN).all(), f"mean off by {mean_err}"
    C, C_true = torch.cov(x.T), MIX.cov()
    cov_err = torch.stack([C[0, 0] - C_true[0, 0], C[0, 1] - C_true[0, 1], C[1, 1] - C_true[1, 1]]).abs()
    assert (cov_err <= Z * ref["cov_se"] + ALLOW_COV).all(), f"covariance off by {cov_err}"
    p = torch.bincount(_assign(x), minlength=MIX.K).double() / N
    w_err = (p - ref["p"]).abs()
    assert (w_err <= Z * ref["p_se"] + ALLOW_WEIGHT).all(), f"component fractions {p} vs {ref['p']}"
    s_err = (_spread(x).mean() - ref["spread"]).abs()
    assert s_err <= Z * ref["spread_se"] + ALLOW_SPREAD, f"within-component spread off by {s_err}"


# (method, steps, options, NFE the method claims for these settings)
CASES = [
    ("ancestral", 200, {}, 200 + 1),  # one score per step + the Tweedie step
    ("ancestral", 200, {"variance": "beta"}, 201),
    ("ddim", 100, {}, 101),
    ("ddim", 100, {"eta": 0.5, "grid": "karras"}, 101),
    ("euler_maruyama", 200, {}, 201),
    ("pc", 100, {}, 2 * 100),  # predictor + 1 corrector per step; denoising is the last predictor's mean
    ("pc", 60, {"n_corrector": 2, "snr": 0.1}, 3 * 60),
    ("ode", 1, {}, None),  # dopri5: adaptive, `steps` ignored
    ("ode", 50, {"solver": "rk4"}, 4 * 50),
    ("heun", 40, {}, 2 * 40 - 1),  # Heun steps + a final Euler step
    ("heun", 40, {"S_churn": 5.0, "denoise": True}, 2 * 40 - 1 + 1),
]


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize(("method", "steps", "options", "nfe_expected"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_sampler_reproduces_mixture(sde_name, method, steps, options, nfe_expected, reference):
    sde = SDES[sde_name]()
    x, nfe = sample(method, MIX.score_fn(sde), sde, (N, 2), steps=steps, seed=1, dtype=F64, **options)
    assert_reproduces_mixture(x, reference)
    if nfe_expected is None:
        assert 0 < nfe < 500
    else:
        assert nfe == nfe_expected


@pytest.mark.parametrize("case", [0, 5, 10], ids=["ancestral", "pc", "heun-churn"])
def test_cosine_vp_reproduces_mixture(case, reference):
    """The cosine schedule's chain (pc) and its σ̃ inverse near t_max (heun) on the same ground truth."""
    method, steps, options, nfe_expected = CASES[case]
    sde = CosineVPSDE()
    x, nfe = sample(method, MIX.score_fn(sde), sde, (N, 2), steps=steps, seed=1, dtype=F64, **options)
    assert_reproduces_mixture(x, reference)
    assert nfe == nfe_expected


def test_annealed_langevin_reproduces_mixture(reference):
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    x, nfe = sample("annealed_langevin", MIX.score_fn(sde), sde, (N, 2), steps=50, seed=1, dtype=F64,
                    n_steps_each=20, step_lr=1e-4)
    assert_reproduces_mixture(x, reference)
    assert nfe == 50 * 20 + 1


def test_ode_nfe_is_counted_per_call():
    sde = VPSDE()
    calls = []
    _, nfe = sample("ode", MIX.score_fn(sde), sde, (64, 2), steps=1, seed=0, dtype=F64,
                    callback=lambda info: calls.append(info["t"]))
    assert nfe == len(calls) > 0
    # Adaptive steps must never ask for a time outside [eps, T].
    assert min(calls) >= 1e-3 - 1e-12 and max(calls) <= sde.T


# ---- determinism and shapes ---------------------------------------------------------------------------

SMALL = {
    "ancestral": (20, {}), "ddim": (20, {"eta": 0.3}), "euler_maruyama": (20, {}), "pc": (25, {}),
    "annealed_langevin": (5, {"n_steps_each": 3, "step_lr": 1e-5}), "ode": (1, {"rtol": 1e-4, "atol": 1e-4}),
    "heun": (10, {"S_churn": 2.0}),
    "dpmpp_2m": (10, {}), "dpmpp_2m_sde": (10, {}), "unipc": (10, {}),
}


@pytest.mark.parametrize("method", samplers.METHODS)
def test_same_seed_same_samples_other_seed_different(method):
    sde = VESDE(sigma_min=0.01, sigma_max=20.0) if method == "annealed_langevin" else VPSDE()
    steps, opts = SMALL[method]
    run = lambda seed: sample(method, MIX.score_fn(sde), sde, (64, 2), steps=steps, seed=seed, **opts)[0]  # noqa: E731
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("method", samplers.METHODS)
def test_image_shaped_batches_match_flat(method):
    """[B, C, H, W] data gives the same samples as the same data flattened to [B, d]."""
    mix4 = GaussianMixture.isotropic(torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5]], dtype=F64),
                                     0.3)
    sde = VESDE(sigma_min=0.01, sigma_max=20.0) if method == "annealed_langevin" else SubVPSDE()
    steps, opts = SMALL[method]
    run = lambda shape: sample(method, mix4.score_fn(sde), sde, shape, steps=steps, seed=5, dtype=F64, **opts)  # noqa: E731
    (img, nfe_img), (flat, nfe_flat) = run((16, 1, 2, 2)), run((16, 4))
    assert img.shape == (16, 1, 2, 2) and img.dtype == F64
    assert torch.allclose(img.reshape(16, 4), flat, atol=1e-12, rtol=0)
    assert nfe_img == nfe_flat


@pytest.mark.parametrize("method", samplers.METHODS)
def test_callback_and_progress_do_not_change_samples(method):
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    steps, opts = SMALL[method]
    seen = []
    plain, nfe = sample(method, MIX.score_fn(sde), sde, (16, 2), steps=steps, seed=2, **opts)
    watched, nfe2 = sample(method, MIX.score_fn(sde), sde, (16, 2), steps=steps, seed=2, progress=True,
                           callback=seen.append, **opts)
    assert torch.equal(plain, watched) and nfe == nfe2
    # One report per step (per score evaluation for the ODE), each with the state at that point.
    assert len(seen) == (nfe if method == "ode" else steps)
    assert all(info["x"].shape == (16, 2) for info in seen)


# method: (flat options as `sample` takes them, the sampler function, its grouped keyword arguments)
GROUPED = {
    "ancestral": ({"spacing": "trailing", "clip_sample": 1.5}, sample_ancestral,
                  {"chain": ChainOptions(spacing="trailing", clip_sample=1.5)}),
    "ddim": ({"eta": 0.5, "spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}, sample_ddim,
             {"eta": 0.5, "chain": ChainOptions(spacing="leading", steps_offset=1, set_alpha_to_one=False)}),
    "heun": ({"S_churn": 5.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.01}, sample_heun,
             {"churn": Churn(S_churn=5.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.01)}),
    "dpmpp_2m": ({"grid": "karras", "rho": 5.0, "lower_order_final": False}, sample_dpmpp_2m,
                 {"multistep": MultistepOptions(grid="karras", rho=5.0, lower_order_final=False)}),
    "dpmpp_2m_sde": ({"eta": 0.5, "grid": "uniform"}, sample_dpmpp_2m_sde,
                     {"eta": 0.5, "multistep": MultistepOptions(grid="uniform")}),
    "unipc": ({"order": 2, "variant": "bh1", "corrector": False, "rho": 3.0, "grid": "karras"}, sample_unipc,
              {"multistep": MultistepOptions(grid="karras", rho=3.0),
               "unipc": UniPCOptions(order=2, variant="bh1", corrector=False)}),
}


@pytest.mark.parametrize("method", list(GROUPED))
def test_flat_options_of_sample_reach_the_sampler_as_their_groups(method):
    """`sample` takes S_churn=..., spacing=..., order=... by name and hands the sampler the same run as
    the grouped values would; non-default values change the samples, so the options are not dropped."""
    flat, fn, grouped = GROUPED[method]
    sde = DDPMChain("linear", N=100) if method in ("ancestral", "ddim") else VPSDE()
    score, steps = MIX.score_fn(sde), 10
    x_T = sde.prior_sampling((32, 2), generator=torch.Generator().manual_seed(0)).double()

    def run(**opts):
        return sample(method, score, sde, (32, 2), steps=steps, x_T=x_T, seed=1, dtype=F64, **opts)[0]

    via_sample = run(**flat)
    with torch.no_grad():
        direct = fn(score, sde, x_T, steps=steps, generator=torch.Generator().manual_seed(1), **grouped)
    assert torch.equal(via_sample, direct)
    assert (via_sample - run()).abs().max() > 1e-6


def test_progress_bar_counts_the_steps(capsys):
    sde = VPSDE()
    sample("ddim", MIX.score_fn(sde), sde, (8, 2), steps=7, seed=0, progress=True)
    assert "7/7" in capsys.readouterr().err


def test_default_dtype_is_float32():
    sde = VPSDE()
    x, _ = sample("ddim", MIX.score_fn(sde), sde, (8, 2), steps=5, seed=0)
    assert x.dtype == torch.float32


# ---- samplers against reference formulas and against each other ----------------------------------------


def _prior(sde, n=256, seed=0):
    return sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("sde_name", list(SDES))
def test_ddim_eta0_converges_to_ode_map(sde_name):
    """DDIM with η = 0 is a first-order solver of the PF-ODE: same x_T, error ∝ 1/steps."""
    sde = SDES[sde_name]()
    score = MIX.score_fn(sde)
    x_T = _prior(sde, 128)
    ode = sample_ode(score, sde, x_T, steps=1, rtol=1e-8, atol=1e-8)
    rms = {n: (sample_ddim(score, sde, x_T, steps=n, generator=None, denoise=False) - ode)
           .pow(2).sum(1).mean().sqrt().item() for n in (250, 1000)}
    assert rms[1000] < 0.01
    assert rms[250] / rms[1000] > 2.5  # first order: 4 in the limit


@pytest.mark.parametrize("sde_name", list(SDES))
def test_heun_converges_to_ode_map_at_second_order(sde_name):
    sde = SDES[sde_name]()
    score = MIX.score_fn(sde)
    x_T = _prior(sde, 128)
    ode = sample_ode(score, sde, x_T, steps=1, rtol=1e-8, atol=1e-8)
    rms = {n: (sample_heun(score, sde, x_T, steps=n, generator=None) - ode).pow(2).sum(1).mean().sqrt().item()
           for n in (50, 100)}
    assert rms[100] < 0.005
    assert rms[50] / rms[100] > 3.0  # second order: 4 in the limit


@pytest.mark.parametrize("sde_name", list(SDES))
def test_ddim_eta1_is_ancestral_with_posterior_variance(sde_name):
    """DDIM at η = 1 and ancestral sampling with β̃ are two derivations of the same step."""
    sde = SDES[sde_name]()
    score = MIX.score_fn(sde)
    x_T = _prior(sde)
    a = sample_ancestral(score, sde, x_T, steps=30, generator=torch.Generator().manual_seed(7),
                         variance="beta_tilde")
    d = sample_ddim(score, sde, x_T, steps=30, generator=torch.Generator().manual_seed(7), eta=1.0)
    assert torch.allclose(a, d, atol=1e-10, rtol=0)


def test_vp_ancestral_is_ho_algorithm_2():
    """The (α, σ) form equals Ho et al. 2020, Alg. 2 written with β'_i = 1 − ᾱ(t_i)/ᾱ(t_{i−1})."""
    sde = VPSDE()
    score = MIX.score_fn(sde)
    x_T, steps = _prior(sde), 7
    ts = time_grid(sde, steps, eps=1e-3)
    got = sample_ancestral(score, sde, x_T, steps=steps, generator=torch.Generator().manual_seed(3),
                           variance="beta", denoise=False)
    g, x = torch.Generator().manual_seed(3), x_T
    for t, s in itertools.pairwise(ts):
        abar_t = torch.exp(-sde.integrated_beta(t))
        abar_s = torch.exp(-sde.integrated_beta(s))
        beta = 1 - abar_t / abar_s
        eps_hat = -torch.sqrt(1 - abar_t) * score(x, t.expand(x.shape[0]))
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = (x - beta / torch.sqrt(1 - abar_t) * eps_hat) / torch.sqrt(1 - beta) + torch.sqrt(beta) * z
    assert torch.allclose(got, x, atol=1e-10, rtol=0)


def test_ve_ancestral_is_smld_eq_47():
    """x_{i−1} = x_i + (σ_i² − σ_{i−1}²) s + √(σ_{i−1}²(σ_i² − σ_{i−1}²)/σ_i²) z (Song et al. 2021,
    eq. 47)."""
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    score = MIX.score_fn(sde)
    x_T, steps = _prior(sde), 7
    ts = time_grid(sde, steps, eps=1e-3)
    got = sample_ancestral(score, sde, x_T, steps=steps, generator=torch.Generator().manual_seed(3),
                           variance="beta_tilde", denoise=False)
    g, x = torch.Generator().manual_seed(3), x_T
    for t, s in itertools.pairwise(ts):
        sig_i, sig_prev = sde.sigma(t), sde.sigma(s)
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = (x + (sig_i**2 - sig_prev**2) * score(x, t.expand(x.shape[0]))
             + torch.sqrt(sig_prev**2 * (sig_i**2 - sig_prev**2) / sig_i**2) * z)
    assert torch.allclose(got, x, atol=1e-10, rtol=0)


def test_denoise_is_tweedie_at_eps():
    sde = VPSDE()
    score = MIX.score_fn(sde)
    x_T = _prior(sde)
    raw = sample_ddim(score, sde, x_T, steps=10, generator=None, denoise=False)
    den = sample_ddim(score, sde, x_T, steps=10, generator=None, denoise=True)
    t = torch.full((x_T.shape[0],), 1e-3, dtype=F64)
    alpha, sigma = sde.marginal_coeffs(t)
    expected = (raw + sigma[:, None] ** 2 * score(raw, t)) / alpha[:, None]
    assert torch.allclose(den, expected, atol=1e-12, rtol=0)


def test_counter_counts_calls():
    sde = VPSDE()
    c = ScoreCounter(MIX.score_fn(sde))
    x = torch.zeros(4, 2, dtype=F64)
    for _ in range(3):
        c(x, torch.full((4,), 0.5, dtype=F64))
    assert c.nfe == 3


# ---- bad input ----------------------------------------------------------------------------------------


def test_unknown_method_lists_methods():
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"method must be one of .*ancestral.*heun.*got 'ddpm'"):
        sample("ddpm", MIX.score_fn(sde), sde, (4, 2), steps=5, seed=0)


@pytest.mark.parametrize(("method", "option"), [("ancestral", "eta"), ("ode", "method"), ("pc", "S_churn")])
def test_unknown_option_lists_allowed(method, option):
    sde = VPSDE()
    expected = rf"unknown option\(s\) \['{option}'\] for method '{method}'; allowed"
    with pytest.raises(ValueError, match=expected):
        sample(method, MIX.score_fn(sde), sde, (4, 2), steps=30, seed=0, **{option: 1})


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_annealed_langevin_needs_ve(sde):
    with pytest.raises(ValueError, match="annealed_langevin needs a VE process"):
        sample("annealed_langevin", MIX.score_fn(sde), sde, (4, 2), steps=5, seed=0)


@pytest.mark.parametrize(("method", "steps", "options", "field"), [
    ("ddim", 10, {"eta": 1.5}, "eta"),
    ("ddim", 0, {}, "steps"),
    ("ancestral", 10, {"variance": "large"}, "variance"),
    ("ancestral", 10, {"grid": "cosine"}, "grid"),
    ("ode", 10, {"solver": "lsoda"}, "solver"),
    ("ode", 10, {"rtol": -1.0}, "rtol"),
    ("pc", 10, {}, "steps"),  # 10-step VP chain: β_i = 20/10 > 1
    ("pc", 100, {"snr": 0.0}, "snr"),
    ("heun", 10, {"S_churn": -1.0}, "S_churn"),
    ("euler_maruyama", 10, {"eps": 1.5}, "eps"),
])
def test_bad_option_values(method, steps, options, field):
    sde = VPSDE()
    calls = []
    score = lambda x, t: calls.append(1) or MIX.score_t(x, t, sde)  # noqa: E731
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        sample(method, score, sde, (4, 2), steps=steps, seed=0, **options)
    assert not calls  # rejected before any score evaluation
