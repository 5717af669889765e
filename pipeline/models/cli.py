"""`diffusion-pipeline import-diffusers`: a diffusers UNet2DModel and its scheduler → an EMA export.

    diffusion-pipeline import-diffusers ./ddpm-cifar10-32 s3://bucket/runs/ddpm-cifar10/ema-final.pt

PATH_OR_URI is a folder holding config.json, diffusion_pytorch_model.safetensors and
scheduler_config.json, or a diffusers pipeline folder with unet/ and scheduler/ inside. The export is
read by `sample`, `fid` and `likelihood` unchanged: its TrainConfig rebuilds the network with
`build_unet("ddpm-cifar10", **overrides)` and the exact chain with `build_sde("ddpm-chain", ...)`.
Every check runs before anything is written.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

WEIGHTS = "diffusion_pytorch_model.safetensors"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-diffusers", description=__doc__.splitlines()[0],
                       help="convert a diffusers UNet2DModel + scheduler into an EMA export")
    p.add_argument("source", metavar="PATH_OR_URI",
                   help=f"folder with config.json, {WEIGHTS}, scheduler_config.json (or unet/, scheduler/)")
    p.add_argument("out", metavar="OUT", help="URI of the EMA export to write, e.g. .../ema-final.pt")
    p.set_defaults(func=_main)


def _first_existing(storage: Any, candidates: list[str], what: str) -> str:
    for uri in candidates:
        if storage.exists(uri):
            return uri
    raise ValueError(f"{what} not found; looked for {candidates}")


def import_diffusers(source: str, out: str) -> dict[str, Any]:
    """Convert and write; returns {"out", "config" (TrainConfig dict), "parameters", "sampling_hints"}."""
    from .. import storage
    from ..config import TrainConfig
    from ..diffusion.sde import build_sde
    from ..training.checkpoint import export_ema
    from .diffusers_import import (
        BASE_PRESET,
        chain_from_scheduler,
        convert_unet,
        read_safetensors,
        unet_overrides,
    )

    source = source.rstrip("/")
    unet_dir = source if storage.exists(storage.join(source, "config.json")) else storage.join(source, "unet")
    config_uri = _first_existing(storage, [storage.join(unet_dir, "config.json")], "the UNet's config.json")
    weights_uri = storage.join(unet_dir, WEIGHTS)
    if not storage.exists(weights_uri):
        raise ValueError(f"{weights_uri} not found: the import reads safetensors only (a .bin file is a "
                         f"pickle; convert it with diffusers' save_pretrained(safe_serialization=True))")
    sched_uri = _first_existing(storage, [storage.join(source, "scheduler_config.json"),
                                          storage.join(source, "scheduler", "scheduler_config.json")],
                                "the scheduler's scheduler_config.json")
    unet_cfg, sched_cfg = storage.read_json(config_uri), storage.read_json(sched_uri)
    # The cheap checks first: configs, then the chain, and only then the 143 MB of weights.
    chain_kwargs, parameterization, hints = chain_from_scheduler(sched_cfg)
    build_sde("ddpm-chain", **chain_kwargs)
    unet_overrides(unet_cfg)
    storage.check_writable(storage.parent(out))
    net, overrides = convert_unet(unet_cfg, read_safetensors(storage.read_bytes(weights_uri)))
    # The network is conditioned on the chain's integer timestep i: noise_label "time" on a chain.
    loss_kwargs = {"parameterization": parameterization, "noise_label_kind": "time"}
    config = TrainConfig(preset=BASE_PRESET, model_overrides=overrides, sde="ddpm-chain",
                         sde_kwargs=chain_kwargs, loss="dsm", loss_kwargs=loss_kwargs, label_dropout=0.0)
    export_ema(out, ema=net.state_dict(), config=config.to_dict(), step=0, network=net.config)
    return {"out": out, "config": config.to_dict(), "parameters": sum(p.numel() for p in net.parameters()),
            "sampling_hints": hints}


def _main(args: argparse.Namespace) -> int:
    res = import_diffusers(args.source, args.out)
    print(json.dumps({k: res[k] for k in ("out", "parameters", "sampling_hints")}, indent=2))
    return 0
