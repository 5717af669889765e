"""Side by side with diffusers' DDPMScheduler / DDIMScheduler (test-only extra; skipped without it).

One random ε-net, the same x_T and the same noise stream, float64 throughout: diffusers computes its
tables in float32, so they are rebuilt with its own formula (torch.linspace of β) in float64, as
FIELD-NOTES advises. Our samplers run on `DDPMChain` through `samplers.sample` with a `noise` source
fed from a generator seeded as diffusers' is. x₀ must agree within 1e-5 (we see ~1e-12).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.chain import DDPMChain
from pipeline.diffusion.param import make_score_fn
from pipeline.diffusion.samplers import sample

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
SHAPE = (3, 2, 4, 4)
N = 1000


class RandomEpsNet(torch.nn.Module):
    """A fixed random ε-net of (x, timestep label): a tanh MLP on x plus a sinusoidal label embedding."""

    def __init__(self, d: int = 32, hidden: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.A = torch.randn(d, hidden, generator=g, dtype=F64) / d**0.5
        self.B = torch.randn(hidden, d, generator=g, dtype=F64) / hidden**0.5
        self.freqs = torch.exp(-torch.arange(hidden, dtype=F64) / hidden * 9.0)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, class_labels=None) -> torch.Tensor:
        emb = torch.sin(labels.to(F64).reshape(-1, 1) * self.freqs)
        return (torch.tanh(x.reshape(x.shape[0], -1) @ self.A + emb) @ self.B).reshape(x.shape)


NET = RandomEpsNet()
CHAIN = DDPMChain("linear", N)


def _float64_tables(sched) -> None:
    betas = torch.linspace(sched.config.beta_start, sched.config.beta_end, N, dtype=F64)
    sched.betas = betas
    sched.alphas = 1.0 - betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
    sched.one = torch.tensor(1.0, dtype=F64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = (torch.tensor(1.0, dtype=F64) if sched.config.set_alpha_to_one
                                     else sched.alphas_cumprod[0])


def _x_T() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)


def _run_diffusers(sched, steps: int, **step_kwargs) -> torch.Tensor:
    _float64_tables(sched)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(7)
    x = _x_T()
    for t in sched.timesteps:
        eps = NET(x, torch.full((SHAPE[0],), float(t), dtype=F64))
        x = sched.step(eps, t, x, generator=g, **step_kwargs).prev_sample
    return x


def _run_ours(method: str, steps: int, **options) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    noise = lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)  # noqa: E731
    score = make_score_fn(NET, CHAIN, "eps", noise_label_kind="time")
    x, nfe = sample(method, score, CHAIN, SHAPE, steps=steps, x_T=_x_T(), noise=noise, dtype=F64, **options)
    assert nfe == steps
    return x


CASES = [(1000, "leading", 0), (50, "leading", 0), (50, "leading", 1), (50, "trailing", 0),
         (50, "linspace", 0)]


@pytest.mark.parametrize(("steps", "spacing", "offset"), CASES)
@pytest.mark.parametrize(("variance_type", "ours"), [("fixed_small", "beta_tilde"), ("fixed_large", "beta")])
def test_ancestral_matches_ddpm_scheduler(steps, spacing, offset, variance_type, ours):
    sched = diffusers.DDPMScheduler(num_train_timesteps=N, beta_schedule="linear", clip_sample=False,
                                    variance_type=variance_type, timestep_spacing=spacing,
                                    steps_offset=offset)
    want = _run_diffusers(sched, steps)
    got = _run_ours("ancestral", steps, variance=ours, spacing=spacing, steps_offset=offset)
    assert (got - want).abs().max() <= 1e-5
    assert want.abs().max() > 0.1  # a real sample, not a vanishing one


@pytest.mark.parametrize(("steps", "spacing", "offset"), CASES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_matches_ddim_scheduler(steps, spacing, offset, eta, set_alpha_to_one):
    if steps == 1000 and not set_alpha_to_one:
        pytest.skip("set_alpha_to_one is covered at 50 steps")
    sched = diffusers.DDIMScheduler(num_train_timesteps=N, beta_schedule="linear", clip_sample=False,
                                    set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing,
                                    steps_offset=offset)
    want = _run_diffusers(sched, steps, eta=eta)
    got = _run_ours("ddim", steps, eta=eta, spacing=spacing, steps_offset=offset,
                    set_alpha_to_one=set_alpha_to_one)
    assert (got - want).abs().max() <= 1e-5


def test_clip_sample_matches():
    sched = diffusers.DDPMScheduler(num_train_timesteps=N, beta_schedule="linear", clip_sample=True,
                                    timestep_spacing="leading")
    want = _run_diffusers(sched, 50)
    got = _run_ours("ancestral", 50, clip_sample=1.0)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 50, 333, 1000])
def test_timesteps_equal_diffusers(spacing, steps):
    from pipeline.diffusion.respace import chain_timesteps

    sched = diffusers.DDPMScheduler(num_train_timesteps=N, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    assert chain_timesteps(N, steps, spacing) == sched.timesteps.tolist()


def test_float32_tables_of_diffusers_agree_with_the_chain():
    sched = diffusers.DDPMScheduler(num_train_timesteps=N, beta_schedule="linear")
    torch.testing.assert_close(sched.alphas_cumprod.double(), CHAIN.alphas_cumprod, rtol=5e-5, atol=0)
    cos = diffusers.DDPMScheduler(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(cos.alphas_cumprod.double(), DDPMChain("cosine").alphas_cumprod,
                               rtol=5e-5, atol=1e-7)
