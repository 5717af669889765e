"""Import a diffusers `UNet2DModel` (DDPM CIFAR-10 layout) and its scheduler into this project's U-Net
and exact chain, from the files alone: config.json, diffusion_pytorch_model.safetensors and the
scheduler's config. No diffusers class is used, and the safetensors format (an 8-byte little-endian
header length, a JSON header of {name: {dtype, shape, data_offsets}}, then raw little-endian bytes) is
read here with torch, so the import needs nothing beyond the core's own dependencies.

Every field of the network config is either mapped onto a `build_unet` override or refused with an
error naming the field and value; every tensor must be present with the expected shape, else the error
names the tensor. Nothing is returned (so nothing is written) for a partial network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .layers import AttnBlock, Downsample, ResBlock, Upsample
from .unet import UNet, build_unet

BASE_PRESET = "ddpm-cifar10"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# Fields whose value must be exactly this for the DDPM layout our U-Net implements.
_FIXED: dict[str, Any] = {
    "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
    "freq_shift": 1, "flip_sin_to_cos": False, "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu",
    "norm_eps": 1e-6, "attn_norm_num_groups": None, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}
_DIFFUSERS_DEFAULTS: dict[str, Any] = {  # UNet2DModel's defaults, for fields a config.json leaves out
    "in_channels": 3, "out_channels": 3, "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}
_KNOWN = {*_DIFFUSERS_DEFAULTS, "sample_size", "down_block_types", "up_block_types", "block_out_channels"}


def read_safetensors(data: bytes) -> dict[str, Tensor]:
    """The tensors of a .safetensors file's bytes; ValueError naming the tensor on any inconsistency."""
    if len(data) < 8:
        raise ValueError("safetensors: file shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"safetensors: header length {n} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise ValueError(f"safetensors: header is not JSON: {e}") from e
    body = memoryview(data)[8 + n :]
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"safetensors: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end <= len(body)) or end - begin != size:
            raise ValueError(f"safetensors: tensor {name!r} of shape {shape} ({info['dtype']}) needs {size} "
                             f"bytes, its data_offsets are [{begin}, {end}] in a {len(body)}-byte body")
        raw = bytearray(body[begin:end])
        t = torch.frombuffer(raw, dtype=dtype) if size else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def _field(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg[key] if key in cfg else _DIFFUSERS_DEFAULTS[key]


def _refuse(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"diffusers config field {field!r} = {value!r} is not mapped (allowed: {allowed})")


def unet_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """`build_unet(BASE_PRESET, **overrides)` arguments for a diffusers UNet2DModel config; refuses every
    field it does not map, naming it."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN)
    if unknown:
        _refuse(unknown[0], config[unknown[0]], f"the fields of UNet2DModel: {sorted(_KNOWN)}")
    for key, want in _FIXED.items():
        got = _field(config, key)
        close = isinstance(want, float) and isinstance(got, float) and math.isclose(got, want)
        if got != want and not close:
            _refuse(key, got, repr(want))
    if _field(config, "downsample_padding") not in (0, 1):
        _refuse("downsample_padding", config["downsample_padding"], "0 (TF SAME) or 1 (symmetric)")
    widths = [int(c) for c in config.get("block_out_channels", ())]
    if not widths or widths[0] < 1 or any(w % widths[0] for w in widths):
        _refuse("block_out_channels", config.get("block_out_channels"), "multiples of its first entry")
    levels = len(widths)
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    for name, types, plain, attn in (("down_block_types", down, "DownBlock2D", "AttnDownBlock2D"),
                                     ("up_block_types", up, "UpBlock2D", "AttnUpBlock2D")):
        if len(types) != levels:
            _refuse(name, types, f"{levels} entries, one per block_out_channels")
        bad = [t for t in types if t not in (plain, attn)]
        if bad:
            _refuse(name, bad[0], f"{plain!r} or {attn!r}")
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            _refuse("sample_size", size, "a square size")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        _refuse("sample_size", size, "a positive int")
    attn_down = [lvl for lvl, t in enumerate(down) if t == "AttnDownBlock2D"]
    attn_up = sorted(levels - 1 - j for j, t in enumerate(up) if t == "AttnUpBlock2D")
    if attn_down != attn_up:
        _refuse("up_block_types", up, f"attention at the same levels as down_block_types ({down})")
    head_dim = _field(config, "attention_head_dim")
    attn_widths = {widths[lvl] for lvl in attn_down} | {widths[-1]}
    heads = {1 if head_dim is None else w // int(head_dim) for w in attn_widths}
    if len(heads) != 1 or (head_dim is not None and any(w % int(head_dim) for w in attn_widths)):
        _refuse("attention_head_dim", head_dim, "None or a value giving one head count at every attention")
    return dict(in_channels=int(_field(config, "in_channels")),
                out_channels=int(_field(config, "out_channels")),
                image_size=int(size), channels=widths[0], channel_mult=[w // widths[0] for w in widths],
                num_res_blocks=int(_field(config, "layers_per_block")),
                attn_resolutions=[int(size) // 2**lvl for lvl in attn_down],
                dropout=float(_field(config, "dropout")), embedding_type="positional", num_classes=None,
                num_heads=heads.pop(), scale_shift=False, skip_rescale=False,
                downsample_pad="tf_same" if _field(config, "downsample_padding") == 0 else "symmetric")


def _resnet_keys(ours: str, theirs: str, block: ResBlock) -> dict[str, list[str]]:
    pairs = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2"}
    if not isinstance(block.skip, torch.nn.Identity):
        pairs["skip"] = "conv_shortcut"
    return {f"{ours}.{a}.{p}": [f"{theirs}.{b}.{p}"] for a, b in pairs.items() for p in ("weight", "bias")}


def _attn_keys(ours: str, theirs: str) -> dict[str, list[str]]:
    keys = {f"{ours}.norm.{p}": [f"{theirs}.group_norm.{p}"] for p in ("weight", "bias")}
    for p in ("weight", "bias"):
        # Our fused qkv is [q; k; v] along the output dim, heads contiguous within each (as diffusers).
        keys[f"{ours}.qkv.{p}"] = [f"{theirs}.to_{n}.{p}" for n in ("q", "k", "v")]
        keys[f"{ours}.proj.{p}"] = [f"{theirs}.to_out.0.{p}"]
    return keys


def key_map(net: UNet) -> dict[str, list[str]]:
    """For each tensor of our state_dict, the diffusers tensors it is made of (concatenated on dim 0)."""
    m: dict[str, list[str]] = {}
    for p in ("weight", "bias"):
        m[f"emb_mlp.0.{p}"] = [f"time_embedding.linear_1.{p}"]
        m[f"emb_mlp.2.{p}"] = [f"time_embedding.linear_2.{p}"]
        for a in ("conv_in", "conv_out"):
            m[f"{a}.{p}"] = [f"{a}.{p}"]
        m[f"norm_out.{p}"] = [f"conv_norm_out.{p}"]
    for kind, stages in (("down", net.down), ("up", net.up)):
        for j, stage in enumerate(stages):
            n_res = n_attn = 0
            for idx, layer in enumerate(stage):
                ours, theirs = f"{kind}.{j}.{idx}", f"{kind}_blocks.{j}"
                if isinstance(layer, ResBlock):
                    m.update(_resnet_keys(ours, f"{theirs}.resnets.{n_res}", layer))
                    n_res += 1
                elif isinstance(layer, AttnBlock):
                    m.update(_attn_keys(ours, f"{theirs}.attentions.{n_attn}"))
                    n_attn += 1
                elif isinstance(layer, (Downsample, Upsample)):
                    sampler = "downsamplers" if kind == "down" else "upsamplers"
                    conv = f"{theirs}.{sampler}.0.conv"
                    m.update({f"{ours}.conv.{p}": [f"{conv}.{p}"] for p in ("weight", "bias")})
    m.update(_resnet_keys("mid.0", "mid_block.resnets.0", net.mid[0]))
    m.update(_attn_keys("mid.1", "mid_block.attentions.0"))
    m.update(_resnet_keys("mid.2", "mid_block.resnets.1", net.mid[2]))
    return m


def convert_unet(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[UNet, dict[str, Any]]:
    """Our U-Net with the diffusers weights loaded, and its `build_unet` overrides. ValueError naming the
    first missing, unexpected or mis-shaped tensor; the network is only returned complete."""
    overrides = unet_overrides(config)
    net = build_unet(BASE_PRESET, **overrides)
    # Our GroupNorms take their group count from the width (32 where it divides); all must be diffusers'.
    groups = int(_field(config, "norm_num_groups"))
    other = sorted({m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} - {groups})
    if other:
        _refuse("norm_num_groups", groups, f"the group count of our GroupNorms for these widths ({other[0]})")
    own = net.state_dict()
    mapping = key_map(net)
    missing_ours = sorted(set(own) - set(mapping))
    assert not missing_ours, f"key_map does not cover {missing_ours[:3]}"  # our own invariant
    used = {k for names in mapping.values() for k in names}
    absent = sorted(used - set(tensors))
    if absent:
        raise ValueError(f"safetensors: tensor {absent[0]!r} is missing ({len(absent)} missing in all)")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"safetensors: tensor {extra[0]!r} is not part of the configured network "
                         f"({len(extra)} unexpected in all)")
    state = {}
    for ours, names in mapping.items():
        want = tuple(own[ours].shape)
        parts = []
        for name in names:
            t = tensors[name]
            expect = (want[0] // len(names), *want[1:])
            if tuple(t.shape) != expect:
                raise ValueError(f"safetensors: tensor {name!r} has shape {tuple(t.shape)}, the config needs "
                                 f"{expect}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"safetensors: tensor {name!r} has dtype {t.dtype}, expected a float dtype")
            parts.append(t.to(own[ours].dtype))
        state[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
    net.load_state_dict(state)
    return net, overrides


_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def chain_from_scheduler(config: Mapping[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(`build_sde("ddpm-chain", **kwargs)` kwargs, our parameterisation, sampling hints) of a diffusers
    DDPM/DDIM scheduler config; refuses what the chain cannot express, naming the field."""
    if config.get("rescale_betas_zero_snr", False):
        _refuse("rescale_betas_zero_snr", True, "false")
    if config.get("thresholding", False):
        _refuse("thresholding", True, "false (dynamic thresholding is not part of the samplers)")
    variance = config.get("variance_type", "fixed_small")
    if variance not in ("fixed_small", "fixed_large"):
        _refuse("variance_type", variance, "'fixed_small' or 'fixed_large'")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        _refuse("prediction_type", prediction, f"one of {sorted(_PREDICTIONS)}")
    N = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        kwargs: dict[str, Any] = {"schedule": "custom", "N": len(trained),
                                  "betas": [float(b) for b in trained]}
    else:
        name = config.get("beta_schedule", "linear")
        if name not in _SCHEDULES:
            _refuse("beta_schedule", name, f"one of {sorted(_SCHEDULES)} or trained_betas")
        kwargs = {"schedule": _SCHEDULES[name], "N": N}
        if name == "squaredcos_cap_v2":
            kwargs.update(s=0.008, max_beta=0.999)
        else:
            kwargs.update(beta_start=float(config.get("beta_start", 1e-4)),
                          beta_end=float(config.get("beta_end", 0.02)))
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
    hints = {"variance": "beta_tilde" if variance == "fixed_small" else "beta", "clip_sample": clip,
             "spacing": config.get("timestep_spacing", "leading"),
             "steps_offset": int(config.get("steps_offset", 0))}
    if "set_alpha_to_one" in config:
        hints["set_alpha_to_one"] = bool(config["set_alpha_to_one"])
    return kwargs, _PREDICTIONS[prediction], hints


__all__ = ["BASE_PRESET", "chain_from_scheduler", "convert_unet", "key_map", "read_safetensors",
           "unet_overrides"]
