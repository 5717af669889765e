"""The streaming loader: scaling to [-1, 1], flips, per-epoch determinism, rank and worker splits."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from pipeline.data.loader import make_loader
from pipeline.data.shard import shard_dataset
from pipeline.data.sources import digits_source

pytest_plugins = ("tests.fixtures_s3",)  # s3_server, s3_bucket, ray_local

SHARD = 200  # digits: 1617 train samples in 9 shards, 180 test in 1


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("digits"))
    report = shard_dataset("digits", dest, shard_size=SHARD, test_fraction=0.1, seed=0, parallel="threads")
    src = digits_source()
    train = sorted(
        i for s in report.manifest["shards"] if s["split"] == "train" for i in _indices(dest, s["name"])
    )
    return dest, src, train


def _indices(dest: str, name: str) -> list[int]:
    import tarfile

    with tarfile.open(f"{dest}/{name}") as tar:
        return [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".idx")]


def collect(loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    xs, ys, idx = [], [], []
    for x, y, i in loader:
        xs.append(x)
        ys.append(y)
        idx += i.tolist()
    return torch.cat(xs), torch.cat(ys), idx


def test_scaling_labels_and_coverage(digits):
    dest, src, train = digits
    x, y, idx = collect(make_loader(dest, "train", 64, with_index=True))
    assert x.dtype == torch.float32 and x.shape == (1617, 1, 8, 8) and y.dtype == torch.long
    v = src.images[idx].astype(np.float64).transpose(0, 3, 1, 2)
    # x = 2·v/(L−1) − 1 with L = 17 grey levels (digits values 0..16)
    np.testing.assert_allclose(x.double().numpy(), 2.0 * v / 16.0 - 1.0, rtol=0, atol=1e-6)
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.tolist() == src.labels[idx].tolist()
    assert sorted(idx) == train


def test_flip_mirrors_about_half(digits):
    dest, src, _ = digits
    x, _, idx = collect(make_loader(dest, "train", 64, flip=True, with_index=True, seed=3))
    ref = torch.from_numpy(src.images[idx].transpose(0, 3, 1, 2).astype(np.float32)) * (2 / 16) - 1
    same = (x == ref).flatten(1).all(1)
    mirrored = (x == ref.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    asym = ~(ref == ref.flip(-1)).flatten(1).all(1)
    frac = mirrored[asym].double().mean().item()
    assert 0.4 < frac < 0.6  # Binomial(≈1600, 1/2): ±8 standard deviations


def order(dest, **kw) -> list[int]:
    return collect(make_loader(dest, "train", 50, with_index=True, **kw))[2]


def test_per_epoch_seed_is_reproducible(digits):
    dest, _, train = digits
    a, b = order(dest, seed=1, epoch=4), order(dest, seed=1, epoch=4)
    assert a == b
    c = order(dest, seed=1, epoch=5)
    assert c != a and sorted(c) == sorted(a) == train
    assert order(dest, seed=2, epoch=4) != a
    assert a != train and order(dest, shuffle_buffer=0) != a  # shuffled, unlike buffer 0
    w1, w2 = order(dest, seed=1, epoch=4, num_workers=2), order(dest, seed=1, epoch=4, num_workers=2)
    assert w1 == w2 and sorted(w1) == train
    loader = make_loader(dest, "train", 50, with_index=True, seed=1)
    loader.set_epoch(5)
    assert collect(loader)[2] == c


@pytest.mark.parametrize("num_workers,drop_last", [(0, False), (2, False), (2, True)])
def test_len_matches_batches(digits, num_workers, drop_last):
    dest, _, _ = digits
    loader = make_loader(dest, "train", 64, num_workers=num_workers, drop_last=drop_last)
    sizes = [len(y) for _, y in loader]
    assert len(sizes) == len(loader)
    if drop_last:
        assert set(sizes) == {64}


def test_explicit_ranks_are_disjoint_and_cover(digits, monkeypatch):
    dest, _, train = digits
    parts = [order(dest, rank=r, world_size=3, seed=5) for r in range(3)]
    assert sum(len(p) for p in parts) == len(train)
    assert sorted(i for p in parts for i in p) == train
    # Without explicit values the ranks come from RANK / WORLD_SIZE, as under torch.distributed.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert order(dest, seed=5) == parts[1]


def test_batches_per_epoch_keeps_ranks_in_step(digits):
    dest, _, _ = digits
    for r in range(2):
        loader = make_loader(dest, "train", 32, rank=r, world_size=2, batches_per_epoch=30)
        assert len(loader) == 30 and sum(1 for _ in loader) == 30  # > one pass for either rank


def test_bad_loader_arguments(digits):
    dest, _, _ = digits
    with pytest.raises(ValueError, match="fewer than world_size=2"):
        make_loader(dest, "test", 8, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"split='valid'.*available: \['test', 'train'\]"):
        make_loader(dest, "valid", 8)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_loader(dest, "train", 0)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        make_loader(dest, "train", 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"manifest .*not found"):
        make_loader(dest + "/nowhere", "train", 8)


def test_truncated_or_missing_shard_is_named(digits, tmp_path):
    import shutil

    dest = str(tmp_path / "copy")
    shutil.copytree(digits[0], dest)
    victim = f"{dest}/train-000003.tar"
    with open(victim, "r+b") as f:
        f.truncate(5000)
    with pytest.raises(ValueError, match=r"shard .*train-000003\.tar: truncated or corrupt"):
        for _ in make_loader(dest, "train", 64, shuffle_buffer=0):
            pass
    os.remove(victim)
    with pytest.raises(ValueError, match=r"shard .*train-000003\.tar: missing"):
        for _ in make_loader(dest, "train", 64, shuffle_buffer=0):
            pass


def _rank_indices(dest: str, rank: int, world_size: int) -> list[int]:
    from pipeline.data.loader import make_loader

    loader = make_loader(
        dest, "train", 64, rank=rank, world_size=world_size, seed=9, epoch=2, with_index=True
    )
    return [i for _, _, idx in loader for i in idx.tolist()]


@pytest.mark.integration
def test_two_ray_workers_get_disjoint_covering_parts(digits, ray_local):
    dest, _, train = digits
    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test module is not installed
    task = ray.remote(num_cpus=1)(_rank_indices)
    a, b = ray.get([task.remote(dest, 0, 2), task.remote(dest, 1, 2)])
    assert a and b
    assert not set(a) & set(b)
    assert sorted(a + b) == train
    assert len(a) + len(b) == len(train)  # and nothing twice within a rank
