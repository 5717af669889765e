"""Image sources: each is a finite, indexable set of (uint8 HWC image, int label).

Kinds: an image folder (one subfolder per class; png/jpg), arrays in .npz/.npy, the CIFAR-10/100
python tarball, and the embedded default, scikit-learn's digits (8×8, values 0..16, so `levels=17`).
Every source reads through `pipeline.storage`, so any URI works. A source also carries what the
manifest needs: image shape, label names, `levels` (number of grey levels; 256 for 8-bit data) and a
content fingerprint. `subset(positions)` gives a small picklable part for one shard task.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import posixpath
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from pipeline import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ALLOWED_MODES = {"L": 1, "RGB": 3}


class Source:
    """Base: `ids` are indices into the original source, `labels` int64, images uint8 [H, W, C]."""

    kind = "source"
    # Whether a mirrored image keeps its meaning (manifest key "mirror_invariant", see data/augment.py):
    # None = unknown (the user decides whether to flip), False = mirroring changes the class.
    mirror_invariant: bool | None = None

    def __init__(
        self,
        *,
        uri: str,
        labels: np.ndarray,
        label_names: Sequence[str],
        shape: tuple[int, int, int],
        levels: int,
        fingerprint: str,
        ids: np.ndarray | None = None,
        test_mask: np.ndarray | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.uri = uri
        self.labels = np.asarray(labels, dtype=np.int64)
        self.label_names = [str(n) for n in label_names]
        self.shape = tuple(int(s) for s in shape)
        self.levels = int(levels)
        self.fingerprint = fingerprint
        self.ids = np.arange(len(self.labels), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        # The source's own train/test split (CIFAR), True = test; None when it has none.
        self.test_mask = test_mask
        # (item, reason) for every image dropped by skip_bad.
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, pos: int) -> np.ndarray:
        """The uint8 [H, W, C] image at position `pos`."""
        raise NotImplementedError

    def describe(self, pos: int) -> str:
        """A name for item `pos` that a researcher can find (a file, or file[index])."""
        return f"{self.uri}[{int(self.ids[pos])}]"

    def subset(self, positions: Sequence[int]) -> Source:
        """A picklable source holding only `positions` (in that order), with the original ids."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for pos in range(len(self)):
            yield self.image(pos), int(self.labels[pos])

    def metadata(self) -> dict:
        """What the manifest records about the source (no secrets: URIs carry none)."""
        return {"uri": self.uri, "kind": self.kind, "fingerprint": self.fingerprint}


class ArraySource(Source):
    """Images held in memory as one uint8 array [N, H, W, C]."""

    kind = "arrays"

    def __init__(self, images: np.ndarray, labels: np.ndarray, **kw) -> None:
        super().__init__(labels=labels, shape=images.shape[1:], **kw)
        self.images = images

    def image(self, pos: int) -> np.ndarray:
        return self.images[pos]

    def subset(self, positions: Sequence[int]) -> ArraySource:
        p = np.asarray(positions, dtype=np.int64)
        out = ArraySource(
            np.ascontiguousarray(self.images[p]),
            self.labels[p],
            uri=self.uri,
            label_names=self.label_names,
            levels=self.levels,
            fingerprint=self.fingerprint,
            ids=self.ids[p],
        )
        out.kind, out.mirror_invariant = self.kind, self.mirror_invariant
        return out


class FolderSource(Source):
    """Images read from files on demand (one subfolder per class)."""

    kind = "image-folder"

    def __init__(self, files: Sequence[str], labels: np.ndarray, **kw) -> None:
        super().__init__(labels=labels, **kw)
        self.files = list(files)

    def image(self, pos: int) -> np.ndarray:
        uri = self.files[pos]
        try:
            data = storage.read_bytes(uri)
        except (OSError, ValueError) as e:
            raise ValueError(f"image {uri}: unreadable ({e})") from e
        img = decode_image(data, uri)
        if img.shape != self.shape:
            raise ValueError(f"image {uri}: shape {img.shape} differs from the source's {self.shape}")
        return img

    def describe(self, pos: int) -> str:
        return self.files[pos]

    def subset(self, positions: Sequence[int]) -> FolderSource:
        p = np.asarray(positions, dtype=np.int64)
        return FolderSource(
            [self.files[i] for i in p],
            self.labels[p],
            uri=self.uri,
            label_names=self.label_names,
            shape=self.shape,
            levels=self.levels,
            fingerprint=self.fingerprint,
            ids=self.ids[p],
        )


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode png/jpg bytes to uint8 [H, W, C]; a ValueError names `name` when it cannot."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully, so a truncated file fails here and not later
            mode = im.mode
            if mode not in ALLOWED_MODES:
                allowed = sorted(ALLOWED_MODES)
                raise ValueError(f"image {name}: mode {mode!r} not supported; allowed: {allowed}")
            arr = np.asarray(im, dtype=np.uint8)
    except ValueError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error... for corrupt data
        raise ValueError(f"image {name}: unreadable or corrupt ({type(e).__name__}: {e})") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def _mode_name(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]} {'L' if shape[2] == 1 else 'RGB'}"


