"""Encode a sharded dataset once into latent shards (Rombach et al. 2022, §3: the diffusion model is
trained on z = E(x), computed ahead of time).

Layout: one latent shard per source shard, same name, count and sample order, in the uint8 shard
layout (`pipeline.data.manifest.UINT8_MEMBERS`) with float16 latents [N, h, w, c] as images.npy, then
a manifest.json written last. The manifest's "latent" entry records the autoencoder checkpoint's
sha256, the latent shape (c, h, w), and the scale factor s = 1/std(z) over the train split, so that the
loader's s·z has unit standard deviation (Rombach et al. 2022, §4.3.2 and App. G). The identity
autoencoder keeps s = 1: its latent branch is the pixel branch.

The latent stored is the posterior mean μ(x) (deterministic, so reruns write the same bytes). Reruns
keep every shard whose bytes match the progress record of the same autoencoder and source; a
destination holding latents of another autoencoder is refused unless `overwrite=True`.
"""

from __future__ import annotations

import io
import math
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import storage
from ..data import manifest as mf
from .model_io import LoadedAutoencoder, load_autoencoder

PROGRESS_FILE = "encode-progress.json"


@dataclass
class EncodeReport:
    manifest_uri: str
    manifest: dict[str, Any]
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: bool = False  # the destination was already complete for this autoencoder and source


def latent_info(data: str) -> dict[str, Any] | None:
    """The "latent" entry of a dataset's manifest (None for pixel data)."""
    return mf.read_manifest(data).get("latent")


def check_latents_match(data: str, autoencoder_sha256: str) -> dict[str, Any]:
    """The latent entry of `data`, or ValueError when its latents come from another autoencoder."""
    info = latent_info(data)
    if info is None:
        raise ValueError(f"data={data}: not a latent dataset (its manifest has no 'latent' entry)")
    if info["autoencoder_sha256"] != autoencoder_sha256:
        raise ValueError(
            f"data={data}: its latents were encoded by autoencoder sha256 "
            f"{info['autoencoder_sha256'][:16]}… ({info.get('autoencoder')}), but the checkpoint "
            f"given has sha256 {autoencoder_sha256[:16]}…: encode the data with this autoencoder, "
            "or pass the one that encoded it"
        )
    return info


