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
    """A two-column markdown table of (name, value). A "|" inside a cell (p(c | y)) is escaped: unescaped,
    it splits the cell and pushes the value out of the table."""
    def cell(v: Any) -> str:
        return (f"{v:.6g}" if isinstance(v, float) else str(v)).replace("|", "\\|")

    lines = ["| | |", "|---|---|"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in rows]
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
        *([f"| DDPM variational bound (discrete chain) | {ddpm['bpd']:.4f} | {ddpm['bpd_stderr']:.4f} | "
           f"{ddpm['n']} | {ddpm['nfe_mean']:.0f} |"] if (ddpm := result.get("ddpm_elbo")) else []),
        "",
        f"Dequantised bits/dim include log₂((L − 1)/2) = {_offset(ode):.4f} bits/dim for the data's L levels "
        "(uniform dequantisation; `diffusion/dequantize.py`).",
        "",
        f"SDE `{ck['sde']}`, parameterisation `{ck['parameterization']}`, checkpoint sha256 "
        f"`{ck['sha256'][:16]}…`. Settings: `{ode['settings']}`.",
        "",
    ])


def _offset(summary: dict[str, Any]) -> float:
    from .diffusion.dequantize import offset_bits_per_dim

    levels = ((summary.get("settings") or {}).get("dequantize") or {}).get("levels") or 256
    return offset_bits_per_dim(int(levels))


def guidance_markdown(res: dict[str, Any]) -> str:
    lines = ["### Guidance sweep (FID and class accuracy versus w)", "",
             "| sampler | steps | w | FID | floor at N (min–max) | N | class accuracy | NFE |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['w']:g} | {fmt(r['fid'], 3)} | {fmt(r.get('floor'), 3)} "
              f"({fmt(r.get('floor_min'), 3)}–{fmt(r.get('floor_max'), 3)}) | {fmt(r.get('n'))} | "
              f"{fmt(r['precision'], 3)} | {fmt(r['nfe'])} |" for r in res["rows"] if r["fid"] is not None]
    if res.get("best"):
        lines += ["", f"best w = {res['best']['w']:g} (FID {res['best']['fid']:.3f})"]
    return "\n".join(lines)


def progress_markdown(p: dict[str, Any]) -> str:
    """The live metrics table of a training run at its latest report."""
    m = p.get("metrics") or {}
    keys = ["step", "loss", *sorted(k for k in m if k.startswith("loss_sigma_")), "grad_norm", "lr",
            "img_per_s", "skipped_steps"]
    return f"### Training: step {p['step']} / {p['total']}\n\n" + table([(k, m[k]) for k in keys if k in m])


def run_markdown(s: dict[str, Any]) -> str:
    """The run at a glance: one row per stage."""
    ev = s["evaluate"]
    fid, like, smp = ev["fid"], ev["likelihood"], ev["samples"]
    floor = fid.get("floor") or {}
    floor_text = (f" (real-vs-real floor at N={floor['n']}: {floor['fid']:.3f}, "
                  f"{floor['min']:.3f}–{floor['max']:.3f} over {floor['draws']} draws)") if floor else ""
    acc = f", class accuracy {fid['class_accuracy']:.3f}" if fid.get("class_accuracy") is not None else ""
    lines = [
        f"# Diffusion pipeline run: `{s['root']}`", "",
        "| stage | result |", "|---|---|",
        f"| data | {s['data']['counts']['train']} train / {s['data']['counts']['test']} test images, "
        f"`{s['data']['data']}` |",
        f"| train | step {s['train']['step']}, EMA `{s['train']['ema']}` |",
        f"| samples | {smp['n']} × {smp['method']} ({smp['steps']} steps, NFE {smp['nfe_per_sample']:.0f}, "
        f"w={smp['guidance_w']:g}), grid `{smp['grid']}` |",
        f"| FID | {fid['fid']:.3f}{floor_text}{acc} |",
        f"| bits/dim, ODE | {like['bpd_ode']:.4f} ± {like['bpd_ode_stderr']:.4f} (N={like['n']}, "
        f"NFE {like['nfe_mean']:.0f}) |",
        f"| bits/dim, ELBO | {like['bpd_elbo']:.4f} ± {like['bpd_elbo_stderr']:.4f} |",
    ]
    if s.get("tune"):
        rows = [r for r in s["tune"]["rows"] if r["fid"] is not None]
        curve = "; ".join(f"w={r['w']:g}: FID {r['fid']:.2f}, accuracy {fmt(r.get('precision'), 3)}"
                          for r in rows)
        lo = [r["floor_min"] for r in rows if r.get("floor_min") is not None]
        hi = [r["floor_max"] for r in rows if r.get("floor_max") is not None]
        spread = (f" Real-vs-real floor at N={rows[0].get('n')}: {min(lo):.2f}–{max(hi):.2f} over its draws."
                  if lo and hi else "")
        best = s["tune"]["best"]
        lines.append(f"| guidance sweep | best w={best['w']:g} (FID {best['fid']:.3f}). {curve}.{spread} |")
    lines.append("")
    return "\n".join(lines)


__all__ = ["MAX_EMBED_BYTES", "embed_png", "fmt", "guidance_markdown", "likelihood_markdown",
           "progress_markdown", "run_markdown", "table"]
