"""Ray Train on a real local cluster (2 CPUs, gloo) with checkpoints on a real S3 server (moto):
two workers train on disjoint shards; a killed worker is replaced and the run resumes from the last
checkpoint; bad input fails on the driver before any worker starts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch
from ray import cloudpickle
from ray.train import UserCallback

from pipeline import storage
from pipeline.cli import main as cli_main
from pipeline.config import RunOptions, TrainConfig
from pipeline.training.checkpoint import list_checkpoints, load_checkpoint, load_model
from tests.fixtures_s3 import ray_local, s3_server  # noqa: F401

# The step hook below travels to the workers by value (Ray's cloudpickle), not as an import of tests/.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHARD_SIZE = 300  # 1,617 training digits → 6 shards, 3 per rank


def _digest(img: torch.Tensor) -> str:
    return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()[:20]


class StepTrace:
    """Runs in every worker after each step: appends (pid, step, epoch, image digests) to a per-rank
    local log, and, once (guarded by a marker object on S3), kills rank 1's process at `kill_at`."""

    def __init__(self, folder: str, kill_at: int | None = None, marker: str | None = None) -> None:
        self.folder, self.kill_at, self.marker = folder, kill_at, marker

    def __call__(self, trainer, x: torch.Tensor, labels) -> None:
        rank, step = trainer.rank, trainer.position.step
        with open(os.path.join(self.folder, f"rank{rank}.log"), "a") as f:
            f.write(f"{os.getpid()} {step} {trainer.position.epoch} {','.join(_digest(img) for img in x)}\n")
        if self.kill_at == step and rank == 1 and not storage.exists(self.marker):
            storage.write_bytes(self.marker, b"killed once")
            os.kill(os.getpid(), signal.SIGKILL)


def _read_log(path) -> list[tuple[int, int, int, list[str]]]:
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        pid, step, epoch, digests = line.split(" ")
        rows.append((int(pid), int(step), int(epoch), digests.split(",")))
    return rows


@pytest.fixture(scope="module")
def bucket(s3_server):  # noqa: F811
    name = "ray-train-test"
    fs, _ = storage.get_fs(f"s3://{name}")
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def digits_shards(bucket):
    from pipeline.data.shard import shard_dataset

    uri = f"{bucket}/digits"
    shard_dataset("digits", uri, shard_size=SHARD_SIZE, parallel="none")
    return uri


@pytest.fixture(scope="module")
def duplicate_digests():
    """Digests of images that occur more than once among the digits (those may legitimately recur)."""
    from sklearn.datasets import load_digits

    v = torch.from_numpy(load_digits().images.astype(np.uint8)).unsqueeze(1).to(torch.float32)
    x = v * (2.0 / 16) - 1.0  # the loader's scaling, bit for bit
    counts = defaultdict(int)
    for img in x:
        counts[_digest(img)] += 1
    return {d for d, c in counts.items() if c > 1}


