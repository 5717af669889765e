"""EMA with EDM's half-life in images: closed-form averages, half-life, ramp-up, state round trip."""

import io

import pytest
import torch
from torch import nn

from pipeline.models import EMA, UNet, build_unet, preset_config, unwrap_model


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("count", torch.zeros(2, dtype=torch.float64))


def set_params(model: nn.Module, value: torch.Tensor) -> None:
    """Write one flat vector into all parameters (the known parameter sequence θ_k)."""
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(value, model.parameters())


def shadow_vector(ema: EMA) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(ema.module.parameters())


def theta(k: int) -> torch.Tensor:
    return torch.sin(torch.arange(8, dtype=torch.float64) * 0.7 + k) * (1 + k)


def test_constant_beta_gives_the_geometric_average():
    model = Tiny()
    set_params(model, theta(0))
    ema = EMA(model, halflife_nimg=300.0, rampup_ratio=None)
    batch, n = 32, 25
    beta = 0.5 ** (batch / 300.0)
    for k in range(1, n + 1):
        set_params(model, theta(k))
        assert ema.update(model, batch) == pytest.approx(beta, rel=1e-15)
    # θ_ema,n = βⁿ θ_0 + (1 - β) Σ_k β^(n-k) θ_k
    want = beta**n * theta(0) + (1 - beta) * sum(beta ** (n - k) * theta(k) for k in range(1, n + 1))
    torch.testing.assert_close(shadow_vector(ema), want, rtol=1e-12, atol=1e-12)
    assert ema.nimg == batch * n


@pytest.mark.parametrize("batch", [10, 100, 250])
def test_weights_from_halflife_images_ago_count_one_half(batch):
    model = Tiny()
    set_params(model, torch.ones(8, dtype=torch.float64))
    ema = EMA(model, halflife_nimg=1000.0, rampup_ratio=None)
    set_params(model, torch.zeros(8, dtype=torch.float64))
    for _ in range(1000 // batch):
        ema.update(model, batch)
    # Whatever the batch size, after 1000 images the starting weights (1) have weight exactly ½.
    torch.testing.assert_close(shadow_vector(ema), torch.full((8,), 0.5, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_rampup_copies_first_then_follows_edm_schedule():
    model = Tiny()
    set_params(model, theta(0))
    ema = EMA(model, halflife_nimg=10_000.0, rampup_ratio=0.05)
    batch = 64
    set_params(model, theta(1))
    assert ema.update(model, batch) == 0.0  # no images seen yet: half-life 0, the average is the model
    torch.testing.assert_close(shadow_vector(ema), theta(1), rtol=0, atol=0)
    for step in range(1, 6):  # EDM: halflife = min(halflife_nimg, nimg_seen · ratio)
        want = 0.5 ** (batch / min(10_000.0, step * batch * 0.05))
        assert ema.update(model, batch) == pytest.approx(want, rel=1e-15)
    ema.nimg = 10**7  # far past the ramp: the configured half-life rules
    assert ema.beta(batch) == pytest.approx(0.5 ** (batch / 10_000.0), rel=1e-15)


def test_buffers_are_copied_and_shadow_is_frozen():
    model = Tiny()
    ema = EMA(model)
    model.count += 7
    ema.update(model, 4)
    assert torch.equal(ema.module.count, model.count)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    assert ema.module is not model and ema.module.lin.weight is not model.lin.weight


def test_state_dict_round_trip_through_weights_only_load():
    torch.manual_seed(0)
    model = build_unet("tiny-digits")
    ema = EMA(model, halflife_nimg=500.0, rampup_ratio=0.1)
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (k + 1))
        ema.update(model, 16)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    other = EMA(UNet(**preset_config("tiny-digits")))
    other.load_state_dict(state)
    assert (other.nimg, other.halflife_nimg, other.rampup_ratio) == (48, 500.0, 0.1)
    for (name, a), b in zip(ema.module.state_dict().items(), other.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # Both continue identically, and "module" loads straight into a bare network for sampling.
    assert ema.update(model, 16) == other.update(model, 16)
    fresh = UNet(**preset_config("tiny-digits"))
    fresh.load_state_dict(other.state_dict()["module"])
    for a, b in zip(ema.module.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_copy_to_writes_the_average_into_a_model():
    model, target = Tiny(), Tiny()
    ema = EMA(model, halflife_nimg=10.0, rampup_ratio=None)
    set_params(model, theta(3))
    ema.update(model, 5)
    ema.copy_to(target)
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(target.parameters()), shadow_vector(ema),
                               rtol=0, atol=0)


def test_wrapped_models_are_unwrapped():
    model = Tiny()
    compiled = torch.compile(model)  # wrapping is lazy: nothing is compiled until it is called
    parallel = nn.DataParallel(model)
    assert unwrap_model(compiled) is model and unwrap_model(parallel) is model
    assert unwrap_model(torch.compile(nn.DataParallel(model))) is model
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    ema = EMA(compiled, halflife_nimg=10.0, rampup_ratio=None)
    assert set(ema.state_dict()["module"]) == {"lin.weight", "lin.bias", "count"}  # no "_orig_mod." prefix
    set_params(model, theta(1))
    ema.update(parallel, 10)  # 10 images = one half-life
    torch.testing.assert_close(shadow_vector(ema), 0.5 * start + 0.5 * theta(1), rtol=1e-12, atol=1e-12)


def test_distributed_data_parallel_is_unwrapped():
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Tiny()
        start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        ema = EMA(ddp, halflife_nimg=10.0, rampup_ratio=None)
        assert set(ema.state_dict()["module"]) == {"lin.weight", "lin.bias", "count"}  # no "module." prefix
        set_params(model, theta(2))
        ema.update(ddp, 20)  # two half-lives: the start weighs ¼
        torch.testing.assert_close(shadow_vector(ema), 0.25 * start + 0.75 * theta(2), rtol=1e-12, atol=1e-12)
        assert torch.equal(ema.module.count, model.count)
    finally:
        dist.destroy_process_group()


def test_halflife_in_kimg_is_a_thousand_images():
    assert EMA(Tiny(), halflife_kimg=2.5).halflife_nimg == 2500.0
    assert EMA(Tiny()).halflife_nimg == 500_000.0  # EDM's default, 500 kimg


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="halflife_nimg"):
        EMA(Tiny(), halflife_nimg=0)
    with pytest.raises(ValueError, match="halflife_nimg"):
        EMA(Tiny(), halflife_kimg=-1)
    with pytest.raises(ValueError, match="not both"):
        EMA(Tiny(), halflife_nimg=10, halflife_kimg=1)
    with pytest.raises(ValueError, match="rampup_ratio"):
        EMA(Tiny(), rampup_ratio=-1)
    ema = EMA(Tiny())
    with pytest.raises(ValueError, match="batch_size"):
        ema.update(Tiny(), 0)
    with pytest.raises(ValueError, match="parameters do not match"):
        ema.update(nn.Linear(3, 2), 4)
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({"module": ema.module.state_dict()})