# ---------------------------------------------------------------------------------------- image folder


def _scan_one(uri: str) -> tuple[str, str | None, tuple[int, int, int] | None, str]:
    """(uri, error or None, shape, content sha256) for one image file."""
    try:
        data = storage.read_bytes(uri)
    except (OSError, ValueError) as e:
        return uri, f"unreadable ({e})", None, ""
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = decode_image(data, uri)
    except ValueError as e:
        return uri, str(e), None, digest
    return uri, None, img.shape, digest


def image_folder(uri: str, *, skip_bad: bool = False, max_workers: int | None = None) -> FolderSource:
    """An image folder with one subfolder per class; every image is decoded once here to check it."""
    root = uri.rstrip("/")
    files = storage.find(root)
    if not files and not storage.exists(root):
        raise ValueError(f"image folder {uri}: does not exist")
    # storage.find answers plain absolute paths for plain paths, scheme://... URIs otherwise.
    prefix = root + "/" if "://" in root else os.path.abspath(os.path.expanduser(root)) + os.sep
    entries: list[tuple[str, str]] = []  # (class name, file uri)
    for f in files:
        rel = f[len(prefix) :] if f.startswith(prefix) else f
        parts = rel.replace(os.sep, "/").split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue  # files at the top level or hidden files are not samples
        if posixpath.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS:
            entries.append((parts[0], f))
    if not entries:
        raise ValueError(
            f"image folder {uri}: no {'/'.join(IMAGE_EXTENSIONS)} images in class subfolders "
            "(expected ROOT/<class name>/<image>)"
        )
    entries.sort()
    class_names = sorted({c for c, _ in entries})
    workers = max_workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scans = list(pool.map(_scan_one, [f for _, f in entries]))

    bad: list[tuple[str, str]] = [(u, err) for u, err, _, _ in scans if err is not None]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"{bad[0][1]}{more}; pass --skip-bad (skip_bad=True) to leave such images out")
    shapes = Counter(s for _, err, s, _ in scans if err is None)
    if not shapes:
        raise ValueError(f"image folder {uri}: every image is unreadable ({len(bad)} skipped)")
    # The most common size and mode is the dataset's; ties go to the one seen first.
    first_seen: dict[tuple[int, int, int], int] = {}
    for _, err, s, _ in scans:
        if err is None:
            first_seen.setdefault(s, len(first_seen))
    ref_shape = max(shapes, key=lambda s: (shapes[s], -first_seen[s]))
    odd = [(u, s) for u, err, s, _ in scans if err is None and s != ref_shape]
    if odd and not skip_bad:
        u, s = odd[0]
        raise ValueError(
            f"image {u}: mixed sizes or modes: it is {_mode_name(s)}, but {shapes[ref_shape]} images are "
            f"{_mode_name(ref_shape)} ({len(odd)} differ); pass --skip-bad to leave them out"
        )
    ref = _mode_name(ref_shape)
    bad += [(u, f"image {u}: {_mode_name(s)} differs from the dataset's {ref}") for u, s in odd]
    bad_set = {u for u, _ in bad}

    h = hashlib.sha256()
    for (cls, f), (_, _, _, digest) in zip(entries, scans, strict=True):
        h.update(f"{f[len(prefix) :]}\0{cls}\0{digest}\n".encode())
    keep = [(c, f) for c, f in entries if f not in bad_set]
    label_of = {c: i for i, c in enumerate(class_names)}
    return FolderSource(
        [f for _, f in keep],
        np.array([label_of[c] for c, _ in keep], dtype=np.int64),
        uri=uri,
        label_names=class_names,
        shape=ref_shape,
        levels=256,
        fingerprint="sha256:" + h.hexdigest(),
        skipped=sorted(bad),
    )


# ---------------------------------------------------------------------------------------------- arrays


def _array_fingerprint(images: np.ndarray, labels: np.ndarray, *extra: str) -> str:
    h = hashlib.sha256()
    h.update(f"{images.shape}|{labels.shape}|{'|'.join(extra)}".encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels.astype(np.int64)).data)
    return "sha256:" + h.hexdigest()


