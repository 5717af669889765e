"""Checkpoints: round trip of plain state_dicts, weights_only loading, keep-last-k, EMA export, and
crashes during a write (an I/O error raised mid-write, and the writer process killed mid-write)."""

import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.models import EMA, build_unet
from pipeline.training.checkpoint import (
    checkpoint_uri,
    export_ema,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from tests.fixtures_s3 import s3_bucket, s3_server  # noqa: F401


def _state(step: int, width: int = 64) -> dict:
    """A real (small) training state: weights, Adam moments after one step, position, RNG, config."""
    torch.manual_seed(step)
    net = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, width)).square().mean().backward()
    opt.step()
    return {"model": net.state_dict(), "optimizer": opt.state_dict(),
            "position": {"step": step, "epoch": 0, "batch": step, "skipped_steps": 0},
            "rng": {"torch": torch.get_rng_state()}, "config": {"preset": "x", "adam_betas": [0.9, 0.999]}}


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_round_trip_and_keep_last(tmp_path):
    root = f"file://{tmp_path}/run"
    states = {s: _state(s) for s in (10, 20, 30, 40)}
    for s, st in states.items():
        assert save_checkpoint(root, st, keep_last=2) == checkpoint_uri(root, s)
    assert [s for s, _ in list_checkpoints(root)] == [30, 40]
    assert latest_checkpoint(root) == checkpoint_uri(root, 40)
    _assert_same(states[40], load_checkpoint(latest_checkpoint(root)))
    _assert_same(states[30], load_checkpoint(checkpoint_uri(root, 30)))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-00000030.pt", "step-00000040.pt"]


def test_empty_root_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path / "nothing")) is None
    assert list_checkpoints(str(tmp_path / "nothing")) == []


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_load_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = str(tmp_path / "evil.pt")
    torch.save({"model": {}, "payload": _RunsCode()}, uri)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(uri)
    assert not (tmp_path / "pwned.txt").exists()


def _size(uri: str) -> int:
    return len(storage.read_bytes(uri))


def test_io_error_during_write_keeps_previous_checkpoint(tmp_path):
    root = str(tmp_path / "run")
    first = _state(1, width=256)
    save_checkpoint(root, first)
    limit = _size(checkpoint_uri(root, 1)) // 2
    # A real mid-write failure: the file-size limit makes write(2) fail with EFBIG once `limit` bytes
    # of the new checkpoint are on disk (SIGXFSZ ignored, as CPython does, so Python raises instead).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises((OSError, RuntimeError)):
            save_checkpoint(root, _state(2, width=256))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert [s for s, _ in list_checkpoints(root)] == [1]
    assert not storage.exists(checkpoint_uri(root, 2))
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["step-00000001.pt"]  # no temporary left
    _assert_same(first, load_checkpoint(latest_checkpoint(root)))


def test_writer_killed_during_write_keeps_previous_checkpoint(tmp_path):
    root = str(tmp_path / "run")
    first = _state(1, width=256)
    save_checkpoint(root, first)
    limit = _size(checkpoint_uri(root, 1)) // 2
    # A child process re-saves the state as step 2 and is killed by SIGXFSZ half-way through the file.
    code = textwrap.dedent(f"""
        import resource, signal
        from pipeline.training.checkpoint import load_checkpoint, save_checkpoint
        state = load_checkpoint({checkpoint_uri(root, 1)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # CPython ignores it by default
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        save_checkpoint({root!r}, state, step=2)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    names = os.listdir(tmp_path / "run" / "checkpoints")
    assert any(".tmp-" in n for n in names), names  # it did die mid-write: its temporary is there
    assert [s for s, _ in list_checkpoints(root)] == [1]
    assert not storage.exists(checkpoint_uri(root, 2))
    _assert_same(first, load_checkpoint(latest_checkpoint(root)))
    # The next successful save clears what the dead writer left behind.
    save_checkpoint(root, _state(3))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-00000001.pt", "step-00000003.pt"]


def test_ema_export_rebuilds_the_averaged_network(tmp_path):
    config = TrainConfig(preset="tiny-digits")
    torch.manual_seed(0)
    net = build_unet(config.preset)
    ema = EMA(net, halflife_kimg=0.01, rampup_ratio=None)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    ema.update(net, batch_size=4)  # β = 0.5^(4/10): the average lies strictly between old and new
    uri = export_ema(str(tmp_path / "ema-final.pt"), ema=ema.state_dict(), config=config.to_dict(), step=7,
                     network=net.config)
    payload = load_checkpoint(uri)
    assert payload["step"] == 7 and payload["config"] == config.to_dict()
    model = load_model(uri)
    rebuilt = model.net.net  # the U-Net inside the autocast wrapper
    assert not rebuilt.training and model.step == 7 and model.weights == "ema"
    for (name, p), q in zip(rebuilt.state_dict().items(), ema.module.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    diffs = [not torch.equal(p, q) for p, q in zip(rebuilt.parameters(), net.parameters(), strict=True)]
    assert any(diffs)  # the export holds the average, not the live weights


def test_round_trip_on_s3(s3_bucket):  # noqa: F811
    root = f"{s3_bucket}/runs/r1"
    first, second = _state(5), _state(6)
    save_checkpoint(root, first, keep_last=1)
    save_checkpoint(root, second, keep_last=1)
    assert list_checkpoints(root) == [(6, f"{root}/checkpoints/step-00000006.pt")]
    assert storage.listdir(f"{root}/checkpoints") == ["step-00000006.pt"]
    _assert_same(second, load_checkpoint(latest_checkpoint(root)))
