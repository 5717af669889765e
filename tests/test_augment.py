"""Augmentation is a property of the data: digits are chiral, so flips are off by default and refused
on them; a default training run on digits never shows the network a mirrored image."""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest
import torch
from ray import cloudpickle

from pipeline import storage
from pipeline.config import RunOptions, TrainConfig
from pipeline.data.augment import MIRROR_KEY, check_xflip
from tests.fixtures_s3 import ray_local, s3_server  # noqa: F401

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}


def _digest(img: torch.Tensor) -> str:
    return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()[:20]


def _digests(x: torch.Tensor) -> set[str]:
    return {_digest(img) for img in x}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from pipeline.data.shard import shard_dataset

    uri = str(tmp_path_factory.mktemp("aug") / "digits")
    shard_dataset("digits", uri, shard_size=400, parallel="none")
    return uri


@pytest.fixture(scope="module")
def originals_and_mirrors():
    """Digests of every digit as the loader scales it, and of the mirrored digits that are not
    themselves digits of the set (the ones a flip would give away)."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images.astype(np.uint8)).unsqueeze(1).float() * (2.0 / 16) - 1.0
    originals = _digests(x)
    mirrors = _digests(x.flip(-1)) - originals
    return originals, mirrors


class BatchTrace:
    """Step hook in the Ray worker: appends the digest of every image the network was given."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, trainer, x: torch.Tensor, labels) -> None:
        with open(self.path, "a") as f:
            f.write(",".join(_digest(img) for img in x.cpu()) + "\n")


def test_digits_manifest_says_mirroring_changes_the_class(digits):
    from pipeline.data.manifest import read_manifest

    m = read_manifest(digits)
    assert m[MIRROR_KEY] is False
    with pytest.raises(ValueError, match=r"xflip=True .*digits"):
        check_xflip(m, digits)
    check_xflip({**m, MIRROR_KEY: None}, digits)  # unknown: the user decides
    assert TrainConfig().xflip is False and RunOptions() is not None


def test_flips_on_digits_fail_before_ray_starts(digits, tmp_path):
    import ray

    from pipeline.training.ray_train import train

    if ray.is_initialized():
        pytest.skip("another module left Ray running")
    config = TrainConfig(preset="tiny-digits", model_overrides=TINY, steps=5, batch_size=16, xflip=True)
    with pytest.raises(ValueError, match=r"xflip=True \(--xflip\) on data=.*sklearn-digits.*mirroring"):
        train(config, data=digits, out=str(tmp_path / "run"), options=RunOptions(progress=False))
    assert not ray.is_initialized()
    assert not storage.exists(str(tmp_path / "run" / "checkpoints"))


def test_the_instrument_sees_flips_when_they_are_on(digits, originals_and_mirrors):
    """The control: the same digests catch mirrored digits when the loader flips (so the default run's
    check below can fail)."""
    from pipeline.data.loader import make_loader

    originals, mirrors = originals_and_mirrors
    seen = set()
    for x, _ in make_loader(digits, "train", 64, shuffle_buffer=0, flip=True):
        seen |= _digests(x)
    assert len(seen & mirrors) > 100 and len(seen - originals) > 100


@pytest.mark.integration
@pytest.mark.slow
def test_default_conditional_training_on_digits_never_sees_a_mirrored_digit(
        ray_local, digits, originals_and_mirrors, tmp_path):  # noqa: F811
    from pipeline.recipes import train_recipe
    from pipeline.training.ray_train import train

    originals, mirrors = originals_and_mirrors
    config = train_recipe("tiny-digits", steps=200, batch_size=32).replace(model_overrides=TINY)
    assert config.xflip is False and config.label_dropout > 0  # the recipe's defaults, conditional
    trace = str(tmp_path / "batches.log")
    res = train(config, data=digits, out=str(tmp_path / "run"),
                options=RunOptions(report_every=50, checkpoint_every=200, progress=False),
                on_step=BatchTrace(trace))
    assert res.step == 200
    with open(trace) as f:
        seen = {d for line in f.read().split() for d in line.split(",")}
    assert len(seen) > 1000  # most of the 1,617 training digits went through the network
    assert not (seen & mirrors) and seen <= originals
    assert os.path.exists(trace)
