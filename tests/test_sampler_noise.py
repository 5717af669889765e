"""The starting point and noise source of `samplers.sample`: x_T and randn_like, per-sample streams.

Ground truth is the existing seeded path: feeding `sample` the same draws through x_T and `noise`
must reproduce `sample(seed=...)` bit for bit, and a sample regenerated alone with its own generators
must equal its row of the batch run (the exact Gaussian-mixture score acts row by row).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import samplers
from pipeline.diffusion.chain import DDPMChain
from pipeline.diffusion.samplers import per_sample_noise, per_sample_prior, sample
from pipeline.diffusion.sde import VESDE, VPSDE
from pipeline.diffusion.toy import GaussianMixture

F64 = torch.float64
MIX = GaussianMixture(
    torch.tensor([0.6, 0.4], dtype=F64),
    torch.tensor([[-1.5, 0.5], [1.0, -0.5]], dtype=F64),
    torch.tensor([[[0.3, 0.05], [0.05, 0.2]], [[0.2, 0.0], [0.0, 0.25]]], dtype=F64),
)
SMALL = {
    "ancestral": (12, {}), "ddim": (12, {"eta": 0.7}), "euler_maruyama": (12, {}),
    "pc": (25, {"snr_norm": "sample"}), "annealed_langevin": (4, {"n_steps_each": 3, "step_lr": 1e-5}),
    "ode": (4, {"solver": "rk4"}), "heun": (8, {"S_churn": 3.0}),
    "dpmpp_2m": (6, {}), "dpmpp_2m_sde": (6, {"eta": 1.0}), "unipc": (6, {}),
}
STOCHASTIC = ("ancestral", "ddim", "euler_maruyama", "pc", "annealed_langevin", "heun", "dpmpp_2m_sde")


def _sde(method: str):
    return VESDE(sigma_min=0.01, sigma_max=20.0) if method == "annealed_langevin" else VPSDE()


@pytest.mark.parametrize("method", samplers.METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_x_T_and_noise_fed_the_seeded_draws_reproduce_sample_seed(method, dtype):
    sde = _sde(method)
    steps, opts = SMALL[method]
    shape, seed = (32, 2), 11
    want, nfe = sample(method, MIX.score_fn(sde), sde, shape, steps=steps, seed=seed, dtype=dtype, **opts)
    # The same generator, in the same order: first the prior draw, then every in-trajectory draw.
    g = torch.Generator().manual_seed(seed)
    x_T = sde.prior_sampling(shape, generator=g)
    randn_like = lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)  # noqa: E731
    got, nfe2 = sample(method, MIX.score_fn(sde), sde, shape, steps=steps, x_T=x_T, noise=randn_like,
                       dtype=dtype, **opts)
    assert torch.equal(got, want) and nfe == nfe2
    # The noise source takes precedence over the seed: a seed alongside changes nothing.
    if method in STOCHASTIC:
        g.manual_seed(seed)
        x_T = sde.prior_sampling(shape, generator=g)
        again, _ = sample(method, MIX.score_fn(sde), sde, shape, steps=steps, seed=999, x_T=x_T,
                          noise=randn_like, dtype=dtype, **opts)
        assert torch.equal(again, want)


@pytest.mark.parametrize("method", STOCHASTIC)
def test_sample_k_regenerated_alone_equals_row_k_of_the_batch(method):
    """Bit-exact (torch.equal): each row's arithmetic does not depend on the other rows."""
    sde = _sde(method)
    steps, opts = SMALL[method]
    B, k = 16, 5
    gens = lambda idx: [torch.Generator().manual_seed(1000 + i) for i in idx]  # noqa: E731
    x_T = per_sample_prior(sde, (B, 2), gens(range(B)))
    full, _ = sample(method, MIX.score_fn(sde), sde, (B, 2), steps=steps, x_T=x_T,
                     noise=per_sample_noise(gens(range(B))), **opts)
    x_k = per_sample_prior(sde, (1, 2), gens([k]))
    assert torch.equal(x_k[0], x_T[k])
    alone, _ = sample(method, MIX.score_fn(sde), sde, (1, 2), steps=steps, x_T=x_k,
                      noise=per_sample_noise(gens([k])), **opts)
    assert torch.equal(alone[0], full[k])
    # Noise really enters: other streams give another sample.
    other, _ = sample(method, MIX.score_fn(sde), sde, (1, 2), steps=steps, x_T=x_k,
                      noise=per_sample_noise(gens([B + 1])), **opts)
    assert (other - alone).abs().max() > 1e-3


