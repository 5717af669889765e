"""Scheduled runs end to end: a local Prefect server, `prefect deploy` of the project's prefect.yaml (with
a test override), `prefect worker start`, and the S3 API server on 127.0.0.1. Also: two runs on one root,
a root template with an unknown field, the shipped deployments' limits, and the continuation mode."""

from __future__ import annotations

import contextvars
import copy
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline import storage
from pipeline.layout import RunLayout

pytest_plugins = ("tests.fixtures_s3",)
REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "infra" / "prefect" / "prefect.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real local Prefect server (its own home); yields its API URL."""
    from flows import server

    home = tmp_path_factory.mktemp("prefect-home")
    keys = ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    try:
        server.ensure_local_server(port=_free_port(), log=home / "server.log", timeout_s=120)
        yield os.environ["PREFECT_API_URL"]
    finally:
        server.stop_started_servers()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client(api: str):
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _api(api: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Explicitly this server: an earlier Prefect test harness in the same process may still be the default.
    return temporary_settings(updates={PREFECT_API_URL: api})


def test_shipped_deployments_use_per_run_roots_and_one_run_at_a_time():
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from pipeline.runs import RunIdentity, plan_run

    run = RunIdentity(dt.datetime(2026, 12, 1, 2, tzinfo=dt.timezone.utc), "id", "nightly-cifar10")
    for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]:
        limit = d["concurrency_limit"]
        assert limit["limit"] == 1, d["name"]
        ConcurrencyLimitStrategy(limit["collision_strategy"])  # a strategy Prefect knows
        mode = d["parameters"].get("mode", "fresh")
        if mode == "fresh":
            plan = plan_run(d["parameters"]["root"], run, mode=mode)
            assert plan.series is not None and plan.warnings == (), d["name"]  # a new root per night


