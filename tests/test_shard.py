"""Sharding round trips on file:// and on a real S3 API server, idempotent reruns, and bad input."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.data import cli as data_cli
from pipeline.data.loader import make_loader
from pipeline.data.manifest import verify_manifest
from pipeline.data.shard import shard_dataset
from pipeline.data.sources import image_folder

pytest_plugins = ("tests.fixtures_s3",)  # s3_server, s3_bucket, ray_local

N_PER_CLASS = (9, 7, 8)  # 24 images in three classes


def make_folder(root, shape=(8, 8, 3), seed=0) -> dict[str, tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    written = {}
    for cls, n in zip(("ant", "bee", "cow"), N_PER_CLASS, strict=True):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:02d}.png")
            written[str(root / cls / f"{i:02d}.png")] = (arr, cls)
    return written


def read_tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """Group a tar's members by sample key, independently of WebDataset."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def check_round_trip(dest: str, src) -> dict:
    """Every source sample is in exactly one shard, bit-identical, with its label; checksums hold."""
    manifest = storage.read_json(storage.join(dest, "manifest.json"))
    seen: dict[int, str] = {}
    for entry in manifest["shards"]:
        data = storage.read_bytes(storage.join(dest, entry["name"]))
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        samples = read_tar_samples(data)
        assert len(samples) == entry["count"]
        for key, fields in samples.items():
            assert key.startswith(entry["split"] + "-")
            idx = int(fields["idx"])
            assert idx not in seen
            seen[idx] = entry["split"]
            img = np.asarray(Image.open(io.BytesIO(fields["png"])))
            assert np.array_equal(img, src.image(idx))
            assert int(fields["cls"]) == int(src.labels[idx])
    assert sorted(seen) == list(range(len(src)))
    assert manifest["counts"]["total"] == len(src)
    assert manifest["counts"]["test"] == sum(1 for s in seen.values() if s == "test")
    assert verify_manifest(dest) == []
    return manifest


def loader_images(dest: str, split: str, src, **kw) -> list[int]:
    """Indices read through make_loader; asserts each batch decodes to the source's exact pixels."""
    out = []
    for x, y, idx in make_loader(dest, split, 5, with_index=True, **kw):
        assert x.dtype == torch.float32 and x.is_contiguous()
        v = np.rint((x.numpy() + 1.0) * 255.0 / 2.0).astype(np.uint8).transpose(0, 2, 3, 1)
        ref = np.stack([src.image(i) for i in idx.tolist()])
        assert np.array_equal(v, ref)
        assert y.tolist() == [int(src.labels[i]) for i in idx.tolist()]
        out += idx.tolist()
    return out


def mtimes(folder) -> dict[str, int]:
    return {p: os.stat(os.path.join(folder, p)).st_mtime_ns for p in sorted(os.listdir(folder))}


def test_round_trip_file_and_idempotent_rerun(tmp_path):
    make_folder(tmp_path / "src")
    src = image_folder(str(tmp_path / "src"))
    dest = f"file://{tmp_path}/shards"
    report = shard_dataset(str(tmp_path / "src"), dest, shard_size=5, test_fraction=0.25, parallel="threads")
    assert report.manifest_written and not report.kept
    manifest = check_round_trip(dest, src)
    assert manifest["counts"] == {"train": 18, "test": 6, "total": 24}
    assert manifest["label_names"] == ["ant", "bee", "cow"] and manifest["levels"] == 256
    assert manifest["image"]["shape"] == [8, 8, 3] and manifest["image"]["dtype"] == "uint8"
    assert manifest["package"]["version"] and manifest["source"]["fingerprint"] == src.fingerprint
    assert [s["count"] for s in manifest["shards"] if s["split"] == "train"] == [5, 5, 5, 3]
    train = loader_images(dest, "train", src, num_workers=2)
    test = loader_images(dest, "test", src)
    assert sorted(train + test) == list(range(24))

    # A rerun with the same inputs writes nothing at all.
    folder = str(tmp_path / "shards")
    before = mtimes(folder)
    again = shard_dataset(str(tmp_path / "src"), dest, shard_size=5, test_fraction=0.25, parallel="threads")
    assert again.written == [] and not again.manifest_written
    assert mtimes(folder) == before

    # A truncated shard fails its checksum and is the only thing rewritten.
    victim = os.path.join(folder, "train-000001.tar")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    assert verify_manifest(dest) == ["train-000001.tar"]
    fixed = shard_dataset(str(tmp_path / "src"), dest, shard_size=5, test_fraction=0.25, parallel="none")
    assert fixed.written == ["train-000001.tar"] and not fixed.manifest_written
    after = mtimes(folder)
    assert {p for p in after if after[p] != before[p]} == {"train-000001.tar"}
    check_round_trip(dest, src)

    # Without a manifest (a run that died before writing it), shards are compared by content.
    os.remove(os.path.join(folder, "train-000002.tar"))
    os.remove(os.path.join(folder, "manifest.json"))
    resumed = shard_dataset(str(tmp_path / "src"), dest, shard_size=5, test_fraction=0.25, parallel="threads")
    assert resumed.written == ["train-000002.tar"] and resumed.manifest_written
    assert storage.read_json(storage.join(dest, "manifest.json")) == manifest
    assert set(os.listdir(folder)) == set(after)  # no temporary files left


