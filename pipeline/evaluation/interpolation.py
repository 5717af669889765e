"""Latent interpolation through the probability-flow ODE (Song et al. 2021, Sec. 4.3): real images are
encoded to x_T, pairs of latents are joined by spherical interpolation, and every point is decoded.
The grid (one row per pair, endpoints the decoded originals) and the round-trip error of
decode(encode(x)) are written beside each other, so a user sees both what the latent space looks like
and how invertible the learned flow is."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import storage
from ..config import check_int
from ..diffusion.dequantize import snap_to_levels
from ..diffusion.encode import decode, encode, slerp
from .grid import grid_png

GRID_FILE = "interpolation.png"
RESULT_FILE = "interpolation.json"


@dataclass(frozen=True)
class InterpolationPlan:
    """Which images are joined and how finely: `pairs` pairs of consecutive test images, `n` points each
    (endpoints included), solved at the likelihood's tolerances."""

    pairs: int = 4
    n: int = 8
    split: str = "test"
    first: int = 0
    rtol: float = 1e-5
    atol: float = 1e-5

    def validate(self) -> None:
        for name, low in (("pairs", 1), ("n", 2), ("first", 0)):
            check_int(name, getattr(self, name), low)


@torch.no_grad()
def run_interpolation(checkpoint: str, data: str, out: str,
                      plan: InterpolationPlan | None = None) -> dict[str, Any]:
    """Encode 2·pairs real images of `data`, decode slerp paths between them; grid PNG + JSON under out."""
    from ..training.checkpoint import load_model
    from .bpd import dataset_levels
    from .classifier import load_split

    plan = plan or InterpolationPlan()
    plan.validate()
    model = load_model(checkpoint)
    levels = dataset_levels(data)
    x, _ = load_split(data, plan.split)
    need = plan.first + 2 * plan.pairs
    if x.shape[0] < need:
        raise ValueError(f"data={data} split {plan.split!r} has {x.shape[0]} images; pairs={plan.pairs} "
                         f"from first={plan.first} need {need}")
    x = x[plan.first:need]
    score_fn = model.score_fn(None)  # the unconditional flow (a conditional model's null label)
    solve = {"rtol": plan.rtol, "atol": plan.atol}
    t0 = time.perf_counter()
    z, nfe_enc = encode(score_fn, model.sde, x, **solve)
    back, nfe_dec = decode(score_fn, model.sde, z, **solve)
    err = (back.double() - x.double()).flatten(1).abs().max(1).values
    z0, z1 = z[0::2], z[1::2]
    path = slerp(z0, z1, torch.linspace(0, 1, plan.n, dtype=z.dtype))  # [n, pairs, ...]
    frames, nfe_path = decode(score_fn, model.sde, path.flatten(0, 1), **solve)
    frames = frames.reshape(plan.n, plan.pairs, *x.shape[1:]).transpose(0, 1).flatten(0, 1)  # row = pair
    png = grid_png(snap_to_levels(frames.float(), levels), nrow=plan.n, levels=levels,
                   scale=max(1, 64 // x.shape[-1]))
    grid_uri = storage.join(out, GRID_FILE)
    storage.write_bytes(grid_uri, png)
    result = {"checkpoint": model.describe(), "data": data, "plan": asdict(plan), "grid": grid_uri,
              "nfe": {"encode": nfe_enc, "decode": nfe_dec, "path": nfe_path},
              "round_trip_max_abs": {"median": float(err.median()), "max": float(err.max())},
              "seconds": time.perf_counter() - t0}
    storage.write_json(storage.join(out, RESULT_FILE), result)
    return {**result, "png": png}


def interpolation_markdown(res: dict[str, Any]) -> str:
    from ..reports import embed_png, table

    rt, nfe = res["round_trip_max_abs"], res["nfe"]
    return ("### Latent interpolation (probability-flow ODE)\n\n" + table([
        ("pairs × points", f"{res['plan']['pairs']} × {res['plan']['n']}"),
        ("NFE encode / decode / path", f"{nfe['encode']} / {nfe['decode']} / {nfe['path']}"),
        ("decode(encode(x)) − x, max |·| (median, max)", f"{rt['median']:.2e}, {rt['max']:.2e}"),
        ("tolerances", f"rtol {res['plan']['rtol']:g}, atol {res['plan']['atol']:g}")])
        + "\n\n" + embed_png(res["png"], "interpolation", link=res["grid"]))


__all__ = ["InterpolationPlan", "interpolation_markdown", "run_interpolation"]
