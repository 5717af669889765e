"""`manifest.json`: what a sharded dataset holds and how to check it.

The manifest is written last and atomically, so its presence means every shard it names was complete
when it was written; each shard's sha256 lets a reader (or a rerun of `shard`) verify that still holds.
Shard names are relative to the manifest's folder, so a dataset can be copied between buckets.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from pipeline import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "pipeline-webdataset/1"
# Sample layout inside each tar: {key}.png (image), {key}.cls (label), {key}.idx (index in the source).
SAMPLE_KEY = "{split}-{index:08d}"
FIELDS = {"png": "image, lossless PNG (L or RGB)", "cls": "label, decimal text", "idx": "source index"}


def package_version() -> str:
    """The installed diffusion-pipeline version (recorded so a dataset names the code that wrote it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusion-pipeline")
    except PackageNotFoundError:
        return "0+unknown"


def manifest_uri(uri: str) -> str:
    """The manifest's URI from either the dataset folder or the manifest itself."""
    return uri if uri.rstrip("/").endswith(".json") else storage.join(uri, MANIFEST_NAME)


def dataset_root(uri: str) -> str:
    """The dataset folder from either the folder or its manifest URI."""
    return storage.parent(uri) if uri.rstrip("/").endswith(".json") else uri.rstrip("/")


def read_manifest(uri: str) -> dict:
    """Load and sanity-check a manifest (from the dataset folder or the manifest URI)."""
    muri = manifest_uri(uri)
    try:
        m = storage.read_json(muri)
    except FileNotFoundError as e:
        raise ValueError(f"manifest {muri}: not found (has the dataset been sharded?)") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"manifest {muri}: format {got!r}; expected {FORMAT!r}")
    for key in ("shards", "counts", "image", "levels", "label_names"):
        if key not in m:
            raise ValueError(f"manifest {muri}: missing field {key!r}")
    return m


def shard_entries(manifest: dict, split: str) -> list[dict]:
    """The manifest's shard entries for `split`, in order."""
    splits = sorted({s["split"] for s in manifest["shards"]})
    entries = [s for s in manifest["shards"] if s["split"] == split]
    if not entries:
        raise ValueError(f"split={split!r}: no shards in this dataset; available: {splits}")
    return entries


def shard_urls(uri: str, split: str, manifest: dict | None = None) -> list[str]:
    """Full URLs of the shards of `split`, in the manifest's order."""
    manifest = manifest if manifest is not None else read_manifest(uri)
    root = dataset_root(uri)
    return [storage.join(root, s["name"]) for s in shard_entries(manifest, split)]


def file_sha256(uri: str) -> str | None:
    """Hex sha256 of the object at `uri`, or None when it is missing."""
    try:
        return storage.sha256(uri)
    except FileNotFoundError:
        return None


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def verify_manifest(uri: str, *, max_workers: int = 8) -> list[str]:
    """Names of the shards that are missing or whose sha256 differs from the manifest's ([] = intact)."""
    manifest = read_manifest(uri)
    root = dataset_root(uri)
    shards = manifest["shards"]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        digests = list(pool.map(lambda s: file_sha256(storage.join(root, s["name"])), shards))
    return [s["name"] for s, d in zip(shards, digests, strict=True) if d != s["sha256"]]
