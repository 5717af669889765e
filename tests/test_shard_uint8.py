"""uint8 shards: the same samples as PNG, bit for bit, through the same loader; a shard whose array
disagrees with the manifest fails with its name and key, before any batch."""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import pytest
import torch

from pipeline.data import manifest as mf
from pipeline.data.loader import make_loader
from pipeline.data.shard import shard_dataset
from pipeline.data.sources import digits_source

pytest_plugins = ("tests.fixtures_s3",)

SHARD = 300


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("u8")
    png, u8 = str(root / "png"), str(root / "u8")
    kw = dict(shard_size=SHARD, test_fraction=0.1, seed=0, parallel="none")
    shard_dataset("digits", png, **kw)
    rep = shard_dataset("digits", u8, encoding="uint8", **kw)
    return png, u8, rep


def _arrays(path: str) -> dict[str, np.ndarray]:
    with tarfile.open(path) as tar:
        return {m.name.split(".", 1)[1]: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar}


def test_uint8_shards_round_trip_bit_exactly(pair):
    _, u8, rep = pair
    m = rep.manifest
    assert m["image"]["encoding"] == "uint8" and m["params"]["encoding"] == "uint8"
    assert m["fields"] == mf.FIELDS_UINT8
    src = digits_source()
    seen = []
    for s in m["shards"]:
        a = _arrays(f"{u8}/{s['name']}")
        assert a["images.npy"].dtype == np.uint8 and a["images.npy"].shape == (s["count"], 8, 8, 1)
        np.testing.assert_array_equal(a["images.npy"], src.images[a["idx.npy"]])  # raw pixels, exact
        np.testing.assert_array_equal(a["labels.npy"], src.labels[a["idx.npy"]])
        seen += a["idx.npy"].tolist()
    assert sorted(seen) == list(range(len(src)))
    assert mf.verify_manifest(u8) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_same_batches_as_png(pair, workers):
    png, u8, _ = pair
    kw = dict(shuffle_buffer=100, seed=3, epoch=1, flip=True, with_index=True, num_workers=workers)
    a = list(make_loader(png, "train", 64, **kw))
    b = list(make_loader(u8, "train", 64, **kw))
    assert len(a) == len(b) > 0
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_rerun_keeps_uint8_shards_and_png_rerun_rewrites(pair, tmp_path):
    _, u8, _ = pair
    kw = dict(shard_size=SHARD, test_fraction=0.1, seed=0, parallel="none")
    again = shard_dataset("digits", u8, encoding="uint8", **kw)
    assert again.written == [] and not again.manifest_written
    dest = str(tmp_path / "switch")
    shard_dataset("digits", dest, encoding="uint8", **kw)
    to_png = shard_dataset("digits", dest, **kw)  # another encoding is another plan
    assert to_png.kept == [] and to_png.manifest["image"]["encoding"] == "png"


def _rewrite_images(path: str, images: np.ndarray) -> None:
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name.endswith(".images.npy"):
                buf = io.BytesIO()
                np.save(buf, images)
                data = buf.getvalue()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_mismatch_with_manifest_names_shard_and_key(pair, tmp_path, bad):
    _, u8, rep = pair
    dest = tmp_path / "bad"
    shutil.copytree(u8, dest)
    name = rep.manifest["shards"][1]["name"]
    imgs = _arrays(str(dest / name))["images.npy"]
    _rewrite_images(str(dest / name), imgs[:, :, :7] if bad == "shape" else imgs.astype(np.int16))
    with pytest.raises(ValueError, match=rf"shard .*{name}, key train-\d{{8}}: images array is"):
        make_loader(str(dest), "train", 64)  # at construction: before training starts
    with pytest.raises(ValueError, match="encoding='jpeg'"):
        shard_dataset("digits", str(tmp_path / "x"), encoding="jpeg")


def test_uint8_over_s3(s3_bucket, pair):
    png, _, _ = pair
    dest = f"{s3_bucket}/u8"
    shard_dataset("digits", dest, shard_size=SHARD, test_fraction=0.1, seed=0, parallel="threads",
                  encoding="uint8")
    a = list(make_loader(png, "test", 50, seed=1))
    b = list(make_loader(dest, "test", 50, seed=1))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
