"""Shard an image source into WebDataset tars on any storage URI, with a manifest, idempotently.

Plan: a seeded permutation splits the source into train/test (or the source's own split, for CIFAR)
and orders each split, so shards mix classes; each split is cut into shards of `shard_size` samples,
named `{split}-{k:06d}.tar`, with sample keys `{split}-{index:08d}`. A shard's bytes depend only on
its samples (PNG at a fixed compression level, tar headers with fixed times and owners), so the same
inputs give the same sha256.

Writing: shard tasks run in parallel (Ray tasks, threads, or inline) and each writes its tar straight
to the destination through `pipeline.storage.write_bytes` (temporary key, then move). The manifest
is written last, atomically. A rerun checks each shard against the manifest's sha256 (or, without a
usable manifest, against the bytes it would write) and rewrites only missing or corrupt shards.

Failure: bad images are found when the source is opened, before anything is written; a task that
fails later leaves no partial object (atomic writes) and no manifest for the new plan, and the
complete shards it did write are reused by the next run. On a multi-node Ray cluster an image
folder must be on storage every node reads (a bucket, a shared disk): tasks read their own files.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.data import manifest as mf
from pipeline.data.augment import MIRROR_KEY
from pipeline.data.sources import Source, open_source

log = logging.getLogger(__name__)

PARALLEL = ("auto", "ray", "threads", "none")
PNG_COMPRESS_LEVEL = 6


@dataclass(frozen=True)
class ShardTask:
    """One shard to produce: its samples (a small picklable source subset) and where it goes."""

    source: Source
    uri: str
    name: str
    split: str
    start: int  # index of the shard's first sample within its split
    encoding: str = "png"  # one of manifest.ENCODINGS


@dataclass
class ShardReport:
    """What a `shard_dataset` call did."""

    manifest_uri: str
    manifest: dict
    written: list[str] = field(default_factory=list)  # shards (re)written by this call
    kept: list[str] = field(default_factory=list)  # shards found complete and left untouched
    removed: list[str] = field(default_factory=list)  # stale shards of an earlier plan
    manifest_written: bool = False
    skipped_images: list[tuple[str, str]] = field(default_factory=list)  # (item, reason) with skip_bad


def encode_png(img: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 [H, W, C] image (C = 1 → L, C = 3 → RGB)."""
    from PIL import Image

    im = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img, mode="L" if img.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed header fields: the same samples give the same bytes and sha256
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _checked_image(source: Source, j: int) -> np.ndarray:
    img = source.image(j)
    if img.shape != source.shape or img.dtype != np.uint8:
        raise ValueError(f"{source.describe(j)}: {img.dtype} {img.shape}; expected uint8 {source.shape}")
    return img


def build_shard(source: Source, split: str, start: int, encoding: str = "png") -> bytes:
    """The tar bytes of one shard.

    png: for each sample {key}.png, {key}.cls and {key}.idx (decoded one sample at a time).
    uint8: one group keyed by the first sample, {key}.images.npy (uint8 [N, H, W, C]),
    {key}.labels.npy and {key}.idx.npy (int64 [N]): no decoding, one read per shard.
    """
    if encoding not in mf.ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: allowed {mf.ENCODINGS}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        if encoding == "uint8":
            key = mf.SAMPLE_KEY.format(split=split, index=start)
            images = np.stack([_checked_image(source, j) for j in range(len(source))])
            arrays = (images, np.asarray(source.labels, np.int64), np.asarray(source.ids, np.int64))
            for member, arr in zip(mf.UINT8_MEMBERS, arrays, strict=True):
                _add(tar, f"{key}.{member}", _npy(arr))
        else:
            for j in range(len(source)):
                img = _checked_image(source, j)
                key = mf.SAMPLE_KEY.format(split=split, index=start + j)
                _add(tar, f"{key}.png", encode_png(img))
                _add(tar, f"{key}.cls", str(int(source.labels[j])).encode())
                _add(tar, f"{key}.idx", str(int(source.ids[j])).encode())
    return buf.getvalue()


def write_shard(task: ShardTask) -> dict:
    """Build one shard and write it unless an identical one is already there; returns its entry."""
    data = build_shard(task.source, task.split, task.start, task.encoding)
    sha = mf.bytes_sha256(data)
    written = mf.file_sha256(task.uri) != sha  # an identical shard already there is left alone
    if written:
        storage.write_bytes(task.uri, data)
    return {
        "name": task.name,
        "split": task.split,
        "count": len(task.source),
        "first_index": task.start,
        "sha256": sha,
        "bytes": len(data),
        "written": written,
    }


