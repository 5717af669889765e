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
from .fid import FeatureStats, StatsAccumulator, frechet_distance, kernel_inception_distance, reference_stats
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


def score_features(
    features: np.ndarray,
    ref: FeatureStats,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """FID (and KID when the reference kept raw features) of `features` against `ref`."""
    acc = StatsAccumulator()
    acc.update(features)
    gen = acc.stats()
    out: dict[str, Any] = {
        "fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma),
        "n": int(features.shape[0]),
    }
    if ref.features is not None and ref.features.shape[0] >= 2 and features.shape[0] >= 2:
        m = min(kid_subset_size, features.shape[0], ref.features.shape[0])
        mean, std = kernel_inception_distance(
            features, ref.features, subsets=kid_subsets, subset_size=m, seed=seed
        )
        out["kid"] = {"mean": mean, "std": std, "subsets": kid_subsets, "subset_size": m}
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
    result = {
        "fid": scores["fid"],
        "kid": scores.get("kid"),
        "floor": ref.meta.get("floor"),
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
    """One row per evaluation: the figure and everything needed to reproduce it."""
    head = (
        "| FID | KID (×10³) | floor FID | N | extractor | weights | ref stats | sampler | steps | NFE | w | "
        "seeds | checkpoint |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        kid = r.get("kid")
        kid_s = f"{1e3 * kid['mean']:.3f} ± {1e3 * kid['std']:.3f}" if kid else "–"
        floor = (r.get("floor") or {}).get("fid")
        s = r["seeds"]
        nfe = r["nfe"]
        nfe_s = (
            f"{nfe['mean']:g}"
            if nfe["min"] == nfe["max"]
            else f"{nfe['mean']:.1f} ({nfe['min']}–{nfe['max']})"
        )
        ck = r["checkpoint"]
        lines.append(
            f"| {_fmt(r['fid'])} | {kid_s} | {_fmt(floor)} | {r['n']} | {r['extractor']['id']} | "
            f"`{r['extractor']['weights_sha256'][:12]}` | `{r['reference']['sha256'][:12]}` | "
            f"{r['sampler']} | "
            f"{r['steps']} | {nfe_s} | {r['guidance_w']:g} | {s['first']}…{s['last']} | "
            f"{ck['uri']} (`{ck['sha256'][:12]}`, step {ck.get('step')}) |"
        )
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    """The markdown page of one evaluation: table, floor, reference and the sample grid."""
    floor = result.get("floor") or {}
    ref = result["reference"]
    parts = [
        f"# Evaluation of {result['samples']['uri']}\n",
        markdown_table([result]),
        f"- Real-vs-real floor: FID {_fmt(floor.get('fid'))} between the two disjoint halves of the "
        f"reference split ({floor.get('n_per_half')} images); FID is biased upward at small N, "
        "so compare with it.",
        f"- Reference: {ref['data']} split `{ref['split']}` ({ref['n']} images, "
        f"resolution {ref['resolution']}), "
        f"manifest sha256 `{(ref['manifest_sha256'] or '')[:16]}`, statistics `{ref['uri']}`.",
        f"- Seeds: {result['seeds']['rule']}; in-trajectory noise: {result['seeds']['in_trajectory_noise']}.",
        f"- Created {result['created']}.",
        "",
        f"![samples]({GRID_FILE})",
        "",
    ]
    return "\n".join(parts)


__all__ = ["evaluate_samples", "markdown_report", "markdown_table", "sample_features", "score_features"]
