"""DPM-Solver++(2M), its SDE variant and UniPC against the exact Gaussian-mixture ground truth of
tests/test_samplers.py, on VP, sub-VP and VE alike."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.multistep import (
    UniPCOptions,
    multistep_grid,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_unipc,
)
from pipeline.diffusion.samplers import MULTISTEP_METHODS, sample, sample_ddim, sample_heun, sample_ode
from pipeline.diffusion.sde import VPSDE, CosineVPSDE
from tests.test_samplers import MIX, SDES, N, _assign, _spread, assert_reproduces_mixture
from tests.test_samplers import reference as reference  # the module-scoped fixture

F64 = torch.float64


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize(("method", "steps", "options"), [
    ("dpmpp_2m", 25, {}),
    ("dpmpp_2m_sde", 40, {}),
    ("unipc", 20, {}),
    ("unipc", 25, {"order": 2, "variant": "bh1", "grid": "karras"}),
])
def test_multistep_reproduces_mixture(sde_name, method, steps, options, reference):
    sde = SDES[sde_name]()
    # sub-VP spans σ̃ from 1e-4 to 10³ (VP: 3e-2 to 10²): more log-SNR to cover, as for Heun's 40 steps.
    steps = max(steps, 40) if sde_name == "subvp" else steps
    x, nfe = sample(method, MIX.score_fn(sde), sde, (N, 2), steps=steps, seed=1, dtype=F64, **options)
    assert_reproduces_mixture(x, reference)
    assert nfe == steps  # one score evaluation per step, the corrector included


@pytest.mark.parametrize("method", MULTISTEP_METHODS)
def test_cosine_vp_reproduces_mixture(method, reference):
    """The cosine schedule's σ̃ inverse near t_max, through the log-SNR grid."""
    sde = CosineVPSDE()
    x, nfe = sample(method, MIX.score_fn(sde), sde, (N, 2), steps=40, seed=1, dtype=F64)
    assert_reproduces_mixture(x, reference)
    assert nfe == 40


# ---- the acceptance comparison: fewer NFE than EDM's Heun for the same sample error -------------------

BIG = 20_000


