"""`manifest.json`: what a sharded dataset holds and how to check it.

The manifest is written last and atomically, so its presence means every shard it names was complete
when it was written; each shard's sha256 lets a reader (or a rerun of `shard`) verify that still holds.
Shard names are relative to the manifest's folder, so a dataset can be copied between buckets.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline import storage

MANIFEST_NAME = "manifest.json"
FORMAT = "pipeline-webdataset/1"
# Sample layout inside each tar: {key}.png (image), {key}.cls (label), {key}.idx (index in the source).
SAMPLE_KEY = "{split}-{index:08d}"
FIELDS = {"png": "image, lossless PNG (L or RGB)", "cls": "label, decimal text", "idx": "source index"}
# Image encodings, chosen at sharding time and recorded as manifest["image"]["encoding"].
ENCODINGS = ("png", "uint8")
# Latent shards (pipeline.latent.shards): the uint8 layout with float16 latents [N, h, w, c] as images.npy;
# the loader multiplies them by manifest["latent"]["scale_factor"] (Rombach et al. 2022, unit std).
LATENT_ENCODING = "float16"
# The uint8 layout: one group per shard, keyed by its first sample's key, holding the shard's samples
# as three .npy arrays (their headers state shape and dtype, so a reader checks them against the
# manifest without decoding anything). The images member comes first in the tar.
UINT8_MEMBERS = ("images.npy", "labels.npy", "idx.npy")
FIELDS_UINT8 = {
    "images.npy": "images, uint8 [N, H, W, C], C-order",
    "labels.npy": "labels, int64 [N]",
    "idx.npy": "source indices, int64 [N]",
}
_HEADER_BYTES = 2048  # a tar header (512) and an .npy header (128 for these arrays) fit easily


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


def image_encoding(manifest: dict) -> str:
    """The manifest's image encoding ('png' for manifests written before the field had choices)."""
    enc = manifest.get("image", {}).get("encoding", "png")
    if enc not in (*ENCODINGS, LATENT_ENCODING):
        raise ValueError(f"manifest image.encoding={enc!r}: allowed {(*ENCODINGS, LATENT_ENCODING)}")
    return enc


def check_uint8_array(shape: tuple[int, ...], dtype: np.dtype, *, shard: str, key: str,
                      image_shape: tuple[int, ...], count: int | None = None, expect: str = "uint8") -> None:
    """A ValueError naming the shard and key when a uint8 (or float16 latent: `expect`) shard's image
    array disagrees with the manifest."""
    want = (count if count is not None else "N", *image_shape)
    ok = np.dtype(dtype) == np.dtype(expect) and len(shape) == 4 and tuple(shape[1:]) == tuple(image_shape)
    if ok and count is not None:
        ok = shape[0] == count
    if not ok:
        raise ValueError(
            f"shard {shard}, key {key}: images array is {np.dtype(dtype)} {tuple(shape)}; the manifest says "
            f"{expect} {want}. Reshard the dataset (its manifest and shards disagree)"
        )


def read_uint8_header(uri: str) -> tuple[str, tuple[int, ...], np.dtype]:
    """(sample key, array shape, dtype) of a uint8 shard's images member, from its first bytes only."""
    with storage.open_uri(uri, "rb") as f:
        head = f.read(_HEADER_BYTES)
    try:
        info = tarfile.TarInfo.frombuf(head[:512], tarfile.ENCODING, "surrogateescape")
        key, _, field = info.name.partition(".")
        if field != UINT8_MEMBERS[0]:
            raise ValueError(f"first member {info.name!r}, expected '<key>.{UINT8_MEMBERS[0]}'")
        body = io.BytesIO(head[512:])
        version = np.lib.format.read_magic(body)
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(body)
    except (tarfile.TarError, ValueError, EOFError) as e:
        raise ValueError(f"shard {uri}: not a uint8 shard ({type(e).__name__}: {e})") from e
    if fortran:
        raise ValueError(f"shard {uri}, key {key}: images array is Fortran-ordered; expected C order")
    return key, tuple(shape), np.dtype(dtype)


def check_uint8_shards(manifest: dict, root: str, entries: list[dict], *, max_workers: int = 8) -> None:
    """Check each uint8 shard's image array header against the manifest (a small read per shard),
    so that a mismatch fails before training starts rather than at the first batch that meets it."""
    image_shape = tuple(manifest["image"]["shape"])

    def check(entry: dict) -> None:
        uri = storage.join(root, entry["name"])
        key, shape, dtype = read_uint8_header(uri)
        check_uint8_array(shape, dtype, shard=uri, key=key, image_shape=image_shape, count=entry["count"],
                          expect="float16" if image_encoding(manifest) == LATENT_ENCODING else "uint8")

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        list(pool.map(check, entries))
