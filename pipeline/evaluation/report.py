"""An evaluation: FID and KID of a samples folder against a dataset's cached reference statistics,
written as JSON plus a markdown table beside the sample grid, recording exactly how it was made
(N, extractor id and weights hash, reference-statistics hash, sampler, NFE, w, seeds, checkpoint).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np

from .. import storage
from .features import FeatureExtractor
from .fid import (
    FeatureStats,
    StatsAccumulator,
    frechet_distance,
    kernel_inception_distance,
    matched_floor,
    reference_stats,
)
from .sampling import GRID_FILE, SAMPLES_SPLIT

RESULT_PREFIX = "eval"


def sample_features(
    samples_uri: str, extractor: FeatureExtractor, *, batch_size: int = 256, split: str = SAMPLES_SPLIT
) -> tuple[np.ndarray, int]:
    """Features [N, d] of every sample in a samples folder (read through the data loader), and levels."""
    from ..data.loader import make_loader

    loader = make_loader(samples_uri, split, batch_size, shuffle_buffer=0, rank=0, world_size=1)
    feats = [extractor.extract(x, levels=loader.levels, batch_size=batch_size) for x, _ in loader]
    return np.concatenate(feats, 0), loader.levels


def class_accuracy(samples_uri: str, classifier: Any, *, levels: int) -> float:
    """The domain classifier's accuracy on the labels conditional samples were drawn for (read as
    stored: on the data's grid of levels)."""
    from ..diffusion.dequantize import snap_to_levels
    from .classifier import accuracy
    from .sampling import read_samples

    x, labels, _ = read_samples(samples_uri)
    return accuracy(classifier, snap_to_levels(x, levels), labels)


def kid_applies(extractor_id: str) -> bool:
    """KID's cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³ is calibrated for Inception's pool3
    features (Bińkowski et al. 2018, §2.2: features of order one); on unnormalised classifier features
    its values run to 10⁵ and mean nothing, so KID is reported for Inception features only."""
    return extractor_id.startswith("inception")


KID_OMITTED = ("KID omitted: its polynomial kernel is calibrated for Inception features, not for these "
               "domain-classifier features")