def _check_images(images: np.ndarray, where: str, levels: int) -> np.ndarray:
    """uint8 [N, H, W, C] from [N, H, W] or [N, H, W, C] integer arrays; ValueError otherwise."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{where}: images shape {tuple(images.shape)}; expected [N, H, W], [N, H, W, 1] or "
            "[N, H, W, 3] (channels last; transpose CHW data first)"
        )
    if len(images) == 0:
        raise ValueError(f"{where}: no images (empty source)")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer):
            raise ValueError(
                f"{where}: images dtype {images.dtype}; expected uint8 (or integers in 0..255): "
                "quantise float images first"
            )
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: image values span {lo}..{hi}; allowed 0..255")
        images = images.astype(np.uint8)
    if not 2 <= levels <= 256:
        raise ValueError(f"{where}: levels={levels}; allowed 2..256")
    if int(images.max()) >= levels:
        raise ValueError(f"{where}: image value {int(images.max())} >= levels={levels}")
    return np.ascontiguousarray(images)


def _check_labels(labels: np.ndarray | None, n: int, where: str) -> np.ndarray:
    if labels is None:
        return np.zeros(n, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{where}: labels shape {tuple(labels.shape)}; expected [{n}] (one per image)")
    if not np.issubdtype(labels.dtype, np.integer) or (n and int(labels.min()) < 0):
        raise ValueError(f"{where}: labels must be non-negative integers (got dtype {labels.dtype})")
    return labels.astype(np.int64)


IMAGE_KEYS = ("images", "x", "data", "arr_0")
LABEL_KEYS = ("labels", "y", "targets", "arr_1")


def npz_source(uri: str) -> ArraySource:
    """Arrays in .npz (images under images/x/data, labels under labels/y/targets, optional
    label_names and levels) or .npy (images; labels from a sibling <stem>_labels.npy when present)."""
    try:
        raw = storage.read_bytes(uri)
    except (OSError, ValueError) as e:
        raise ValueError(f"array source {uri}: unreadable ({e})") from e
    label_names = None
    levels = 256
    try:
        if uri.lower().endswith(".npy"):
            images = np.load(io.BytesIO(raw), allow_pickle=False)
            stem = uri[: -len(".npy")]
            labels = None
            for cand in (f"{stem}_labels.npy", f"{stem}.labels.npy"):
                if storage.exists(cand):
                    labels = np.load(io.BytesIO(storage.read_bytes(cand)), allow_pickle=False)
                    break
        else:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                keys = list(z.keys())
                ik = next((k for k in IMAGE_KEYS if k in keys), None)
                if ik is None:
                    raise ValueError(
                        f"array source {uri}: keys {keys}; expected images under one of {IMAGE_KEYS}"
                    )
                lk = next((k for k in LABEL_KEYS if k in keys), None)
                images = z[ik]
                labels = z[lk] if lk else None
                if "label_names" in keys:
                    label_names = [str(s) for s in z["label_names"]]
                if "levels" in keys:
                    levels = int(z["levels"])
    except ValueError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, pickle refusal...
        raise ValueError(f"array source {uri}: corrupt or not a numpy file ({type(e).__name__}: {e})") from e
    images = _check_images(images, f"array source {uri}", levels)
    labels = _check_labels(labels, len(images), f"array source {uri}")
    n_classes = int(labels.max()) + 1
    if label_names is None:
        label_names = [str(i) for i in range(n_classes)]
    elif len(label_names) < n_classes:
        raise ValueError(
            f"array source {uri}: {len(label_names)} label_names for labels up to {n_classes - 1}"
        )
    src = ArraySource(
        images,
        labels,
        uri=uri,
        label_names=label_names,
        levels=levels,
        fingerprint=_array_fingerprint(images, labels, str(levels), *label_names),
    )
    src.kind = "npz" if uri.lower().endswith(".npz") else "npy"
    return src


def digits_source() -> ArraySource:
    """scikit-learn's digits: 1,797 8×8 greys with values 0..16 kept as is (levels=17), labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)[..., None]  # exact: the values are the integers 0..16
    labels = d.target.astype(np.int64)
    src = ArraySource(
        images,
        labels,
        uri="digits",
        label_names=[str(i) for i in range(10)],
        levels=17,
        fingerprint=_array_fingerprint(images, labels, "17"),
    )
    src.kind = "sklearn-digits"
    src.mirror_invariant = False  # a mirrored 2, 3, 5, 6, 7 or 9 is not that digit
    return src