@pytest.mark.integration
def test_unknown_template_field_fails_the_run_before_any_stage(prefect_api, tmp_path):
    from flows.pipeline import diffusion_pipeline

    with _api(prefect_api):
        state = diffusion_pipeline(root=str(tmp_path / "runs" / "{deploymnet}" / "{date}"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"unknown field \{deploymnet\}; known fields: \{date\}"):
        state.result()
    assert not (tmp_path / "runs").exists()  # nothing sharded, trained or leased


@pytest.mark.integration
def test_second_run_on_the_same_root_refuses_naming_the_first_which_completes(prefect_api, tmp_path,
                                                                              monkeypatch):
    import flows.pipeline as fp

    root = str(tmp_path / "run")
    inside, go_on, calls = threading.Event(), threading.Event(), []

    def stages(root_, source, config, tp, ep, sp):  # the first run's stages, held open while the second tries
        calls.append(root_)
        inside.set()
        assert go_on.wait(120)
        storage.write_json(RunLayout(root_).summary, {"root": root_, "written_by": "first"})
        return {"root": root_}

    monkeypatch.setattr(fp, "_run_stages", stages)
    states = []
    with _api(prefect_api):
        # The thread runs in a copy of this context: Prefect's settings (this server) live in contextvars.
        ctx = contextvars.copy_context()
        first = threading.Thread(target=ctx.run, args=(
            lambda: states.append(fp.diffusion_pipeline(root=root, return_state=True)),))
        first.start()
        assert inside.wait(120)
        second = fp.diffusion_pipeline(root=root, return_state=True)
        go_on.set()
        first.join(120)
    assert second.is_failed()
    first_id = str(states[0].state_details.flow_run_id)
    with pytest.raises(RuntimeError, match=rf"root {root} is in use by flow run .*\({first_id}\)"):
        second.result()
    assert states[0].is_completed() and calls == [root]  # the second never reached a stage
    assert storage.read_json(RunLayout(root).summary)["written_by"] == "first"
    assert [r["flow_run_id"] for r in storage.read_json(RunLayout(root).runs_log)] == [first_id]
    from pipeline.lease import read_lease

    assert read_lease(root).released


@pytest.mark.integration
def test_continue_mode_in_the_flow_trains_the_newest_run_n_steps_further(prefect_api, tmp_path, monkeypatch):
    import flows.pipeline as fp
    from pipeline.recipes import train_recipe
    from pipeline.runs import RunIdentity, plan_run, write_latest
    from pipeline.training.checkpoint import save_checkpoint

    template = str(tmp_path / "runs" / "{deployment}" / "{datetime}")
    seen = []
    monkeypatch.setattr(fp, "_run_stages", lambda root, source, config, *rest: seen.append((root, config))
                        or {"root": root})
    with _api(prefect_api):
        nothing = fp.diffusion_pipeline(root=template, mode="continue", return_state=True)
    assert nothing.is_failed() and not seen
    with pytest.raises(ValueError, match=r"no completed run under .*start the series with mode='fresh'"):
        nothing.result()

    yesterday = dt.datetime(2026, 11, 30, 2, tzinfo=dt.timezone.utc)
    earlier = plan_run(template, RunIdentity(yesterday, "n0", None))
    config = train_recipe("tiny-digits", steps=40, batch_size=16, seed=3)
    save_checkpoint(RunLayout(earlier.root).train, {"config": config.to_dict()}, step=40)
    write_latest(earlier)
    with _api(prefect_api):
        state = fp.diffusion_pipeline(root=template, mode="continue", train={"slice_steps": 25},
                                      return_state=True)
    assert state.is_completed()
    ((root, cont),) = seen
    assert root == earlier.root and cont.steps == 65 and cont.seed == 3  # the newest run's recipe, +25 steps


def _flow_runs(api: str, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _api(api), _client(api) as client:
        flt = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        runs = client.read_flow_runs(deployment_filter=flt)
    return sorted(runs, key=lambda r: r.expected_start_time)


def _roots_by_run(series: str) -> dict[str, str]:
    """flow-run id → the root it recorded itself in (runs.json), for every root of the series."""
    found = {}
    for name in storage.listdir(series):
        log_uri = RunLayout(storage.join(series, name)).runs_log
        if storage.exists(log_uri):
            for rec in storage.read_json(log_uri):
                found[rec["flow_run_id"]] = rec["root"]
    return found


def _wait(what: str, check, timeout_s: float, worker_log: Path, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            tail = worker_log.read_text()[-4000:] if worker_log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}; worker log:\n{tail}")
        time.sleep(poll_s)


@pytest.mark.integration
@pytest.mark.slow
def test_scheduler_creates_runs_a_worker_completes_them_each_in_its_own_root(prefect_api, s3_bucket,
                                                                              tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    # The project's nightly deployment, overridden for the test: a process pool, tiny parameters, a root
    # on the S3 server, and a schedule due within seconds.
    project = yaml.safe_load(PREFECT_YAML.read_text())
    nightly = next(d for d in project["deployments"] if d["name"] == "nightly-cifar10")
    assert nightly["concurrency_limit"]["limit"] == 1
    template = f"{s3_bucket}/runs/{{deployment}}/{{datetime}}"
    d = copy.deepcopy(nightly)
    d["parameters"] = {
        "source": "digits", "root": template, "preset": "tiny-digits", "mode": "fresh",
        "train": {"steps": 4, "batch_size": 16, "report_every": 2, "checkpoint_every": 4},
        "evaluate": {"n_samples": 8, "sample_steps": 2, "likelihood_samples": 2, "elbo_samples": 1},
        "sweep": {"weights": []}}
    anchor = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3)
    d["schedules"] = [{"interval": 20, "anchor_date": anchor.isoformat(), "timezone": "UTC", "active": True}]
    pool = "test-process-pool"
    d["work_pool"] = {"name": pool, "work_queue_name": "default", "job_variables": {"env": {
        "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PIPELINE_LEASE_TTL_S": "60"}}}
    override = {**project, "deployments": [d],
                "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]}
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(override))

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_CLI_PROMPT": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PYTHONPATH": str(REPO)}  # AWS_* come from the S3 fixture
    with _api(prefect_api), _client(prefect_api) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    deploy = [sys.executable, "-m", "prefect", "deploy", "--all", "--prefect-file", str(prefect_file)]
    deployed = subprocess.run(deploy, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    with _api(prefect_api), _client(prefect_api) as client:
        deployment = client.read_deployment_by_name("diffusion-pipeline/nightly-cifar10")
    # The limit from prefect.yaml, as the server enforces it.
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as fh:
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
        worker = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    series = f"{s3_bucket}/runs/nightly-cifar10"
    try:
        def first_done():
            runs = _flow_runs(prefect_api, deployment.id)
            if runs and runs[0].state.type in (StateType.FAILED, StateType.CRASHED):
                raise AssertionError(f"first run {runs[0].state}: {worker_log.read_text()[-4000:]}")
            return runs if runs and runs[0].state.is_completed() else None

        runs = _wait("the first scheduled run to complete", first_done, 170, worker_log, poll_s=2.0)
        first = runs[0]
        assert first.auto_scheduled  # created by the scheduler, not by hand
        roots = _roots_by_run(series)
        root1 = roots[str(first.id)]
        assert root1.startswith(series + "/") and root1 != series
        for rel in ("data/manifest.json", "train/ema-final.pt", "train/checkpoints/step-00000004.pt",
                    "samples/grid.png", "eval/likelihood.json", "report.md", "summary.json"):
            assert storage.exists(storage.join(root1, rel)), rel
        assert storage.read_json(storage.join(root1, "summary.json"))["root"] == root1
        assert storage.read_json(RunLayout.latest(series))["root"] == root1

        # The next scheduled run waited for the first (one at a time), then wrote into a root of its own.
        def second_started():
            started = _roots_by_run(series)
            later = [r for r in _flow_runs(prefect_api, deployment.id)[1:] if str(r.id) in started]
            return later[0] if later else None

        second = _wait("the second scheduled run to start in its root", second_started, 90, worker_log)
        assert second.auto_scheduled
        root2 = _roots_by_run(series)[str(second.id)]
        assert root2.startswith(series + "/") and root2 != root1
        assert second.start_time is not None and first.end_time is not None
        assert second.start_time >= first.end_time  # the limit of 1: no overlap
        with _api(prefect_api), _client(prefect_api) as client:
            client.set_flow_run_state(second.id, Cancelling(), force=True)  # the test has seen enough
            _wait("the second run to stop", lambda: client.read_flow_run(second.id).state.is_final(), 40,
                  worker_log)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


@pytest.mark.integration
@pytest.mark.slow
def test_continuation_advances_the_newest_run_by_exactly_n_steps(s3_bucket, ray_local):
    from pipeline.config import RunOptions
    from pipeline.recipes import train_recipe
    from pipeline.runs import RunIdentity, continuation_config, plan_run, write_latest
    from pipeline.stages import shard_stage, train_stage
    from pipeline.training.checkpoint import list_checkpoints

    template = f"{s3_bucket}/runs/{{deployment}}/{{date}}"
    utc = dt.timezone.utc
    night1 = RunIdentity(dt.datetime(2026, 12, 1, 2, tzinfo=utc), "n1", "long")
    fresh = plan_run(template, night1)
    layout = RunLayout(fresh.root)
    data = shard_stage("digits", layout.data)["data"]
    options = RunOptions(report_every=1, checkpoint_every=3, progress=False)
    config = train_recipe("tiny-digits", steps=4, batch_size=16, seed=0)
    assert train_stage(config, data, layout.train, options=options)["step"] == 4
    write_latest(fresh)
    before = storage.read_json(RunLayout.history(layout.train))

    night2 = RunIdentity(dt.datetime(2026, 12, 2, 2, tzinfo=utc), "n2", "long")
    plan = plan_run(template, night2, mode="continue")
    assert plan.root == fresh.root  # the newest run, not tonight's would-be root
    cont, start = continuation_config(RunLayout(plan.root).train, 3)
    assert (start, cont.steps) == (4, 7) and cont.to_dict() == config.replace(steps=7).to_dict()
    res = train_stage(cont, data, layout.train, options=options)
    assert res["step"] == 7 and not res["skipped"]
    assert [s for s, _ in list_checkpoints(layout.train)][-1] == 7
    after = storage.read_json(RunLayout.history(layout.train))
    assert [h["step"] for h in after] == [1, 2, 3, 4, 5, 6, 7]  # 3 more steps, none redone
    assert after[:4] == before  # resumed from the checkpoint at step 4, not retrained


def test_serve_gets_the_limit_and_the_cli_checks_templates_before_prefect_starts():
    import argparse

    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows import cli
    from flows.runs import concurrency_limit

    limit = concurrency_limit("cancel-new")
    assert limit.limit == 1 and limit.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    with pytest.raises(ValueError, match="collision strategy must be one of"):
        concurrency_limit("drop")
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    ok = parser.parse_args(["serve", "--cron", "0 2 * * *", "--root", "s3://b/runs/{deployment}/{date}",
                            "--mode", "continue", "--slice-steps", "500"])
    params = cli._flow_params(ok)
    assert params["mode"] == "continue" and params["train"]["slice_steps"] == 500
    bad = parser.parse_args(["run", "--root", "s3://b/runs/{nightly}"])
    with pytest.raises(ValueError, match=r"unknown field \{nightly\}"):
        cli._flow_params(bad)
