"""Bit-exact resume on the real path: Ray Train + the WebDataset loader, on CPU. A worker SIGKILLed
between two checkpoints is replaced, resumes from the last one, and ends with weights, EMA and
optimiser state `torch.equal` to an uninterrupted run of the same config.

What made it differ before (max |Δ| ≈ 2e-3): the resume restores the global torch RNG (which the
network's dropout draws from) and then opens a new DataLoader iterator, which drew its base seed from
that same global RNG: the uninterrupted run had drawn it at the start of the epoch, the resumed run
drew it after the restore, so every dropout mask after the resume was shifted by one draw. The
loader now seeds its DataLoader from (seed, epoch, rank) with a generator of its own."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch
from ray import cloudpickle

from pipeline.config import RunOptions, TrainConfig
from pipeline.training.checkpoint import load_checkpoint
from tests.fixtures_s3 import ray_local, s3_server  # noqa: F401

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillOnce:
    """Step hook: SIGKILL this worker at `step`, once (a marker file says it happened)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def __call__(self, trainer, x, labels) -> None:
        if trainer.position.step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def _assert_equal_states(a: dict, b: dict) -> None:
    for part in ("model",):
        for k in a[part]:
            delta = (a[part][k] - b[part][k]).abs().max()
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}: max |Δ| {delta}"
    for k in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), f"ema.{k}"
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), f"optimizer {i}.{k}"
    assert a["position"] == b["position"]


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_is_bit_exact(ray_local, tmp_path, monkeypatch):  # noqa: F811
    from pipeline.data.shard import shard_dataset
    from pipeline.training.ray_train import train

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    data = str(tmp_path / "digits")
    shard_dataset("digits", data, shard_size=400, parallel="none")
    # dropout > 0: the network draws from the global RNG, which a resume restores
    config = TrainConfig(preset="tiny-digits", model_overrides={"channels": 16, "num_res_blocks": 1,
                                                                "dropout": 0.1},
                         lr=2e-3, warmup_steps=5, batch_size=32, steps=16, seed=3)
    options = RunOptions(workers=1, report_every=4, checkpoint_every=8, keep_last=3, max_failures=1,
                         shuffle_buffer=100, progress=False)
    whole = train(config, data=data, out=str(tmp_path / "whole"), options=options)
    marker = str(tmp_path / "killed")
    cut = train(config, data=data, out=str(tmp_path / "cut"), options=options, on_step=KillOnce(12, marker))
    assert os.path.exists(marker) and whole.step == cut.step == 16
    _assert_equal_states(load_checkpoint(whole.checkpoint), load_checkpoint(cut.checkpoint))