def split_positions(
    n: int, *, test_fraction: float, seed: int, test_mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Deterministic train/test positions, each in a seeded shuffled order (so shards mix classes)."""
    rng = np.random.default_rng(seed)
    if test_mask is not None:
        test = np.flatnonzero(test_mask)
        train = np.flatnonzero(~np.asarray(test_mask, bool))
        return {"train": rng.permutation(train), "test": rng.permutation(test)}
    perm = rng.permutation(n)
    n_test = round(test_fraction * n)
    return {"train": perm[n_test:], "test": perm[:n_test]}


def plan_shards(
    source: Source, dest: str, *, shard_size: int, test_fraction: float | None, seed: int,
    encoding: str = "png",
) -> tuple[list[ShardTask], dict]:
    """Shard tasks for `source` and the split parameters the manifest records."""
    use_own = test_fraction is None and source.test_mask is not None
    fraction = 0.1 if test_fraction is None else test_fraction
    parts = split_positions(
        len(source), test_fraction=fraction, seed=seed, test_mask=source.test_mask if use_own else None
    )
    if len(parts["train"]) == 0:
        raise ValueError(f"test_fraction={fraction}: leaves no training samples out of {len(source)}")
    split_params = {"method": "source" if use_own else "random", "seed": seed}
    if not use_own:
        split_params["test_fraction"] = fraction
    tasks = []
    for split, positions in parts.items():
        for k, start in enumerate(range(0, len(positions), shard_size)):
            name = f"{split}-{k:06d}.tar"
            tasks.append(
                ShardTask(
                    source=source.subset(positions[start : start + shard_size]),
                    uri=storage.join(dest, name),
                    name=name,
                    split=split,
                    start=start,
                    encoding=encoding,
                )
            )
    return tasks, split_params


def _validate(shard_size: int, test_fraction: float | None, seed: int, parallel: str, encoding: str) -> None:
    if encoding not in mf.ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: allowed {mf.ENCODINGS}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: must be an integer >= 1")
    if test_fraction is not None and not (0.0 <= float(test_fraction) < 1.0):
        raise ValueError(f"test_fraction={test_fraction!r}: must be in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer")
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r}: allowed {PARALLEL}")


def _resolve_parallel(parallel: str, dest: str) -> str:
    """'auto' means Ray when a cluster is running here or named by RAY_ADDRESS, threads otherwise."""
    if parallel == "auto":
        from .. import raykit

        parallel = "ray" if raykit.is_running() else "threads"
    if parallel == "ray" and storage.split_scheme(dest)[0] == "memory":
        raise ValueError(f"parallel='ray' with dest={dest!r}: memory:// is per-process; use 'threads'")
    if parallel == "ray":
        from .. import raykit

        raykit.check_address()  # an unreachable RAY_ADDRESS fails here, in seconds, naming it
    return parallel


def run_tasks(
    fn: Callable, items: Sequence, *, parallel: str, max_workers: int | None = None
) -> Iterator[tuple[int, object]]:
    """Yield (position, fn(item)) as tasks finish; the first failure cancels the rest and is raised."""
    if parallel == "none" or len(items) <= 1:
        for i, item in enumerate(items):
            yield i, fn(item)
        return
    if parallel == "threads":
        workers = max_workers or min(len(items), 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = {pool.submit(fn, item): i for i, item in enumerate(items)}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = pending.pop(fut)
                        yield i, fut.result()
            finally:
                for fut in pending:
                    fut.cancel()
        return
    from .. import raykit

    yield from raykit.fan_out(fn, items, max_retries=2)


def _usable_manifest(muri: str) -> dict | None:
    try:
        return mf.read_manifest(muri)
    except (ValueError, FileNotFoundError):
        return None


def shard_dataset(
    source: str | Source,
    dest: str,
    *,
    shard_size: int = 1000,
    test_fraction: float | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    parallel: str = "auto",
    max_workers: int | None = None,
    progress: bool = False,
    encoding: str = "png",
) -> ShardReport:
    """Write `source` as WebDataset shards plus manifest.json under `dest`; reruns redo only what is missing.

    test_fraction=None uses the source's own split when it has one (CIFAR) and 0.1 otherwise.
    parallel: 'ray' (Ray tasks; 'auto' picks it when Ray is initialised or RAY_ADDRESS is set),
    'threads', or 'none'.
    encoding: 'png' (lossless PNG per sample, the smallest for natural images) or 'uint8' (raw
    arrays, one group per shard: no decoding in the loader; see pipeline.data.manifest).
    """
    _validate(shard_size, test_fraction, seed, parallel, encoding)
    storage.split_scheme(dest)  # "s3://" without a bucket is refused before it becomes a folder "s3:"
    dest = dest.rstrip("/")
    parallel = _resolve_parallel(parallel, dest)
    storage.check_writable(dest)  # a missing bucket or credentials fail here, before any work
    # A killed earlier run of this stage may have left temporary keys of half-uploaded shards.
    storage.remove_temp_objects(dest)
    src = open_source(source, skip_bad=skip_bad)
    if len(src) == 0:
        raise ValueError(f"source {src.uri}: no images (empty source)")
    tasks, split_params = plan_shards(
        src, dest, shard_size=shard_size, test_fraction=test_fraction, seed=seed, encoding=encoding
    )
    params = {"shard_size": shard_size, "split": split_params, "skip_bad": bool(skip_bad)}
    if encoding != "png":  # PNG manifests written before the choice existed still match their plan
        params["encoding"] = encoding
    muri = mf.manifest_uri(dest)
    old = _usable_manifest(muri)

    report = ShardReport(manifest_uri=muri, manifest={}, skipped_images=list(src.skipped))
    same_plan = (
        old is not None
        and old.get("source", {}).get("fingerprint") == src.fingerprint
        and old.get("params") == params
    )
    todo = tasks
    entries: dict[str, dict] = {}
    if same_plan:
        # Fast path: shards the manifest vouches for are checked by checksum only, never rebuilt.
        old_by_name = {s["name"]: s for s in old["shards"]}
        candidates = [t for t in tasks if t.name in old_by_name]
        with ThreadPoolExecutor(max_workers=8) as pool:
            digests = list(pool.map(lambda t: mf.file_sha256(t.uri), candidates))
        for t, d in zip(candidates, digests, strict=True):
            if d == old_by_name[t.name]["sha256"]:
                entries[t.name] = {k: v for k, v in old_by_name[t.name].items()}
                report.kept.append(t.name)
        todo = [t for t in tasks if t.name not in entries]
    elif old is not None or storage.exists(muri):
        # A different plan: the old manifest no longer describes what is being written.
        storage.remove(muri)
        log.info("removed %s: it described a different source or parameters", muri)

    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="shard", desc=f"shard → {dest}")
    try:
        for _, entry in run_tasks(write_shard, todo, parallel=parallel, max_workers=max_workers):
            (report.written if entry.pop("written") else report.kept).append(entry["name"])
            entries[entry["name"]] = entry
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    shards = [entries[t.name] for t in tasks]
    manifest = build_manifest(src, shards, params=params, encoding=encoding)
    report.manifest = manifest
    if old != manifest:
        storage.write_json(muri, manifest)
        report.manifest_written = True
    # Shards an earlier, larger plan named and this one does not would confuse a folder listing.
    if old is not None:
        current = {t.name for t in tasks}
        for s in old["shards"]:
            if s["name"] not in current:
                storage.remove(storage.join(dest, s["name"]))
                report.removed.append(s["name"])
    report.written.sort()
    report.kept.sort()
    return report


def build_manifest(src: Source, shards: list[dict], *, params: dict, encoding: str = "png") -> dict:
    """The manifest dict for shards of `src` (see pipeline.data.manifest)."""
    counts = {split: sum(s["count"] for s in shards if s["split"] == split) for split in ("train", "test")}
    counts["total"] = counts["train"] + counts["test"]
    return {
        "format": mf.FORMAT,
        "package": {"name": "diffusion-pipeline", "version": mf.package_version()},
        "source": src.metadata(),
        "params": params,
        "counts": counts,
        "image": {
            "shape": list(src.shape),  # [H, W, C]
            "height": src.shape[0],
            "width": src.shape[1],
            "channels": src.shape[2],
            "dtype": "uint8",
            "encoding": encoding,
        },
        "levels": src.levels,
        MIRROR_KEY: src.mirror_invariant,
        "label_names": src.label_names,
        "num_classes": len(src.label_names),
        "sample_key": mf.SAMPLE_KEY,
        "fields": mf.FIELDS_UINT8 if encoding == "uint8" else mf.FIELDS,
        "skipped": {"count": len(src.skipped), "items": [{"item": i, "reason": r} for i, r in src.skipped]},
        "shards": shards,
    }