def test_batch_averaged_pc_norms_couple_the_batch():
    """score_sde's default corrector averages norms over the batch, so only snr_norm='sample' is
    regenerable row by row; the test shows the option matters."""
    sde = VPSDE()
    B, k = 8, 2
    gens = lambda idx: [torch.Generator().manual_seed(50 + i) for i in idx]  # noqa: E731
    x_T = per_sample_prior(sde, (B, 2), gens(range(B)))
    full, _ = sample("pc", MIX.score_fn(sde), sde, (B, 2), steps=25, x_T=x_T,
                     noise=per_sample_noise(gens(range(B))))
    alone, _ = sample("pc", MIX.score_fn(sde), sde, (1, 2), steps=25, x_T=x_T[k : k + 1],
                      noise=per_sample_noise(gens([k])))
    assert (alone[0] - full[k]).abs().max() > 1e-6


def test_per_sample_noise_rows_come_from_their_generators():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    z = per_sample_noise(gens)(torch.empty(2, 3, 2, dtype=F64))
    assert z.shape == (2, 3, 2) and z.dtype == F64
    assert torch.equal(z[1], torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=F64))


def test_bad_starting_points_and_noise_sources_are_refused():
    sde = VPSDE()
    score = MIX.score_fn(sde)
    with pytest.raises(ValueError, match="x_T must be a tensor of shape"):
        sample("ddim", score, sde, (4, 2), steps=3, x_T=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="seed must be an int unless x_T"):
        sample("ancestral", score, sde, (4, 2), steps=3)
    with pytest.raises(ValueError, match="seed must be an int unless x_T"):
        sample("ancestral", score, sde, (4, 2), steps=3, x_T=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="noise must be None or a callable"):
        sample("ancestral", score, sde, (4, 2), steps=3, seed=0, noise=5)
    with pytest.raises(ValueError, match="noise\\(x\\) must return a tensor of shape"):
        sample("ancestral", score, sde, (4, 2), steps=3, seed=0, noise=lambda x: torch.zeros(1))
    with pytest.raises(ValueError, match="2 generators but x has batch size 4"):
        sample("ancestral", score, sde, (4, 2), steps=3, x_T=torch.zeros(4, 2),
               noise=per_sample_noise([torch.Generator(), torch.Generator()]))
    with pytest.raises(ValueError, match="B = len\\(generators\\) = 1"):
        per_sample_prior(sde, (2, 2), [torch.Generator()])
    with pytest.raises(ValueError, match="snr_norm must be one of"):
        sample("pc", score, sde, (4, 2), steps=3, seed=0, snr_norm="global")
    # Deterministic methods need no seed once x_T is given.
    x, _ = sample("ddim", score, sde, (4, 2), steps=3, x_T=torch.zeros(4, 2))
    assert x.shape == (4, 2)


@pytest.mark.parametrize(("method", "opts"), [("ancestral", {"spacing": "trailing"}),
                                              ("ddim", {"eta": 1.0, "spacing": "linspace"})])
def test_regeneration_on_an_exact_chain(method, opts):
    """The chain's respaced samplers draw through the same noise source (torch.equal)."""
    chain = DDPMChain("linear")
    score = MIX.score_fn(chain)
    gens = lambda idx: [torch.Generator().manual_seed(70 + i) for i in idx]  # noqa: E731
    x_T = per_sample_prior(chain, (8, 2), gens(range(8)))
    full, _ = sample(method, score, chain, (8, 2), steps=20, x_T=x_T, noise=per_sample_noise(gens(range(8))),
                     **opts)
    alone, _ = sample(method, score, chain, (1, 2), steps=20, x_T=x_T[3:4], noise=per_sample_noise(gens([3])),
                      **opts)
    assert torch.equal(alone[0], full[3])