def score_features(features: np.ndarray, ref: FeatureStats, *, kid_subsets: int = 100,
                   kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """FID of `features` against `ref`, the real-vs-real floor at the same N, and KID (×1, the unbiased
    MMD² of Bińkowski et al. 2018) where it applies and the reference kept raw features."""
    acc = StatsAccumulator()
    acc.update(features)
    gen = acc.stats()
    n = int(features.shape[0])
    out: dict[str, Any] = {"fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), "n": n}
    if ref.features is not None and ref.features.shape[0] >= 2 and n >= 2:
        out["floor"] = matched_floor(ref, n, seed=seed)
        if kid_applies(ref.extractor_id):
            m = min(kid_subset_size, n, ref.features.shape[0])
            mean, std = kernel_inception_distance(features, ref.features, subsets=kid_subsets, subset_size=m,
                                                  seed=seed)
            out["kid"] = {"mean": mean, "std": std, "subsets": kid_subsets, "subset_size": m}
        else:
            out["kid_note"] = KID_OMITTED
    return out


def evaluate_samples(
    samples_uri: str,
    data_uri: str,
    extractor: FeatureExtractor,
    *,
    split: str = "train",
    out_uri: str | None = None,
    cache_uri: str | None = None,
    batch_size: int = 256,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, Any]:
    """FID/KID of the samples against `data_uri`'s `split`; writes eval-{extractor}.json and .md."""
    samples_uri = samples_uri.rstrip("/")
    manifest = storage.read_json(storage.join(samples_uri, "manifest.json"))
    rec = manifest.get("sampling")
    if rec is None:
        raise ValueError(
            f"{samples_uri}: its manifest has no 'sampling' record; is it a samples folder "
            "written by `diffusion-pipeline sample`?"
        )
    ref = reference_stats(data_uri, extractor, split=split, cache_uri=cache_uri, batch_size=batch_size)
    if list(ref.meta.get("resolution", [])) != list(manifest["image"]["shape"][:2]):
        raise ValueError(
            f"samples are {manifest['image']['shape'][:2]} but the reference data are "
            f"{ref.meta.get('resolution')}: FID needs one resolution"
        )
    features, _ = sample_features(samples_uri, extractor, batch_size=batch_size)
    if features.shape[0] != rec["plan"]["n"]:
        raise ValueError(
            f"{samples_uri}: read {features.shape[0]} samples, the record says {rec['plan']['n']}"
        )
    scores = score_features(features, ref, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    if hasattr(extractor, "model") and rec.get("labels") is not None:
        levels = int(manifest["levels"])
        scores["class_accuracy"] = class_accuracy(samples_uri, extractor.model, levels=levels)
    result = {
        "fid": scores["fid"],
        "kid": scores.get("kid"),
        "kid_note": scores.get("kid_note"),
        "floor": scores.get("floor"),
        "class_accuracy": scores.get("class_accuracy"),
        "halves_floor": ref.meta.get("floor"),
        "n": scores["n"],
        "extractor": extractor.describe(),
        "reference": {
            "sha256": ref.sha256(),
            "uri": ref.meta.get("cache_uri"),
            "n": ref.n,
            "data": ref.meta.get("manifest_uri"),
            "manifest_sha256": ref.meta.get("manifest_sha256"),
            "split": ref.meta.get("split"),
            "resolution": ref.meta.get("resolution"),
        },
        "samples": {"uri": samples_uri, "grid": storage.join(samples_uri, GRID_FILE)},
        "sampler": rec["sampler"],
        "steps": rec["steps"],
        "nfe": rec["nfe_per_sample"],
        "guidance_w": rec["guidance_w"],
        "seeds": rec["seeds"],
        "labels": rec.get("labels"),
        "checkpoint": rec["checkpoint"],
        "sampling_device": rec.get("device"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out = (out_uri or samples_uri).rstrip("/")
    name = f"{RESULT_PREFIX}-{extractor.id.split('/')[0]}"
    storage.write_json(storage.join(out, f"{name}.json"), result)
    storage.write_bytes(storage.join(out, f"{name}.md"), markdown_report(result).encode())
    result["report_uris"] = [storage.join(out, f"{name}.json"), storage.join(out, f"{name}.md")]
    return result


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per evaluation: the figure, its floor at the same N, and everything needed to reproduce it."""
    head = ("| FID | floor at N (min–max) | N | class accuracy | KID (×10³) | extractor | weights | "
            "ref stats | sampler | steps | NFE | w | seeds | checkpoint |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        kid = r.get("kid")
        kid_s = f"{1e3 * kid['mean']:.3f} ± {1e3 * kid['std']:.3f}" if kid else "omitted"
        fl = r.get("floor") or {}
        floor_s = f"{_fmt(fl.get('fid'))} ({_fmt(fl.get('min'))}–{_fmt(fl.get('max'))})" if fl else "–"
        s, nfe, ck = r["seeds"], r["nfe"], r["checkpoint"]
        nfe_s = (f"{nfe['mean']:g}" if nfe["min"] == nfe["max"]
                 else f"{nfe['mean']:.1f} ({nfe['min']}–{nfe['max']})")
        lines.append(
            f"| {_fmt(r['fid'])} | {floor_s} | {r['n']} | {_fmt(r.get('class_accuracy'))} | {kid_s} | "
            f"{r['extractor']['id']} | `{r['extractor']['weights_sha256'][:12]}` | "
            f"`{r['reference']['sha256'][:12]}` | "
            f"{r['sampler']} | {r['steps']} | {nfe_s} | {r['guidance_w']:g} | {s['first']}…{s['last']} | "
            f"{ck['uri']} (`{ck['sha256'][:12]}`, step {ck.get('step')}) |")
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    """The markdown page of one evaluation: table, floor, reference and the sample grid (embedded)."""
    from .. import reports

    floor = result.get("floor") or {}
    ref = result["reference"]
    parts = [
        f"# Evaluation of {result['samples']['uri']}\n",
        markdown_table([result]),
        f"- Real-vs-real floor at the samples' N: FID {_fmt(floor.get('fid'))} ({floor.get('rule', '–')}); "
        "FID is biased upward at small N, so a sample's FID is read beside the floor at its own N.",
        f"- {result['kid_note']}." if result.get("kid_note") else
        "- KID: the unbiased MMD² with the cubic polynomial kernel (Bińkowski et al. 2018), ×10³.",
        f"- Reference: {ref['data']} split `{ref['split']}` ({ref['n']} images, "
        f"resolution {ref['resolution']}), "
        f"manifest sha256 `{(ref['manifest_sha256'] or '')[:16]}`, statistics `{ref['uri']}`.",
        f"- Seeds: {result['seeds']['rule']}; in-trajectory noise: {result['seeds']['in_trajectory_noise']}.",
        f"- Created {result['created']}.",
        "",
    ]
    grid = result["samples"]["grid"]
    if storage.exists(grid):
        parts += [reports.embed_png(storage.read_bytes(grid), "samples", link=grid), ""]
    return "\n".join(parts)


__all__ = ["class_accuracy", "evaluate_samples", "kid_applies", "markdown_report", "markdown_table",
           "sample_features", "score_features"]
