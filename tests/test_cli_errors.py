"""The command line's error path: every expected error is one line naming the field or file, exit 2;
an unexpected one keeps its traceback under a line saying it is a bug, exit 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.config import TrainConfig
from pipeline.training.checkpoint import load_checkpoint, load_latest, save_checkpoint


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def data(tmp_path):
    from pipeline.data.shard import shard_dataset

    src = tmp_path / "x.npz"
    np.savez(src, x=np.zeros((40, 8, 8, 1), np.uint8), y=np.arange(40) % 10)
    shard_dataset(str(src), str(tmp_path / "d"), shard_size=20, parallel="none")
    return str(tmp_path / "d")


def test_missing_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    code, err = _run(["sample", str(tmp_path / "nope.pt"), str(tmp_path / "o"), "--n", "4"], capsys)
    assert code == 2 and len(err) == 1 and "nope.pt" in err[0]


def test_missing_samples_folder_is_one_line_naming_it(tmp_path, data, capsys, monkeypatch):
    import pipeline.evaluation.cli as ecli

    monkeypatch.setattr(ecli, "_extractor", lambda args: None)  # no feature network needed to get there
    code, err = _run(["fid", str(tmp_path / "no-samples"), "--data", data], capsys)
    assert code == 2 and len(err) == 1 and "no-samples" in err[0], err


def test_missing_classifier_is_one_line_naming_it(tmp_path, data, capsys):
    code, err = _run(["fid", str(tmp_path / "s"), "--data", data, "--extractor", "domain",
                      "--weights", str(tmp_path / "clf")], capsys)
    assert code == 2 and len(err) == 1 and "clf" in err[0]


def test_bad_device_is_one_line(tmp_path, capsys):
    code, err = _run(["sample", str(tmp_path / "x.pt"), str(tmp_path / "o"), "--n", "4", "--device", "tpu9"],
                     capsys)
    assert code == 2 and len(err) == 1 and "--device 'tpu9'" in err[0]


@pytest.mark.parametrize("flags,field", [
    (["--loss-kwargs", '{"bogus": 1}'], "loss_kwargs"),
    (["--lr", "inf"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--batch-size", "4096"], "batch_size=4096"),
    (["--model-overrides", '{"channels": -1}'], "model_overrides"),
    (["--model-overrides", '{"nonsense": 1}'], "model_overrides"),
])
def test_bad_train_flags_fail_before_ray(flags, field, tmp_path, data, capsys, monkeypatch):
    from pipeline import raykit

    monkeypatch.setattr(raykit, "connect", lambda **k: pytest.fail("Ray started"))
    code, err = _run(["train", "--data", data, "--out", str(tmp_path / "run"), *flags], capsys)
    assert code == 2 and len(err) == 1 and field in err[0], err


def test_unexpected_errors_keep_their_traceback_under_a_bug_line(monkeypatch, tmp_path, capsys):
    import pipeline.data.shard as shard

    def boom(*a, **k):
        raise KeyError("internal")

    monkeypatch.setattr(shard, "shard_dataset", boom)
    code, err = _run(["shard", "x.npz", str(tmp_path / "o")], capsys)
    assert code == 1 and "this is a bug" in err[0] and any("Traceback" in line for line in err)


def test_a_wrapped_worker_error_is_found():
    class WrapperError(Exception):
        pass

    inner = ValueError("data=x: bad")
    outer = WrapperError("ray says")
    outer.__cause__ = inner
    assert cli.expected_error(outer) is inner
    assert cli.expected_error(TypeError("f() got an unexpected keyword argument 'zap'")) is not None
    assert cli.expected_error(TypeError("unsupported operand")) is None


# ---- garbage checkpoints, and resume falling back to the newest one that loads ------------------------


@pytest.mark.parametrize("blob,match", [(b"", "empty"), (b"garbage" * 20, "not a PyTorch checkpoint"),
                                        (b"PK\x03\x04" + b"\0" * 60, "corrupt")])
def test_garbage_checkpoints_get_a_clear_message(tmp_path, blob, match):
    p = tmp_path / "c.pt"
    p.write_bytes(blob)
    with pytest.raises(ValueError, match=match) as e:
        load_checkpoint(str(p))
    assert str(p) in str(e.value) and not str(e.value).rstrip().endswith(":")


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    from pipeline.training.loop import Trainer

    t = Trainer.from_config(TrainConfig(model_overrides={"channels": 16, "num_res_blocks": 1}))
    root = str(tmp_path)
    for step in (10, 20, 30):
        t.position.step = step
        save_checkpoint(root, t.state_dict(), keep_last=3)
    newest = tmp_path / "checkpoints" / "step-00000030.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated upload
    said: list[str] = []
    uri, state = load_latest(root, say=said.append)
    assert uri.endswith("step-00000020.pt") and state["position"]["step"] == 20
    assert len(said) == 1 and "step-00000030.pt" in said[0] and "corrupt" in said[0]
    key = next(iter(state["model"]))
    assert torch.equal(state["model"][key], t.state_dict()["model"][key])