# ------------------------------------------------------------------------------------ CIFAR tarball


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of lists and numpy arrays only: a tarball from a bucket must not run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        module = module.replace("numpy.core.", "numpy._core.")  # pickles written before numpy 2
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # encoding="bytes": the original batches are Python 2 pickles with byte-string keys.
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"{where}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a dict, found {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it (the tarball's fingerprint)."""

    def __init__(self, f) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.h.update(data)
        b[: len(data)] = data
        return len(data)


CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def cifar_source(uri: str) -> ArraySource:
    """The CIFAR-10 (or CIFAR-100) python tarball: pickled batches of uint8 rows [N, 3072] in CHW order."""
    members: dict[str, bytes] = {}
    wanted = {*CIFAR10_TRAIN, "test_batch", "batches.meta", "train", "test", "meta"}
    try:
        with storage.open_uri(uri, "rb") as raw:
            hashed = _HashingReader(raw)
            # Stream mode reads the tarball once, front to back: no seeks on object storage.
            with tarfile.open(fileobj=io.BufferedReader(hashed, 1 << 20), mode="r|*") as tar:
                for m in tar:
                    name = posixpath.basename(m.name)
                    if m.isfile() and name in wanted:
                        members[name] = tar.extractfile(m).read()
            while hashed.read(1 << 20):
                pass
    except FileNotFoundError as e:
        raise ValueError(f"CIFAR tarball {uri}: not found") from e
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"CIFAR tarball {uri}: truncated or corrupt ({type(e).__name__}: {e})") from e
    if all(n in members for n in (*CIFAR10_TRAIN, "test_batch", "batches.meta")):
        train_names, test_names, meta_name = CIFAR10_TRAIN, ("test_batch",), "batches.meta"
        label_key, names_key = "labels", "label_names"
    elif all(n in members for n in ("train", "test", "meta")):
        train_names, test_names, meta_name = ("train",), ("test",), "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    else:
        need = sorted({*CIFAR10_TRAIN, "test_batch", "batches.meta"} - set(members))
        raise ValueError(f"CIFAR tarball {uri}: missing members {need} (found {sorted(members)})")

    meta = _unpickle(members[meta_name], f"{uri}:{meta_name}")
    if names_key not in meta:
        raise ValueError(f"{uri}:{meta_name}: no {names_key!r} entry")
    label_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    images, labels, is_test = [], [], []
    for name in (*train_names, *test_names):
        batch = _unpickle(members[name], f"{uri}:{name}")
        if "data" not in batch or label_key not in batch:
            found = sorted(batch)
            raise ValueError(f"{uri}:{name}: expected 'data' and {label_key!r} entries, found {found}")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{uri}:{name}: data is {data.dtype} {data.shape}; expected uint8 [N, 3072]")
        lab = _check_labels(np.asarray(batch[label_key]), len(data), f"{uri}:{name}")
        # Rows are the red, green, blue 32×32 planes, each row-major: CHW → HWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
        is_test.append(np.full(len(data), name in test_names))
    all_images = np.ascontiguousarray(np.concatenate(images))
    all_labels = np.concatenate(labels)
    if len(all_images) == 0:
        raise ValueError(f"CIFAR tarball {uri}: no images (empty source)")
    if int(all_labels.max()) >= len(label_names):
        raise ValueError(f"CIFAR tarball {uri}: label {int(all_labels.max())} but {len(label_names)} names")
    src = ArraySource(
        all_images,
        all_labels,
        uri=uri,
        label_names=label_names,
        levels=256,
        fingerprint="sha256:" + hashed.h.hexdigest(),
        test_mask=np.concatenate(is_test),
    )
    src.kind = "cifar-python"
    return src


# ------------------------------------------------------------------------------------------ dispatch


def open_source(spec: str | Source, *, skip_bad: bool = False) -> Source:
    """A source from a spec: 'digits', an .npz/.npy URI, a CIFAR python tarball URI, or an image folder."""
    if isinstance(spec, Source):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"source={spec!r}: expected 'digits', an .npz/.npy, a CIFAR tarball or a folder URI")
    low = spec.lower().rstrip("/")
    if low in ("digits", "sklearn-digits", "sklearn:digits"):
        return digits_source()
    if low.endswith((".npz", ".npy")):
        return npz_source(spec)
    if low.endswith((".tar.gz", ".tgz", ".tar")):
        return cifar_source(spec)
    if storage.exists(spec) and not _is_file(spec):
        return image_folder(spec, skip_bad=skip_bad)
    raise ValueError(
        f"source={spec!r}: not found or not understood; allowed: 'digits', a folder of class subfolders, "
        "an .npz/.npy file, or a CIFAR python tarball (.tar.gz)"
    )


def _is_file(uri: str) -> bool:
    fs, path = storage.get_fs(uri)
    return bool(fs.isfile(path))
