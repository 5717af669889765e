"""The DDPM/DDPM++ U-Net: presets, DDPM's parameter count, gradients, conditioning, embeddings, errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models import PRESETS, UNet, build_unet, preset_config
from pipeline.models.layers import AttnBlock, FourierEmbedding, ResBlock, positional_embedding

DDPM_CIFAR10_PARAMS = 35_746_307  # Ho et al. 2020's CIFAR-10 model, as counted in diffusion_tf


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_zero_layers(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Re-draw the zero-initialised weights (conv2, attention proj, conv_out), else the output is 0 and
    no gradient reaches anything below the output conv."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def inputs(model: UNet, batch: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=g, dtype=dtype)
    return x, torch.rand(batch, generator=g, dtype=dtype) * 999


def tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return build_unet("tiny-digits", **overrides)


# ---- presets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_maps_x_to_its_own_shape(preset):
    torch.manual_seed(0)
    model = build_unet(preset).eval()
    x, t = inputs(model, 2)
    with torch.no_grad():
        assert model(x, t).shape == x.shape
        if model.num_classes is not None:
            y = model(x, t, torch.tensor([0, model.num_classes - 1]))
            assert y.shape == x.shape and torch.isfinite(y).all()


def test_ddpm_cifar10_has_ddpm_parameter_count():
    count = n_params(build_unet("ddpm-cifar10"))
    print(f"ddpm-cifar10 parameters: {count:,}")
    assert abs(count - 35.7e6) < 0.1e6
    assert count == DDPM_CIFAR10_PARAMS
    # Class conditioning adds exactly one (K+1) × 4·ch embedding table.
    assert n_params(build_unet("ddpm-cifar10-cond")) == count + 11 * 512


def test_preset_config_rebuilds_the_same_network():
    cfg = preset_config("small-32", num_classes=3)
    torch.manual_seed(0)
    a = build_unet("small-32", num_classes=3)
    # Lists instead of tuples, as after a JSON round trip, must build the same network.
    b = UNet(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
    assert a.config == cfg == b.config
    randomize_zero_layers(a)
    b.load_state_dict(a.state_dict())  # strict: identical names and shapes
    x, t = inputs(a, 2)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x, t), b.eval()(x, t), rtol=0, atol=0)


def test_fresh_network_outputs_zero_and_fresh_resblock_is_identity():
    model = tiny().eval()
    x, t = inputs(model, 3)
    with torch.no_grad():
        assert torch.equal(model(x, t, torch.tensor([0, 5, 10])), torch.zeros_like(x))
        block = ResBlock(16, 16, emb_dim=8, dropout=0.0).eval()
        h = torch.randn(2, 16, 4, 4)
        assert torch.equal(block(h, torch.randn(2, 8)), h)


# ---- gradients and conditioning ---------------------------------------------------------------------

VARIANTS = {
    "ddpm": {},
    "ddpm++": dict(embedding_type="fourier", scale_shift=True, skip_rescale=True, num_heads=2),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_parameter_gets_a_finite_nonzero_gradient(variant):
    model = tiny(**VARIANTS[variant]).train()
    randomize_zero_layers(model)
    x, t = inputs(model, 4)
    labels = torch.tensor([0, 3, 9, model.null_label])
    loss = (model(x, t, labels) - x).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_class_labels_change_the_output_and_none_means_null():
    model = tiny().eval()
    randomize_zero_layers(model)
    x, t = inputs(model, 2)
    x, t = x[:1].expand(2, -1, -1, -1), t[:1].expand(2)  # one image, one noise level
    with torch.no_grad():
        out = model(x, t, torch.tensor([1, 2]))
        null = model(x, t, torch.full((2,), model.null_label))
        assert (out[0] - out[1]).abs().max() > 1e-3  # two real labels
        assert (out[0] - null[0]).abs().max() > 1e-3  # a real label vs the null label
        torch.testing.assert_close(model(x, t, None), null, rtol=0, atol=0)


def test_samples_do_not_interact_across_the_batch():
    model = tiny(num_heads=2).eval()
    randomize_zero_layers(model)
    x, t = inputs(model, 5, dtype=torch.float64)
    model = model.double()
    labels = torch.arange(5)
    with torch.no_grad():
        whole = model(x, t, labels)
        one_by_one = torch.cat([model(x[i:i + 1], t[i:i + 1], labels[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(whole, one_by_one, rtol=1e-10, atol=1e-12)


# ---- layers against reference formulas -------------------------------------------------------------

def test_positional_embedding_matches_ddpm_sinusoid_formula():
    t = np.array([0.0, 1.0, 10.5, 999.0])
    dim, half = 8, 4
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))  # DDPM get_timestep_embedding
    want = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    got = positional_embedding(torch.tensor(t, dtype=torch.float64), dim)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got[0].numpy(), [0, 0, 0, 0, 1, 1, 1, 1])
    odd = positional_embedding(torch.tensor(t, dtype=torch.float64), dim + 1)
    np.testing.assert_allclose(odd[:, :dim].numpy(), want, rtol=0, atol=1e-12)
    assert torch.equal(odd[:, dim], torch.zeros(4, dtype=torch.float64))
    # Half-precision labels are embedded in float32: bf16 cannot hold sin(999 t) to any accuracy.
    assert positional_embedding(torch.tensor([999.0], dtype=torch.bfloat16), dim).dtype == torch.float32
    # The network embeds with `channels` dims.
    model = tiny()
    np.testing.assert_allclose(model.noise_embed(torch.tensor(t)).numpy(),
                               positional_embedding(torch.tensor(t), 32).numpy(), rtol=0, atol=0)


def test_fourier_embedding_shape_and_formula():
    torch.manual_seed(0)
    emb = FourierEmbedding(16, scale=16.0).double()
    t = torch.tensor([-1.5, 0.0, 0.25, 3.0], dtype=torch.float64)
    out = emb(t)
    assert out.shape == (4, 16)
    w = emb.freqs
    want = torch.cat([torch.sin(2 * math.pi * t[:, None] * w), torch.cos(2 * math.pi * t[:, None] * w)], 1)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    # The random frequencies are saved with the weights but never trained.
    assert "freqs" in emb.state_dict() and not list(emb.parameters())
    model = tiny(embedding_type="fourier")
    assert model.noise_embed(t.float()).shape == (4, 32)
    assert "noise_embed.freqs" in model.state_dict()


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_block_matches_explicit_multihead_attention(num_heads):
    torch.manual_seed(0)
    B, C, H, W = 2, 16, 4, 4
    block = AttnBlock(C, num_heads=num_heads).double()
    torch.nn.init.normal_(block.proj.weight, std=0.2)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    # DDPM's attn_block, one head per C/heads slice: softmax(q kᵀ/√d) v, proj, residual.
    h = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    tok = h.reshape(B, C, H * W).transpose(1, 2)
    q, k, v = (tok @ block.qkv.weight.T + block.qkv.bias).split(C, dim=-1)
    d = C // num_heads
    heads = []
    for i in range(num_heads):
        qi, ki, vi = (z[..., i * d:(i + 1) * d] for z in (q, k, v))
        w = torch.softmax(torch.einsum("bqc,bkc->bqk", qi, ki) / math.sqrt(d), dim=-1)
        heads.append(torch.einsum("bqk,bkc->bqc", w, vi))
    o = torch.cat(heads, -1) @ block.proj.weight.T + block.proj.bias
    want = x + o.transpose(1, 2).reshape(B, C, H, W)
    torch.testing.assert_close(block(x), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), want, rtol=1e-10, atol=1e-12)


def test_scale_shift_resblock_is_film_on_the_second_norm():
    torch.manual_seed(0)
    block = ResBlock(8, 12, emb_dim=6, scale_shift=True, skip_rescale=True).double().eval()
    torch.nn.init.normal_(block.conv2.weight, std=0.1)
    x, emb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = (emb @ block.emb_proj.weight.T + block.emb_proj.bias).chunk(2, dim=1)
    h = block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    want = (block.skip(x) + block.conv2(F.silu(h))) / math.sqrt(2)
    torch.testing.assert_close(block(x, emb), want, rtol=1e-10, atol=1e-12)


# ---- memory format and precision ---------------------------------------------------------------------

def test_channels_last_and_bf16_autocast():
    model = tiny(**VARIANTS["ddpm++"]).eval()
    randomize_zero_layers(model)
    x, t = inputs(model, 3)
    labels = torch.tensor([0, 4, 10])
    with torch.no_grad():
        ref = model(x, t, labels)
        cl_model = model.to(memory_format=torch.channels_last)
        cl = cl_model(x.to(memory_format=torch.channels_last), t, labels)
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = cl_model(x.to(memory_format=torch.channels_last), t, labels)
    assert low.dtype == x.dtype and torch.isfinite(low).all()
    rel = (low - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 output deviates by {rel:.3f} relative"


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    model = tiny(**VARIANTS["ddpm++"]).eval()
    randomize_zero_layers(model)
    x, t = inputs(model, 2)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, torch.tensor([1, 10])), model(x, t, torch.tensor([1, 10])),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-4, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------

def test_unknown_preset_or_override_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"ddpm-cifar10.*tiny-digits"):
        build_unet("ddpm-imagenet")
    with pytest.raises(ValueError, match=r"num_channels.*allowed.*channel_mult"):
        build_unet("tiny-digits", num_channels=64)
    with pytest.raises(ValueError, match="preset"):
        preset_config("nope")


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=10, channel_mult=(1, 2, 2)), "image_size"),
    (dict(image_size=12, channel_mult=(1, 2, 2, 2)), "image_size"),
    (dict(attn_resolutions=(3,)), "attn_resolutions"),
    (dict(num_heads=3), "num_heads"),
    (dict(embedding_type="learned"), "embedding_type"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_classes=0), "num_classes"),
    (dict(channel_mult=()), "channel_mult"),
])
def test_bad_configuration_raises(overrides, field):
    with pytest.raises(ValueError, match=field):
        build_unet("tiny-digits", **overrides)


def test_bad_labels_and_shapes_raise():
    model = tiny().eval()
    x, t = inputs(model, 3)
    for bad in (torch.tensor([0, 1, 11]), torch.tensor([-1, 0, 0])):
        with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\]"):
            model(x, t, bad)
    with pytest.raises(ValueError, match="class_labels must have shape"):
        model(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        model(x, t, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="noise_labels"):
        model(x, t[:2])
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(3, 3, 8, 8), t)
    with pytest.raises(ValueError, match="unconditional"):
        build_unet("small-32")(torch.randn(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        _ = build_unet("small-32").null_label
    # The null label K itself and a scalar noise label are valid.
    with torch.no_grad():
        assert model(x, torch.tensor(5.0), torch.tensor([10, 10, 0])).shape == x.shape
