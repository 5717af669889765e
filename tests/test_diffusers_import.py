"""Importing a diffusers UNet2DModel + scheduler (diffusers is a test-only extra; skipped without it).

Ground truth is diffusers' own forward pass: the imported network must give its outputs on the same
input and integer timestep, and the export must load through the project's sampling loader unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.diffusion.chain import DDPMChain
from pipeline.diffusion.param import noise_label
from pipeline.models.diffusers_import import (
    chain_from_scheduler,
    convert_unet,
    read_safetensors,
    unet_overrides,
)

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# google/ddpm-cifar10-32's UNet2DModel configuration (Ho et al. 2020's CIFAR-10 network).
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_eps=1e-6,
    downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, attention_head_dim=None, dropout=0.1)
# The same layout, small enough for the file-level tests.
SMALL = {**DDPM_CIFAR10, "sample_size": 8, "layers_per_block": 1, "block_out_channels": (128, 128),
         "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
         "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
             "variance_type": "fixed_large", "clip_sample": True, "prediction_type": "epsilon"}


def _random_unet(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but perturb all weights to be sure
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _tensors(model) -> dict[str, torch.Tensor]:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return read_safetensors(safetensors_torch.save(state))


def test_ddpm_cifar10_import_counts_35746307_parameters_and_gives_equal_outputs():
    theirs = _random_unet(DDPM_CIFAR10)
    assert sum(p.numel() for p in theirs.parameters()) == 35_746_307
    ours, overrides = convert_unet(dict(theirs.config), _tensors(theirs))
    ours.eval()
    assert sum(p.numel() for p in ours.parameters()) == 35_746_307
    assert overrides["downsample_pad"] == "tf_same" and overrides["attn_resolutions"] == [16]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 999])
    with torch.no_grad():
        want = theirs(x, t).sample
        got = ours(x, t.float())
    assert (got - want).abs().max() <= 1e-5
    # The padding option matters: DDPM's TF SAME windows are not the symmetric ones.
    ours.down[0][-1].pad = "symmetric"
    ours.down[0][-1].conv.padding = (1, 1)
    with torch.no_grad():
        assert (ours(x, t.float()) - want).abs().max() > 1e-3


def _write_folder(root, model, scheduler: dict, *, layout: str = "flat") -> str:
    unet_dir = root / "unet" if layout == "pipeline" else root
    sched_dir = root / "scheduler" if layout == "pipeline" else root
    model.save_pretrained(unet_dir, safe_serialization=True)
    sched_dir.mkdir(parents=True, exist_ok=True)
    (sched_dir / "scheduler_config.json").write_text(json.dumps(scheduler))
    return str(root)


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_the_export_loads_for_sampling_and_reproduces_the_diffusers_eps(tmp_path, layout):
    from pipeline.cli import main
    from pipeline.training.checkpoint import load_model

    theirs = _random_unet(SMALL)
    src = _write_folder(tmp_path / "src", theirs, SCHEDULER, layout=layout)
    out = str(tmp_path / "run" / "ema-final.pt")
    assert main(["import-diffusers", src, out]) == 0
    model = load_model(out)
    assert isinstance(model.sde, DDPMChain) and model.sde.schedule == "linear" and model.sde.N == 1000
    assert model.parameterization == "eps" and model.noise_label_kind == "time"
    i = torch.tensor([0, 500, 999])
    t = model.sde.timestep_time(i).float()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.net(x, noise_label(model.sde, t, model.noise_label_kind))
        want = theirs(x, i).sample
    assert (got - want).abs().max() <= 1e-5


def test_scheduler_configs_map_onto_the_chain():
    kwargs, param, hints = chain_from_scheduler(SCHEDULER)
    assert kwargs == {"schedule": "linear", "N": 1000, "beta_start": 0.0001, "beta_end": 0.02}
    assert param == "eps" and hints["variance"] == "beta" and hints["clip_sample"] == 1.0
    kwargs, param, _ = chain_from_scheduler({"beta_schedule": "squaredcos_cap_v2",
                                             "prediction_type": "v_prediction"})
    assert param == "v"
    assert kwargs["schedule"] == "cosine"
    kwargs, _, _ = chain_from_scheduler({"trained_betas": [0.1, 0.2, 0.3]})
    assert kwargs == {"schedule": "custom", "N": 3, "betas": [0.1, 0.2, 0.3]}


@pytest.mark.parametrize(("field", "value"), [
    ("attention_head_dim", 48), ("norm_num_groups", 16), ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"), ("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D")),
    ("class_embed_type", "timestep"), ("center_input_sample", True), ("norm_eps", 1e-5),
])
def test_unmapped_network_fields_are_refused_by_name(field, value):
    cfg = {**SMALL, field: value}
    with pytest.raises(ValueError, match=f"field '{field}'"):
        if field == "norm_num_groups":
            convert_unet(cfg, {})
        else:
            unet_overrides(cfg)


@pytest.mark.parametrize(("field", "value"), [
    ("variance_type", "learned_range"), ("beta_schedule", "sigmoid"), ("prediction_type", "flow"),
    ("rescale_betas_zero_snr", True)])
def test_unmapped_scheduler_fields_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"field '{field}'"):
        chain_from_scheduler({**SCHEDULER, field: value})


def test_bad_tensors_are_named_and_nothing_is_written(tmp_path):
    from pipeline.models.cli import import_diffusers

    theirs = _random_unet(SMALL)
    src = _write_folder(tmp_path / "src", theirs, SCHEDULER)
    weights = tmp_path / "src" / "diffusion_pytorch_model.safetensors"
    sd = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    out = tmp_path / "out" / "ema-final.pt"

    sd_bad = {**sd, "mid_block.attentions.0.to_k.weight": torch.zeros(128, 64)}
    weights.write_bytes(safetensors_torch.save(sd_bad))
    name = r"tensor 'mid_block\.attentions\.0\.to_k\.weight'"
    with pytest.raises(ValueError, match=name + r" has shape \(128, 64\)"):
        import_diffusers(src, str(out))
    assert not out.exists()

    sd_missing = {k: v for k, v in sd.items() if k != "conv_out.bias"}
    weights.write_bytes(safetensors_torch.save(sd_missing))
    with pytest.raises(ValueError, match=r"tensor 'conv_out\.bias' is missing"):
        import_diffusers(src, str(out))
    sd_extra = {**sd, "class_embedding.weight": torch.zeros(10, 512)}
    weights.write_bytes(safetensors_torch.save(sd_extra))
    with pytest.raises(ValueError, match=r"tensor 'class_embedding\.weight' is not part"):
        import_diffusers(src, str(out))
    assert not out.exists() and not out.parent.exists()


def test_read_safetensors_matches_the_reference_writer_and_names_bad_tensors():
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "c": torch.randn(5, dtype=torch.float64), "d": torch.randn(2, 2).to(torch.bfloat16)}
    data = safetensors_torch.save(tensors, metadata={"format": "pt"})
    back = read_safetensors(data)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["a"]["shape"] = [4, 4]
    raw = json.dumps(header).encode()
    with pytest.raises(ValueError, match="tensor 'a' of shape \\[4, 4\\]"):
        read_safetensors(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