@pytest.fixture
def fast_reports(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _config(**kw) -> TrainConfig:
    base = dict(preset="tiny-digits", model_overrides={"channels": 16, "num_res_blocks": 1}, loss="edm",
                loss_kwargs={"sigma_data": 0.5}, lr=4e-3, warmup_steps=10, batch_size=32,
                ema_halflife_kimg=1.0, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_on_s3_survive_a_killed_worker(ray_local, bucket, digits_shards, duplicate_digests,  # noqa: F811
                                                   fast_reports, tmp_path):
    """One run (two Ray starts are the expensive part here) checks all of: the loss falls, ranks read
    disjoint data, checkpoints land on S3, and a worker killed at step 17 is replaced, the run going on
    from the step-10 checkpoint with the same data to the final step."""
    from pipeline.training.ray_train import train

    out = f"{bucket}/runs/two-workers"
    marker = f"{bucket}/markers/two-workers-killed"
    steps, every, kill_at = 40, 10, 17  # 40 steps of 16 per rank stay within each rank's first epoch
    options = RunOptions(workers=2, report_every=5, checkpoint_every=every, keep_last=2, max_failures=1,
                         progress=False)
    res = train(_config(steps=steps), data=digits_shards, out=out, options=options,
                on_step=StepTrace(str(tmp_path), kill_at=kill_at, marker=marker))

    assert storage.exists(marker)  # the worker really was killed
    assert res.step == steps and res.metrics["step"] == steps
    # One history entry per report, none repeated by the restart; the loss falls.
    assert [h["step"] for h in res.history] == list(range(5, steps + 1, 5))
    losses = [h["loss"] for h in res.history]
    assert (losses[-1] + losses[-2]) / 2 < 0.8 * (losses[0] + losses[1]) / 2, losses

    # Checkpoints (keep-last-2), the EMA export and Ray's run storage are objects on the S3 server.
    assert [s for s, _ in list_checkpoints(out)] == [30, 40]
    assert storage.listdir(f"{out}/checkpoints") == ["step-00000030.pt", "step-00000040.pt"]
    assert storage.listdir(f"{out}/ray")
    state = load_checkpoint(res.checkpoint)
    assert state["position"]["step"] == steps and len(state["ranks"]) == 2
    net = load_model(res.ema).net.net
    for p, q in zip(net.state_dict().values(), state["ema"]["module"].values(), strict=True):
        assert torch.equal(p, q)

    seen = {}
    for rank in (0, 1):
        rows = _read_log(tmp_path / f"rank{rank}.log")
        assert all(len(d) == 16 for *_, d in rows) and all(epoch == 0 for _, _, epoch, _ in rows)
        pids = list(dict.fromkeys(pid for pid, *_ in rows))
        assert len(pids) == 2, f"rank {rank}: expected one restart, saw processes {pids}"
        first = [(s, d) for pid, s, _, d in rows if pid == pids[0]]
        second = [(s, d) for pid, s, _, d in rows if pid == pids[1]]
        assert [s for s, _ in first] == list(range(1, kill_at + 1))
        # The new workers start right after the last checkpoint (step 10) and stop at the final step:
        # the work redone, steps 11..17, is less than one checkpoint interval.
        assert [s for s, _ in second] == list(range(every + 1, steps + 1))
        # Data position restored: the redone steps see exactly the batches they saw the first time.
        assert [d for s, d in second if s <= kill_at] == [d for s, d in first if s > every]
        seen[rank] = {d for _, ds in first + second for d in ds}
    # Each rank reads its own shards: within the epoch no image is seen by both ranks (bar images
    # that occur twice in the data).
    assert len(seen[0]) >= 16 * 30 and len(seen[1]) >= 16 * 30
    assert not (seen[0] & seen[1]) - duplicate_digests


@pytest.mark.integration
@pytest.mark.parametrize("case, match", [
    ("preset", "preset must be one of"),
    ("workers", "workers must be an integer >= 1"),
    ("batch", "divisible by workers"),
    ("no_manifest", "manifest .* not found"),
    ("shape", r"images are 1×8×8"),
    ("unwritable", "bucket 'no-such-bucket-here' does not exist"),
    ("gpus", "needs 2 GPUs but the Ray cluster has 0"),
    ("cpus", "needs 8 CPUs but the Ray cluster has 2"),
    ("existing", "already holds checkpoints"),
])
def test_bad_input_fails_before_any_worker_starts(ray_local, bucket, digits_shards, case, match):  # noqa: F811
    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.training.ray_train import train

    out = f"{bucket}/runs/bad-{case}"
    kw = dict(data=digits_shards, out=out)
    opts = dict(workers=2, progress=False)
    config = _config(steps=10)
    if case == "preset":
        config = config.replace(preset="no-such-preset")
    elif case == "workers":
        opts["workers"] = 0
    elif case == "batch":
        config = config.replace(batch_size=33)
    elif case == "no_manifest":
        kw["data"] = f"{bucket}/no-dataset-here"
    elif case == "shape":
        config = config.replace(preset="small-32", model_overrides={})
    elif case == "unwritable":
        kw["out"] = out = "s3://no-such-bucket-here/run"
    elif case == "gpus":
        opts["gpus_per_worker"] = 1
    elif case == "cpus":
        opts["cpus_per_worker"] = 4
    elif case == "existing":
        save_checkpoint(out, {"position": {"step": 5}})
    before = storage.listdir(out) if case != "unwritable" else []
    with pytest.raises(ValueError, match=match):
        train(config, **kw, options=RunOptions(**opts))
    if case != "unwritable":
        assert storage.listdir(out) == before  # no Ray run folder, nothing half-written


def test_cli_reports_bad_input_in_one_line(capsys, tmp_path):
    rc = cli_main(["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"),
                   "--preset", "no-such-preset", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("diffusion-pipeline train: error: preset must be one of") and err.count("\n") == 1



class ReportLog(UserCallback):
    """A Ray Train callback (it runs in the controller) that appends every report's metrics to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0]) + "\n")


@pytest.mark.integration
def test_resuming_a_finished_run_reports_its_last_metrics(ray_local, bucket, digits_shards,  # noqa: F811
                                                          tmp_path):
    """A run stopped after its final checkpoint (a Tune search interrupted then) and resumed has no step
    left to run; it still reports its last metrics, so that a Tune trial ends with its metric (Tune's
    strict metric check) rather than an empty result."""
    from pipeline.training.ray_train import train

    out, steps = f"{bucket}/runs/finished-then-resumed", 10
    options = RunOptions(workers=1, report_every=5, checkpoint_every=10, progress=False)
    first = train(_config(steps=steps), data=digits_shards, out=out, options=options)
    log = tmp_path / "reports.jsonl"
    again = train(_config(steps=steps), data=digits_shards, out=out,
                  options=dataclasses.replace(options, resume=True), callbacks=[ReportLog(str(log))])
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(reports) == 1 and reports[0]["step"] == steps
    assert reports[0]["loss"] == first.metrics["loss"]
    assert again.step == steps and [h["step"] for h in again.history] == [5, 10]
