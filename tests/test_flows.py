"""The Prefect flows end to end: real Prefect (test harness), local Ray, and the S3 API server."""

from __future__ import annotations

import os

import pytest

# Retry backoff of 0.2 s, 0.4 s, ... instead of 2 s, 4 s, ...: read when flows.tasks is imported.
os.environ.setdefault("PIPELINE_RETRY_BASE_S", "0.2")

from pipeline import storage

pytest_plugins = ("tests.fixtures_s3",)
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_runs(flow_run_id=None, name_prefix: str | None = None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])) if flow_run_id else None
        runs = client.read_task_runs(flow_run_filter=flt, limit=200)
    runs = [r for r in runs if name_prefix is None or r.name.startswith(name_prefix)]
    return sorted(runs, key=lambda r: r.expected_start_time)


def _logs(flow_run_id, expect: str, timeout_s: float = 30.0) -> str:
    """The flow run's logs once `expect` shows up in them (Prefect ships logs in the background)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        text = "\n".join(entry.message for entry in logs)
        if expect in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.mark.slow
def test_end_to_end_on_s3_and_cached_resharding(harness, s3_bucket, ray_local):
    from flows.pipeline import diffusion_pipeline

    root = f"{s3_bucket}/run"
    kwargs = dict(root=root,
                  train={"steps": 12, "batch_size": 32, "checkpoint_every": 6, "phema_every": 6},
                  evaluate={"n_samples": 40, "sample_steps": 6, "likelihood_samples": 8},
                  sweep={"weights": [0.0, 2.0], "samples": 20, "steps": 4, "ema_sigma_rels": [0.05, 0.12]})
    state = diffusion_pipeline(**kwargs, return_state=True)
    assert state.is_completed(), state
    summary = state.result()

    for rel in ("data/manifest.json", "train/ema-final.pt", "train/checkpoints/step-00000012.pt",
                "train/history.json", "classifier/classifier.json", "samples/manifest.json",
                "samples/grid.png", "eval/eval-domain-classifier.json", "eval/likelihood.json",
                "tune/report.md", "tune/fid_vs_w.png", "report.md", "summary.json"):
        assert storage.exists(storage.join(root, rel)), rel
    assert storage.listdir(storage.join(root, "data"))  # shards landed in the bucket
    assert summary["train"]["step"] == 12
    assert summary["evaluate"]["samples"]["n"] == 40
    fid = summary["evaluate"]["fid"]
    assert fid["fid"] > fid["floor"]["fid"] > 0  # a 12-step model is worse than real-vs-real
    like = summary["evaluate"]["likelihood"]
    # The ELBO is a bound: not better than the ODE likelihood by more than Monte-Carlo error.
    assert like["bpd_elbo"] + 4 * like["bpd_elbo_stderr"] + 4 * like["bpd_ode_stderr"] >= like["bpd_ode"]
    tune = summary["tune"]
    assert sorted(r["w"] for r in tune["rows"]) == [0.0, 2.0] and tune["complete"]
    ema = summary["ema"]  # the optional post-hoc EMA search
    assert ema["complete"] and ema["best"]["sigma_rel"] in (0.05, 0.12)
    assert tune["best"]["w"] in (0.0, 2.0)

    _assert_image_artifacts(state.state_details.flow_run_id, root)

    # The second run answers sharding from Prefect's cache (and training from its finished checkpoint).
    state2 = diffusion_pipeline(**kwargs, return_state=True)
    assert state2.is_completed()
    shard_runs = _task_runs(name_prefix="shard")
    assert [r.state.name for r in shard_runs[-2:]] == ["Completed", "Cached"]
    assert state2.result()["train"]["skipped"] is True


def _artifacts(flow_run_id) -> list:
    """Every artifact of the flow run and of its subflows' and tasks' runs, read through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = [flow_run_id] + [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))]
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs)), limit=200)
        # Artifacts created by tasks of subflows (tasks whose parent is the subflow run) as well.
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs)),
                                          limit=200)
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterTaskRunId

        arts += client.read_artifacts(artifact_filter=ArtifactFilter(
            task_run_id=ArtifactFilterTaskRunId(any_=[t.id for t in task_runs])), limit=200)
    return list({a.id: a for a in arts}.values())


