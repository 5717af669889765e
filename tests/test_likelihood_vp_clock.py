"""`ode_likelihood(integration=Integration(variable=...))`: the noise-level integrations (the angle
θ = arctan σ̃, the default, and the VP clock) meet the exact mixture density to the same bounds as the
time integration (tests/test_likelihood.py), for VP, sub-VP and VE."""

import math

import pytest
import torch

from pipeline.diffusion.likelihood import Integration, ode_likelihood
from pipeline.diffusion.sde import VESDE, VPSDE, SubVPSDE
from tests.test_likelihood import F64, full, mixture

CLOCKS = ("angle", "vp")
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_max=200.0)}


@pytest.mark.parametrize("variable", CLOCKS)
@pytest.mark.parametrize("name", sorted(SDES))
def test_noise_level_clock_matches_the_mixture_density(name, variable):
    gm, d, B, eps = mixture(), 8, 6, 1e-5
    sde = SDES[name]()
    x = gm.sample(B, generator=torch.Generator().manual_seed(1)).double()
    res = ode_likelihood(gm.score_fn(sde), sde, x, trace="exact", rtol=1e-7, atol=1e-7, eps=eps,
                         integration=Integration(variable=variable))
    identity = (gm.log_prob_t(x, full(B, eps), sde) - gm.log_prob_t(res.latent, full(B, sde.T), sde)
                + sde.prior_logp(res.latent))
    assert ((res.logp - identity).abs() / d).max() < 1e-5
    truth = gm.log_prob_t(x, full(B, eps), sde) if name == "ve" else gm.log_prob(x)
    assert ((res.logp - truth).abs() / d).max() < 1e-3
    # The latent is the same x(T) the time integration reaches.
    ref = ode_likelihood(gm.score_fn(sde), sde, x, trace="exact", rtol=1e-7, atol=1e-7, eps=eps,
                         integration=Integration(variable="t"))
    torch.testing.assert_close(res.latent, ref.latent, rtol=1e-4, atol=1e-4)
    assert torch.allclose(res.bpd, -res.logp / (d * math.log(2)))


@pytest.mark.parametrize("variable", CLOCKS)
def test_noise_level_clock_with_probes_agrees_with_the_exact_trace(variable):
    gm, sde, B = mixture(d=4), VESDE(sigma_max=200.0), 5
    x = gm.sample(B, generator=torch.Generator().manual_seed(2)).double()
    clock = Integration(variable=variable)
    exact = ode_likelihood(gm.score_fn(sde), sde, x, trace="exact", rtol=1e-6, atol=1e-6, integration=clock)
    est = ode_likelihood(gm.score_fn(sde), sde, x, n_probes=64, rtol=1e-6, atol=1e-6, integration=clock,
                         generator=torch.Generator().manual_seed(3))
    assert ((est.logp - exact.logp).abs() <= 4 * est.stderr + 1e-6).all()
    assert est.samples.shape == (B, 64) and est.nfe > 0


def test_unknown_variable_is_rejected():
    gm, sde = mixture(d=2), VPSDE()
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="variable must be one of"):
        ode_likelihood(gm.score_fn(sde), sde, x, integration=Integration(variable="log_snr"))
