"""Every Ray connection goes through one reachability check with a timeout: with RAY_ADDRESS naming a
port where nothing listens, shard, train, sample and tune each exit non-zero within seconds with a
message naming RAY_ADDRESS (Ray's own client would retry for minutes, printing warnings)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline import cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from pipeline.config import TrainConfig
    from pipeline.data.shard import shard_dataset
    from pipeline.training.checkpoint import export_ema
    from pipeline.training.loop import Trainer

    root = tmp_path_factory.mktemp("addr")
    src = root / "x.npz"
    np.savez(src, x=np.zeros((64, 8, 8, 1), np.uint8), y=np.arange(64) % 10)
    shard_dataset(str(src), str(root / "d"), shard_size=16, parallel="none")
    cfg = TrainConfig(model_overrides={"channels": 16, "num_res_blocks": 1}, batch_size=8, steps=4)
    t = Trainer.from_config(cfg)
    export_ema(str(root / "ema.pt"), ema=t.ema.state_dict(), config=cfg.to_dict(), step=0)
    return {"root": root, "npz": str(src), "data": str(root / "d"), "ckpt": str(root / "ema.pt")}


@pytest.mark.parametrize("command", ["shard", "train", "sample", "tune"])
def test_an_unreachable_ray_address_fails_fast_naming_it(command, inputs, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("PIPELINE_RAY_CONNECT_TIMEOUT_S", "5")
    root = inputs["root"]
    argv = {
        "shard": ["shard", inputs["npz"], str(root / f"s-{time.time_ns()}")],
        "train": ["train", "--data", inputs["data"], "--out", str(root / f"t-{time.time_ns()}"),
                  "--batch-size", "8", "--steps", "4", "--model-overrides",
                  '{"channels": 16, "num_res_blocks": 1}'],
        "sample": ["sample", inputs["ckpt"], str(root / f"smp-{time.time_ns()}"), "--n", "4",
                   "--workers", "2",
                   "--steps", "2"],
        "tune": ["tune", "schedules", "--data", inputs["data"], "--out", str(root / f"tu-{time.time_ns()}"),
                 "--space", '{"sde": ["vp", "ve"]}', "--steps", "4", "--batch-size", "8",
                 "--report-every", "2", "--model-overrides", '{"channels": 16, "num_res_blocks": 1}'],
    }[command]
    t0 = time.monotonic()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code != 0 and time.monotonic() - t0 < 30
    assert "RAY_ADDRESS=127.0.0.1:1 is unreachable" in err, err
