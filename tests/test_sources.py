"""Image sources: folders, npz/npy, the CIFAR python tarball, sklearn digits, and their bad inputs."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data.sources import cifar_source, digits_source, image_folder, npz_source, open_source

pytest_plugins = ("tests.fixtures_s3",)  # s3_server, s3_bucket, ray_local


def write_png(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)


def make_folder(root, n_per_class=3, shape=(6, 5, 3), seed=0) -> dict[str, tuple[np.ndarray, str]]:
    """Class folders of random PNGs; returns {file path: (pixels, class name)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls in ("cat", "dog"):
        for i in range(n_per_class):
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            path = root / cls / f"{i:03d}.png"
            write_png(path, arr)
            written[str(path)] = (arr, cls)
    return written


def test_image_folder_reads_exact_pixels_and_labels(tmp_path):
    written = make_folder(tmp_path)
    (tmp_path / "README.txt").write_text("not a sample")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    src = image_folder(str(tmp_path))
    assert src.label_names == ["cat", "dog"]
    assert len(src) == 6 and src.shape == (6, 5, 3) and src.levels == 256
    for pos, (img, label) in enumerate(src):
        arr, cls = written[src.files[pos]]
        assert np.array_equal(img, arr)
        assert src.label_names[label] == cls
    assert src.skipped == []


def test_image_folder_jpeg_and_grey(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(4, 4, 1), dtype=np.uint8)
    write_png(tmp_path / "a" / "g.png", grey)
    rgb = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    write_png(tmp_path / "b" / "c.png", rgb)
    # Grey and RGB mixed: a mode mismatch, named.
    with pytest.raises(ValueError, match=r"mixed sizes or modes.*4x4"):
        image_folder(str(tmp_path))
    (tmp_path / "b" / "c.png").unlink()
    jpg_path = tmp_path / "b" / "j.jpg"
    Image.fromarray(rng.integers(0, 256, size=(4, 4), dtype=np.uint8)).save(jpg_path, quality=90)
    src = image_folder(f"file://{tmp_path}")
    decoded = np.asarray(Image.open(jpg_path))[:, :, None]  # the pixels PIL decodes are the reference
    images = {f: img for f, (img, _) in zip(src.files, src, strict=True)}
    assert np.array_equal(images[f"file://{jpg_path}"], decoded)
    assert np.array_equal(images[f"file://{tmp_path}/a/g.png"], grey)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    make_folder(tmp_path)
    good = (tmp_path / "dog" / "001.png").read_bytes()
    bad = tmp_path / "dog" / "999.png"
    bad.write_bytes(good[: len(good) // 2])  # truncated PNG
    (tmp_path / "cat" / "junk.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match=r"(999\.png|junk\.jpg).*(corrupt|unreadable)"):
        image_folder(str(tmp_path))
    src = image_folder(str(tmp_path), skip_bad=True)
    assert len(src) == 6
    assert sorted(item for item, _ in src.skipped) == sorted([str(bad), str(tmp_path / "cat" / "junk.jpg")])
    assert str(bad) not in src.files


def test_mixed_sizes_named_and_skippable(tmp_path):
    make_folder(tmp_path, shape=(6, 5, 3))
    odd = tmp_path / "cat" / "odd.png"
    write_png(odd, np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"odd\.png.*mixed sizes or modes.*7x5 RGB.*6x5 RGB"):
        image_folder(str(tmp_path))
    src = image_folder(str(tmp_path), skip_bad=True)
    assert len(src) == 6 and [s[0] for s in src.skipped] == [str(odd)]


def test_unsupported_mode_named(tmp_path):
    make_folder(tmp_path, shape=(4, 4, 3))
    Image.new("RGBA", (4, 4)).save(tmp_path / "dog" / "alpha.png")
    with pytest.raises(ValueError, match=r"alpha\.png: mode 'RGBA' not supported"):
        image_folder(str(tmp_path))


def test_empty_sources(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match=r"no .*images"):
        image_folder(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        image_folder(str(tmp_path / "missing"))
    np.savez(tmp_path / "e.npz", images=np.zeros((0, 4, 4, 3), np.uint8), labels=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="empty source"):
        npz_source(str(tmp_path / "e.npz"))


def test_npz_and_npy(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(7, 4, 3, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=7)
    np.savez(tmp_path / "d.npz", x=images, y=labels, label_names=np.array(["a", "b", "c"]))
    src = npz_source(str(tmp_path / "d.npz"))
    assert src.label_names == ["a", "b", "c"] and src.shape == (4, 3, 3)
    for pos, (img, label) in enumerate(src):
        assert np.array_equal(img, images[pos]) and label == labels[pos]
    grey = rng.integers(0, 256, size=(5, 4, 4), dtype=np.int32)
    np.save(tmp_path / "g.npy", grey)
    np.save(tmp_path / "g_labels.npy", np.arange(5))
    g = open_source(str(tmp_path / "g.npy"))
    assert g.shape == (4, 4, 1)
    assert np.array_equal(np.stack([img for img, _ in g])[..., 0], grey)
    assert [label for _, label in g] == [0, 1, 2, 3, 4]


def test_npz_bad_arrays(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4, 3), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="dtype float32"):
        npz_source(str(tmp_path / "f.npz"))
    np.savez(tmp_path / "l.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"labels shape \(2,\); expected \[3\]"):
        npz_source(str(tmp_path / "l.npz"))
    np.savez(tmp_path / "c.npz", images=np.zeros((3, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="channels last"):
        npz_source(str(tmp_path / "c.npz"))
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"t\.npz: corrupt"):
        npz_source(str(tmp_path / "t.npz"))


def test_digits_keeps_17_levels():
    from sklearn.datasets import load_digits

    src = digits_source()
    ref = load_digits()
    assert len(src) == 1797 and src.shape == (8, 8, 1) and src.levels == 17
    assert np.array_equal(src.images[..., 0].astype(np.float64), ref.images)  # no rescaling
    assert np.array_equal(src.labels, ref.target)
    assert src.images.max() == 16


# ----------------------------------------------------------------------------- CIFAR python tarball


def cifar_tarball(n_train=(3, 2, 2, 1, 2), n_test=3, seed=0) -> tuple[bytes, dict]:
    """A tiny cifar-10-python.tar.gz in the real layout, and the rows/labels it holds."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    truth = {"train": [], "test": []}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, obj: dict) -> None:
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
        names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
        add("batches.meta", {b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072})
        for i, n in enumerate(n_train, 1):
            rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, size=n)]
            add(f"data_batch_{i}", {b"batch_label": b"training batch", b"data": rows, b"labels": labels})
            truth["train"] += list(zip(rows, labels, strict=True))
        rows = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
        add("test_batch", {b"batch_label": b"testing batch", b"data": rows, b"labels": labels})
        truth["test"] += list(zip(rows, labels, strict=True))
    return buf.getvalue(), truth


def row_to_hwc(row: np.ndarray) -> np.ndarray:
    """The CIFAR row layout, pixel by pixel: R plane, then G, then B, each 32 rows of 32."""
    img = np.zeros((32, 32, 3), np.uint8)
    for c in range(3):
        for y in range(32):
            for x in range(32):
                img[y, x, c] = row[c * 1024 + y * 32 + x]
    return img


def test_cifar_tarball_from_s3(s3_bucket):
    data, truth = cifar_tarball()
    uri = storage.join(s3_bucket, "cifar-10-python.tar.gz")
    storage.write_bytes(uri, data)
    src = open_source(uri)
    assert src.shape == (32, 32, 3) and src.levels == 256
    assert src.label_names[0] == "airplane" and src.label_names[9] == "truck"
    assert len(src) == 13 and int(src.test_mask.sum()) == 3
    rows = truth["train"] + truth["test"]
    for pos, (img, label) in enumerate(src):
        assert np.array_equal(img, row_to_hwc(rows[pos][0]))
        assert label == rows[pos][1]
    assert list(np.flatnonzero(src.test_mask)) == [10, 11, 12]
    assert src.fingerprint == cifar_source(uri).fingerprint


def test_truncated_cifar_tarball_is_named(tmp_path):
    data, _ = cifar_tarball()
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz: truncated or corrupt"):
        cifar_source(str(path))


def test_cifar_tarball_missing_member_and_hostile_pickle(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        evil = pickle.dumps({b"label_names": [b"x"], b"f": print})  # a global other than numpy's
        for name in ("batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(evil)
            tar.addfile(info, io.BytesIO(evil))
    (tmp_path / "evil.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"batches\.meta: not a CIFAR python batch.*not allowed"):
        cifar_source(str(tmp_path / "evil.tar.gz"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "partial.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"missing members \['batches\.meta'"):
        cifar_source(str(tmp_path / "partial.tar.gz"))


def test_fingerprint_follows_content(tmp_path):
    make_folder(tmp_path / "a", seed=3)
    make_folder(tmp_path / "b", seed=3)
    fa, fb = image_folder(str(tmp_path / "a")).fingerprint, image_folder(str(tmp_path / "b")).fingerprint
    assert fa == fb
    arr = np.asarray(Image.open(tmp_path / "b" / "dog" / "000.png")).copy()
    arr[0, 0, 0] ^= 1
    write_png(tmp_path / "b" / "dog" / "000.png", arr)
    assert image_folder(str(tmp_path / "b")).fingerprint != fa


def test_unknown_source_spec(tmp_path):
    with pytest.raises(ValueError, match="not found or not understood"):
        open_source(str(tmp_path / "nothing-here"))