def _tar(key: str, arrays: tuple[np.ndarray, ...]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, arr in zip(mf.UINT8_MEMBERS, arrays, strict=True):
            b = io.BytesIO()
            np.save(b, np.ascontiguousarray(arr), allow_pickle=False)
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size, info.mtime, info.mode = b.tell(), 0, 0o444  # fixed: same latents, same sha256
            b.seek(0)
            tar.addfile(info, b)
    return buf.getvalue()


@torch.no_grad()
def _encode_split(
    ae: LoadedAutoencoder, data: str, split: str, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """μ(x) of a split in the manifest's order (float32 [N, c, h, w]), labels and source indices."""
    from ..data.loader import make_loader

    zs, ys, ids = [], [], []
    for x, y, idx in make_loader(
        data, split, batch_size, shuffle_buffer=0, rank=0, world_size=1, with_index=True
    ):
        ae.net.check_input(x)
        zs.append(ae.net.encode(x.to(device)).float().cpu().numpy())
        ys.append(y.numpy())
        ids.append(idx.numpy())
    return np.concatenate(zs), np.concatenate(ys), np.concatenate(ids)


def _refuse_other(dest: str, sha: str, overwrite: bool) -> dict[str, Any] | None:
    """The destination's usable progress record, or a refusal when another autoencoder wrote it."""
    muri, puri = mf.manifest_uri(dest), storage.join(dest, PROGRESS_FILE)
    for uri in (muri, puri):
        if not storage.exists(uri):
            continue
        rec = storage.read_json(uri)
        other = (
            (rec.get("latent") or {}).get("autoencoder_sha256")
            if uri == muri
            else rec.get("autoencoder_sha256")
        )
        if uri == muri and other is None:
            if not overwrite:
                raise ValueError(
                    f"dest={dest} holds a pixel dataset (manifest without 'latent'); "
                    "choose another destination or pass overwrite=True"
                )
        elif other != sha and not overwrite:
            raise ValueError(
                f"dest={dest} already holds latents of autoencoder sha256 {str(other)[:16]}…, not "
                f"{sha[:16]}…: choose another destination or pass overwrite=True (--overwrite)"
            )
    if overwrite or not storage.exists(puri):
        return None
    rec = storage.read_json(puri)
    return rec if rec.get("autoencoder_sha256") == sha else None


def encode_dataset(
    data: str,
    autoencoder: str,
    dest: str,
    *,
    batch_size: int = 256,
    overwrite: bool = False,
    device: str = "cpu",
) -> EncodeReport:
    """Encode every split of the sharded dataset `data` with the autoencoder checkpoint `autoencoder`
    into latent shards + manifest under `dest` (see the module docstring)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ae = load_autoencoder(autoencoder, device=device)  # ValueError before anything is written
    src = mf.read_manifest(data)
    if mf.image_encoding(src) == mf.LATENT_ENCODING:
        raise ValueError(f"data={data} is already a latent dataset; encode the pixel dataset it came from")
    shape = tuple(src["image"]["shape"])  # [H, W, C]
    if (shape[2], shape[0], shape[1]) != ae.image_shape:
        raise ValueError(
            f"data={data}: images are {shape[2]}×{shape[0]}×{shape[1]} (C×H×W) but the "
            f"autoencoder takes {'×'.join(map(str, ae.image_shape))}"
        )
    src_sha = mf.bytes_sha256(storage.read_bytes(mf.manifest_uri(data)))
    muri = mf.manifest_uri(dest)
    progress = _refuse_other(dest, ae.sha256, overwrite)
    if storage.exists(muri) and not overwrite:
        m = mf.read_manifest(muri)
        info = m.get("latent") or {}
        if (
            info.get("autoencoder_sha256") == ae.sha256
            and info.get("pixel_manifest_sha256") == src_sha
            and not mf.verify_manifest(muri)
        ):
            return EncodeReport(muri, m, kept=[s["name"] for s in m["shards"]], skipped=True)
    if progress is None or progress.get("pixel_manifest_sha256") != src_sha:
        progress = {"autoencoder_sha256": ae.sha256, "pixel_manifest_sha256": src_sha, "shards": {}}
    storage.remove(muri)  # the manifest is written last: its absence means "not complete"
    report = EncodeReport(muri, {})
    entries, stats = [], np.zeros(3)  # Σ1, Σz, Σz² over the train split (float64)
    for split in sorted({s["split"] for s in src["shards"]}):
        split_entries = mf.shard_entries(src, split)
        z = ys = ids = None
        pos = 0
        for entry in split_entries:
            name, n = entry["name"], int(entry["count"])
            done = progress["shards"].get(name)
            out_uri = storage.join(dest, name)
            if done is not None and storage.exists(out_uri) and mf.file_sha256(out_uri) == done["sha256"]:
                report.kept.append(name)
                new = done
            else:
                if z is None:  # one pass over the split when anything of it is missing
                    z, ys, ids = _encode_split(ae, data, split, batch_size, torch.device(device))
                zb = z[pos : pos + n]
                key = mf.SAMPLE_KEY.format(split=split, index=int(entry.get("first_index", pos)))
                blob = _tar(
                    key,
                    (
                        zb.transpose(0, 2, 3, 1).astype(np.float16),
                        ys[pos : pos + n].astype(np.int64),
                        ids[pos : pos + n].astype(np.int64),
                    ),
                )
                storage.write_bytes(out_uri, blob)
                z16 = zb.astype(np.float16).astype(np.float64)  # the statistics of what is stored
                new = {
                    "sha256": mf.bytes_sha256(blob),
                    "bytes": len(blob),
                    "stats": [float(z16.size), float(z16.sum()), float((z16**2).sum())],
                }
                progress["shards"][name] = new
                storage.write_json(storage.join(dest, PROGRESS_FILE), progress)
                report.written.append(name)
            pos += n
            if split == "train":
                stats += np.asarray(new["stats"])
            entries.append(
                {
                    **{k: v for k, v in entry.items() if k not in ("sha256", "bytes")},
                    "sha256": new["sha256"],
                    "bytes": new["bytes"],
                }
            )
    report.manifest = _manifest(src, entries, ae, data=data, src_sha=src_sha, stats=stats)
    storage.write_json(muri, report.manifest)
    return report


def _manifest(
    src: dict[str, Any],
    entries: list[dict],
    ae: LoadedAutoencoder,
    *,
    data: str,
    src_sha: str,
    stats: np.ndarray,
) -> dict[str, Any]:
    c, h, w = ae.latent_shape
    n, s1, s2 = stats
    std = math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0)) if n > 0 else 1.0
    scale = 1.0 if ae.net.kind == "identity" or std == 0 else 1.0 / std
    keep = (
        "format",
        "package",
        "source",
        "counts",
        "levels",
        "label_names",
        "num_classes",
        "mirror_invariant",
        "sample_key",
    )
    m = {k: src[k] for k in keep if k in src}
    m.update(
        {
            "image": {
                "shape": [h, w, c],
                "channels": c,
                "height": h,
                "width": w,
                "dtype": "float16",
                "encoding": mf.LATENT_ENCODING,
            },
            "fields": mf.FIELDS_UINT8
            | {"images.npy": "latents μ(x), float16 [N, h, w, c], C-order (unscaled)"},
            "shards": entries,
            "latent": {
                "autoencoder": ae.uri,
                "autoencoder_sha256": ae.sha256,
                "autoencoder_kind": ae.net.kind,
                "shape": [c, h, w],
                "pixel_shape": list(ae.image_shape),
                "scale_factor": scale,
                "std_before_scaling": std,
                "encoding": "posterior mean μ(x)",
                "pixel_data": data,
                "pixel_manifest_sha256": src_sha,
                "pixel_levels": int(src["levels"]),
            },
        }
    )
    return m


__all__ = ["PROGRESS_FILE", "EncodeReport", "check_latents_match", "encode_dataset", "latent_info"]
