"""What a run shows a person: the markdown of each stage (published as Prefect artifacts by the flows,
written beside the results on storage) and the summary of the whole run.

Pictures are embedded as `data:image/png;base64,...`: the Prefect UI, served over http, does not load
`file://` images, and an `s3://` object needs credentials the browser does not have. Each embedded PNG
is kept under `MAX_EMBED_BYTES` (downscaled when larger), with a link to the full-size object beside it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

MAX_EMBED_BYTES = 200_000


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.{digits}f}"
    return str(v)


def table(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column markdown table of (name, value)."""
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _shrink(png: bytes, max_bytes: int) -> bytes:
    """Halve the image (nearest neighbour keeps pixel art crisp) until its PNG fits `max_bytes`."""
    from PIL import Image

    im = Image.open(io.BytesIO(png))
    while len(png) > max_bytes and min(im.size) > 16:
        im = im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        png = buf.getvalue()
    return png


def embed_png(png: bytes, alt: str, *, link: str | None = None, max_bytes: int = MAX_EMBED_BYTES) -> str:
    """Markdown showing `png` inline (downscaled below `max_bytes` if needed), and a link to `link`."""
    small = _shrink(png, max_bytes)
    note = " (downscaled for the page)" if small is not png else ""
    out = f"![{alt}](data:image/png;base64,{base64.b64encode(small).decode()})"
    if link:
        out += f"\n\nFull size{note}: `{link}`"
    return out


def likelihood_markdown(result: dict[str, Any]) -> str:
    ode, elbo = result["ode"], result["elbo"]
    ck = result["checkpoint"]
    return "\n".join([
        f"## Likelihood of `{ck['uri']}` (step {ck['step']}) on `{result['data']}` ({result['split']})",
        "",
        "| estimate | bits/dim | ± s.e. | N | mean NFE |",
        "|---|---|---|---|---|",
        f"| probability-flow ODE | {ode['bpd']:.4f} | {ode['bpd_stderr']:.4f} | {ode['n']} | "
        f"{ode['nfe_mean']:.0f} |",
        f"| continuous ELBO (bound) | {elbo['bpd']:.4f} | {elbo['bpd_stderr']:.4f} | {elbo['n']} | "
        f"{elbo['nfe_mean']:.0f} |",
        "",
        f"SDE `{ck['sde']}`, parameterisation `{ck['parameterization']}`, checkpoint sha256 "
        f"`{ck['sha256'][:16]}…`. Settings: `{ode['settings']}`.",
        "",
    ])


def guidance_markdown(res: dict[str, Any]) -> str:
    lines = ["### Guidance sweep (FID and classifier precision versus w)", "",
             "| sampler | steps | w | FID | precision | NFE |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['w']:g} | {r['fid']:.3f} | {fmt(r['precision'], 3)} | "
              f"{r['nfe']} |" for r in res["rows"] if r["fid"] is not None]
    if res.get("best"):
        lines += ["", f"best w = {res['best']['w']:g} (FID {res['best']['fid']:.3f})"]
    return "\n".join(lines)


def run_markdown(s: dict[str, Any]) -> str:
    """The run at a glance: one row per stage."""
    ev = s["evaluate"]
    fid, like, smp = ev["fid"], ev["likelihood"], ev["samples"]
    floor = (fid.get("floor") or {}).get("fid")
    floor_text = f" (real-vs-real floor {floor:.3f})" if floor is not None else ""
    lines = [
        f"# Diffusion pipeline run: `{s['root']}`", "",
        "| stage | result |", "|---|---|",
        f"| data | {s['data']['counts']['train']} train / {s['data']['counts']['test']} test images, "
        f"`{s['data']['data']}` |",
        f"| train | step {s['train']['step']}, EMA `{s['train']['ema']}` |",
        f"| samples | {smp['n']} × {smp['method']} ({smp['steps']} steps, NFE {smp['nfe_per_sample']:.0f}, "
        f"w={smp['guidance_w']:g}), grid `{smp['grid']}` |",
        f"| FID | {fid['fid']:.3f}{floor_text} |",
        f"| bits/dim, ODE | {like['bpd_ode']:.4f} ± {like['bpd_ode_stderr']:.4f} (N={like['n']}, "
        f"NFE {like['nfe_mean']:.0f}) |",
        f"| bits/dim, ELBO | {like['bpd_elbo']:.4f} ± {like['bpd_elbo_stderr']:.4f} |",
    ]
    if s.get("tune"):
        best = s["tune"]["best"]
        curve = ", ".join(f"w={r['w']:g}: {r['fid']:.2f}" for r in s["tune"]["rows"] if r["fid"] is not None)
        lines.append(f"| guidance sweep | best w={best['w']:g} (FID {best['fid']:.3f}); FID by w: {curve} |")
    lines.append("")
    return "\n".join(lines)


__all__ = ["MAX_EMBED_BYTES", "embed_png", "fmt", "guidance_markdown", "likelihood_markdown", "run_markdown",
           "table"]