def _moment_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The statistics of test_samplers.assert_reproduces_mixture, summed: |Δ mean|₁ + |Δ cov|₁ +
    |Δ spread| + |Δ component fractions|₁ against the exact mixture (spread and fractions from `ref`)."""
    C = torch.cov(x.T)
    p = torch.bincount(_assign(x), minlength=MIX.K).double() / x.shape[0]
    p_ref = torch.bincount(_assign(ref), minlength=MIX.K).double() / ref.shape[0]
    return float((x.mean(0) - MIX.mean()).abs().sum() + (C - MIX.cov()).abs().sum()
                 + (_spread(x).mean() - _spread(ref).mean()).abs() + (p - p_ref).abs().sum())


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_fast_solvers_beat_heun_at_equal_and_at_more_nfe(sde_name):
    sde = SDES[sde_name]()
    ref = MIX.sample(400_000, generator=torch.Generator().manual_seed(12345)).double()
    score = MIX.score_fn(sde)
    x_T = sde.prior_sampling((BIG, 2), generator=torch.Generator().manual_seed(0)).double()

    def err(method: str, steps: int) -> tuple[float, int]:
        x, nfe = sample(method, score, sde, (BIG, 2), steps=steps, seed=0, dtype=F64)
        assert torch.equal(sde.prior_sampling((BIG, 2), generator=torch.Generator().manual_seed(0)).double(),
                           x_T)  # every method starts from the same x_T
        return _moment_error(x.double(), ref), nfe

    heun_20, _ = err("heun", 10)  # 19 NFE
    heun_30, nfe_h30 = err("heun", 15)  # 29 NFE
    floor = _moment_error(sample_ode(score, sde, x_T, steps=1, rtol=1e-8, atol=1e-8), ref)
    for method, steps in (("dpmpp_2m", 20), ("unipc", 15)):
        e, nfe = err(method, steps)
        assert nfe <= 20 < nfe_h30
        # At 15–20 NFE the fast solver is closer than Heun at 29 NFE, and 3× closer than Heun at 19.
        assert e < heun_30, (method, e, heun_30)
        assert e < heun_20 / 3, (method, e, heun_20)
        assert e > floor / 3  # the comparison is above the Monte-Carlo floor of this measure


# ---- exact relations --------------------------------------------------------------------------------------


def _prior(sde, n=512, seed=0):
    return sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("sde_name", list(SDES))
def test_first_order_step_is_ddim(sde_name):
    """With one step (lower order at the end), DPM-Solver++ is DDIM (Lu et al. 2022b, Sec. 4.1)."""
    sde = SDES[sde_name]()
    x_T = _prior(sde)
    got = sample_dpmpp_2m(MIX.score_fn(sde), sde, x_T, steps=1)
    want = sample_ddim(MIX.score_fn(sde), sde, x_T, steps=1, generator=None, denoise=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_unip2_bh2_without_corrector_is_dpmpp_2m(sde_name):
    """UniP-2 with B(h) = e^h − 1 and ρ = ½ is DPM-Solver++(2M) (Zhao et al. 2023, Sec. 3.2)."""
    sde = SDES[sde_name]()
    x_T = _prior(sde)
    a = sample_unipc(MIX.score_fn(sde), sde, x_T, steps=8,
                     unipc=UniPCOptions(order=2, variant="bh2", corrector=False))
    b = sample_dpmpp_2m(MIX.score_fn(sde), sde, x_T, steps=8)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dpmpp_2m_sde_with_eta0_is_the_ode_solver():
    sde = VPSDE()
    x_T = _prior(sde)
    a = sample_dpmpp_2m_sde(MIX.score_fn(sde), sde, x_T, steps=8, generator=None, eta=0.0)
    torch.testing.assert_close(a, sample_dpmpp_2m(MIX.score_fn(sde), sde, x_T, steps=8), rtol=0, atol=0)


@pytest.mark.parametrize("method", [sample_dpmpp_2m, sample_unipc])
def test_solvers_converge_to_the_ode_map_at_second_order_or_better(method):
    sde = VPSDE()
    x_T = _prior(sde, n=256)
    score = MIX.score_fn(sde)
    ref = sample_ode(score, sde, x_T, steps=1, rtol=1e-10, atol=1e-10)
    e = [float((method(score, sde, x_T, steps=n) - ref).norm(dim=1).mean()) for n in (20, 40)]
    assert e[0] / e[1] > 3.0, e  # 4 for exact second order


def test_noise_callable_replaces_the_generator():
    sde = VPSDE()
    x_T = _prior(sde, n=64)
    score = MIX.score_fn(sde)
    base = sample_dpmpp_2m_sde(score, sde, x_T, steps=6, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    via_noise = sample_dpmpp_2m_sde(score, sde, x_T, steps=6, generator=torch.Generator().manual_seed(99),
                                    noise=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    torch.testing.assert_close(via_noise, base, rtol=0, atol=0)
    other = sample_dpmpp_2m_sde(score, sde, x_T, steps=6, generator=torch.Generator().manual_seed(6))
    assert (other - base).abs().max() > 1e-3


def test_logsnr_grid_is_uniform_in_lambda():
    sde = VPSDE()
    t = multistep_grid(sde, 10, eps=1e-3)
    lam = -torch.log(sde.edm_sigma(t))
    assert t[0] == sde.T and t[-1] == 1e-3
    torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(10), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("method", "options", "field"), [
    ("dpmpp_2m", {"grid": "cosine"}, "grid"),
    ("unipc", {"order": 4}, "order"),
    ("unipc", {"variant": "bh3"}, "variant"),
    ("dpmpp_2m_sde", {"eta": 1.5}, "eta"),
    ("dpmpp_2m", {"rho": 0.0}, "rho"),
    ("unipc", {"corrector": 1}, "corrector"),
])
def test_bad_options_rejected_before_any_score_evaluation(method, options, field):
    sde = VPSDE()
    calls = []
    score = lambda x, t: calls.append(1) or MIX.score_t(x, t, sde)  # noqa: E731
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        sample(method, score, sde, (4, 2), steps=5, seed=0, **options)
    assert not calls
    assert method in MULTISTEP_METHODS


def test_heun_reference_uses_the_same_process():
    # Guard for the comparison above: Heun with many steps does reach the floor on this measure.
    sde = VPSDE()
    x_T = _prior(sde, n=256)
    score = MIX.score_fn(sde)
    ref = sample_ode(score, sde, x_T, steps=1, rtol=1e-10, atol=1e-10)
    assert float((sample_heun(score, sde, x_T, steps=200, generator=None) - ref).norm(dim=1).mean()) < 5e-3