def _assert_image_artifacts(flow_run_id, root) -> None:
    """Every picture the run made is a markdown artifact whose image is an embedded PNG that decodes,
    small enough for the page, the size of the full-size object it links to."""
    import base64
    import io
    import re

    from PIL import Image

    arts = _artifacts(flow_run_id)
    by_key = {a.key: a for a in arts if a.key}
    images = {}
    for a in arts:
        if a.type != "markdown" or not isinstance(a.data, str):
            continue
        for alt, b64 in re.findall(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", a.data):
            png = base64.b64decode(b64)
            assert len(png) <= 200_000, (a.key, alt, len(png))
            img = Image.open(io.BytesIO(png))
            img.load()  # decodes, or raises
            link = re.search(r"Full size[^`]*`([^`]+)`", a.data.split(b64, 1)[1])
            assert link, (a.key, alt)
            full = Image.open(io.BytesIO(storage.read_bytes(link.group(1))))
            assert img.size == full.size, (a.key, alt, img.size, full.size)
            images[(a.key, alt)] = img.size
    keys = {k for k, _ in images}
    for key in ("training", "samples", "fid", "guidance-sweep", "ema-search", "pipeline-report"):
        assert key in keys, (key, sorted(keys))
    assert "training-progress" in by_key and by_key["training-progress"].data == 100.0
    assert "training-live" in by_key  # the live metrics table at the last report
    import re as _re

    bad = [a.key for a in arts if a.type == "markdown" and _re.search(r"!\[[^\]]*\]\(file://", a.data or "")]
    assert not bad, bad


def test_transient_storage_error_is_retried(harness, tmp_path, monkeypatch):
    from flows.pipeline import shard_flow

    real = storage.write_json
    calls = {"n": 0}

    def flaky_write_json(uri, obj):
        if uri.endswith("manifest.json"):
            calls["n"] += 1
            if calls["n"] == 1:
                raise ConnectionResetError(f"injected: connection reset while writing {uri}")
        return real(uri, obj)

    monkeypatch.setattr(storage, "write_json", flaky_write_json)
    state = shard_flow(source="digits", data=str(tmp_path / "data"), return_state=True)
    assert state.is_completed()
    assert calls["n"] == 2  # failed once, retried once
    run = _task_runs(state.state_details.flow_run_id, "shard")[-1]
    assert run.run_count == 2 and run.state.name == "Completed"
    assert storage.exists(str(tmp_path / "data" / "manifest.json"))


def test_permanent_failure_fails_the_flow_with_the_error_in_its_logs(harness, tmp_path):
    from flows.pipeline import shard_flow

    missing = str(tmp_path / "no-such-folder")
    state = shard_flow(source=missing, data=str(tmp_path / "data"), return_state=True)
    assert state.is_failed()
    run = _task_runs(state.state_details.flow_run_id, "shard")[-1]
    assert run.run_count == 1  # a ValueError is not retried
    assert "no-such-folder" in _logs(state.state_details.flow_run_id, "no-such-folder")
    assert not storage.exists(str(tmp_path / "data" / "manifest.json"))


def test_inverse_flow_shows_progress_and_its_picture(harness, tmp_path):
    """The inverse-problem flow on a small checkpoint: a progress artifact that reaches 100% (updated at
    most once per whole percent) over every sampler call, the markdown artifact with its embedded grid,
    and `options` reaching the task (smc's particles, the batch)."""
    import torch

    from flows.extras import inverse_flow
    from pipeline.config import TrainConfig
    from pipeline.data.shard import shard_dataset
    from pipeline.data.sources import digits_source
    from pipeline.models import build_unet
    from pipeline.training.checkpoint import export_ema

    data = str(tmp_path / "data")
    shard_dataset(digits_source().subset(list(range(40))), data, shard_size=20, test_fraction=0.5,
                  parallel="none")
    cfg = TrainConfig(preset="tiny-digits", loss="edm", loss_kwargs={"sigma_data": 0.5},
                      model_overrides={"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                                       "attn_resolutions": []})
    torch.manual_seed(0)
    net = build_unet(cfg.preset, **cfg.model_overrides)
    ckpt = export_ema(str(tmp_path / "ema.pt"), ema=net.state_dict(), config=cfg.to_dict(), step=0)
    state = inverse_flow(ckpt, data, str(tmp_path / "inverse"), n=3, steps=25, method="smc",
                         options={"particles": 2, "batch": 2}, return_state=True)
    assert state.is_completed()
    by_key = {a.key: a for a in _artifacts(state.state_details.flow_run_id) if a.key}
    assert by_key["inverse-progress"].data == 100.0
    assert "data:image/png;base64," in by_key["inverse-problem"].data
    assert "| particles per completion | 2 |" in by_key["inverse-problem"].data
    task = storage.read_json(str(tmp_path / "inverse" / "inverse.json"))["task"]
    assert (task["particles"], task["batch"], task["prior"]) == (2, 2, "classes")


def test_transient_classification():
    from flows.tasks import is_transient

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(OSError(5, "input/output error"))
    assert not is_transient(FileNotFoundError()) and not is_transient(PermissionError())
    assert not is_transient(ValueError("bad input"))