@pytest.mark.integration
def test_round_trip_s3_with_ray_tasks(tmp_path, s3_bucket, ray_local):
    make_folder(tmp_path / "src", seed=1)
    src = image_folder(str(tmp_path / "src"))
    dest = storage.join(s3_bucket, "datasets", "toy")
    report = shard_dataset(str(tmp_path / "src"), dest, shard_size=4, test_fraction=0.25, parallel="ray")
    assert len(report.written) == 7 and report.manifest_written  # 18 train + 6 test in fours
    manifest = check_round_trip(dest, src)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(manifest)
    # DataLoader workers fork after the parent has used s3fs: each opens its own filesystem.
    train = loader_images(dest, "train", src, num_workers=2, shuffle_buffer=8)
    test = loader_images(dest, "test", src)
    assert sorted(train + test) == list(range(24))

    again = shard_dataset(str(tmp_path / "src"), dest, shard_size=4, test_fraction=0.25, parallel="ray")
    assert again.written == [] and not again.manifest_written
    # Overwrite one shard with a truncated copy: detected by checksum and rewritten.
    victim = storage.join(dest, "test-000001.tar")
    fs, path = storage.get_fs(victim)
    fs.pipe_file(path, storage.read_bytes(victim)[:1000])
    assert verify_manifest(dest) == ["test-000001.tar"]
    fixed = shard_dataset(str(tmp_path / "src"), dest, shard_size=4, test_fraction=0.25, parallel="ray")
    assert fixed.written == ["test-000001.tar"]
    check_round_trip(dest, src)
    assert sorted(storage.listdir(dest)) == sorted(
        ["manifest.json", *[s["name"] for s in manifest["shards"]]]
    )


def test_split_is_deterministic_and_seeded(tmp_path):
    make_folder(tmp_path / "src", seed=2)
    kw = {"shard_size": 6, "test_fraction": 0.25, "parallel": "none"}
    a = shard_dataset(str(tmp_path / "src"), str(tmp_path / "a"), seed=7, **kw).manifest
    b = shard_dataset(str(tmp_path / "src"), str(tmp_path / "b"), seed=7, **kw).manifest
    c = shard_dataset(str(tmp_path / "src"), str(tmp_path / "c"), seed=8, **kw).manifest
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]
    assert a["params"]["split"] == {"method": "random", "seed": 7, "test_fraction": 0.25}


def test_changed_parameters_replace_stale_shards(tmp_path):
    make_folder(tmp_path / "src", seed=3)
    dest = str(tmp_path / "d")
    shard_dataset(str(tmp_path / "src"), dest, shard_size=3, test_fraction=0.25, parallel="none")
    report = shard_dataset(str(tmp_path / "src"), dest, shard_size=10, test_fraction=0.25, parallel="none")
    names = [s["name"] for s in report.manifest["shards"]]
    assert names == ["train-000000.tar", "train-000001.tar", "test-000000.tar"]
    assert sorted(os.listdir(dest)) == sorted([*names, "manifest.json"])
    assert "train-000005.tar" in report.removed
    check_round_trip(dest, image_folder(str(tmp_path / "src")))


def test_corrupt_image_leaves_nothing_behind(tmp_path):
    make_folder(tmp_path / "src", seed=4)
    bad = tmp_path / "src" / "bee" / "03.png"
    bad.write_bytes(bad.read_bytes()[:40])
    dest = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"bee/03\.png.*(corrupt|unreadable)"):
        shard_dataset(str(tmp_path / "src"), dest, shard_size=5, parallel="threads")
    assert not os.path.exists(dest) or os.listdir(dest) == []
    report = shard_dataset(str(tmp_path / "src"), dest, shard_size=5, skip_bad=True, parallel="threads")
    assert report.manifest["skipped"]["count"] == 1
    assert report.manifest["skipped"]["items"][0]["item"] == str(bad)
    assert report.manifest["counts"]["total"] == 23


def test_missing_bucket_fails_before_work(s3_server):
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match=f"bucket '{bucket}' does not exist"):
        shard_dataset("digits", f"s3://{bucket}/d", shard_size=500, parallel="none")


def test_missing_credentials_fail_before_work(s3_bucket, monkeypatch):
    dest = storage.join(s3_bucket, "d")
    with monkeypatch.context() as m:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            m.delenv(k, raising=False)
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        m.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        with pytest.raises(ValueError, match=f"destination {dest}: no credentials"):
            shard_dataset("digits", dest, shard_size=500, parallel="none")
    assert storage.listdir(s3_bucket) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shard_size=0"):
        shard_dataset("digits", str(tmp_path), shard_size=0)
    with pytest.raises(ValueError, match=r"test_fraction=1\.0"):
        shard_dataset("digits", str(tmp_path), test_fraction=1.0)
    with pytest.raises(ValueError, match="memory:// is per-process"):
        shard_dataset("digits", "memory://x", parallel="ray")
    with pytest.raises(ValueError, match="parallel='fork'"):
        shard_dataset("digits", str(tmp_path), parallel="fork")
    assert os.listdir(tmp_path) == []


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_shards_digits_and_reports_skips(tmp_path, capsys):
    dest = str(tmp_path / "digits")
    assert run_cli(["shard", "digits", dest, "--shard-size", "600", "--parallel", "none"]) == 0
    m = storage.read_json(os.path.join(dest, "manifest.json"))
    assert m["counts"]["total"] == 1797 and m["levels"] == 17 and m["image"]["shape"] == [8, 8, 1]
    assert "1617 train + 180 test" in capsys.readouterr().out

    make_folder(tmp_path / "src", seed=5)
    (tmp_path / "src" / "cow" / "zz.png").write_bytes(b"\x89PNG broken")
    out = str(tmp_path / "folder")
    argv = ["shard", str(tmp_path / "src"), out, "--shard-size", "8", "--skip-bad", "--parallel", "threads"]
    assert run_cli(argv) == 0
    text = capsys.readouterr().out
    assert "skipped 1 bad images" in text and "zz.png" in text
