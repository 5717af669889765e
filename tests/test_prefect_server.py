"""A real local Prefect server: run a flow against it, read the run and its artifacts back via the API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    from flows import server

    home = tmp_path_factory.mktemp("prefect-home")
    old = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ["PREFECT_HOME"] = str(home)
    try:
        ui = server.ensure_local_server(port=_free_port(), log=home / "server.log", timeout_s=120)
        yield ui, os.environ["PREFECT_API_URL"]
    finally:
        server.stop_started_servers()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_flow_run_and_artifacts_are_visible_through_the_api(prefect_server, tmp_path):
    ui, api = prefect_server
    data = tmp_path / "data"
    code = f"from flows.pipeline import shard_flow; shard_flow(source='digits', data={str(data)!r})"
    env = {**os.environ, "PREFECT_API_URL": api}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ui in done.stdout + done.stderr or "View at" in done.stdout + done.stderr

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Explicitly this server: an earlier Prefect test harness in the same process may still be the default.
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == api.rstrip("/")
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["shard"])))
        assert len(runs) == 1 and runs[0].state.name == "Completed"
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id])))
    by_key = {a.key: a for a in arts}
    assert "dataset" in by_key and by_key["dataset"].type == "markdown"
    assert "1617" in by_key["dataset"].data  # the train count of the digits split, from the real manifest


def test_unreachable_prefect_api_names_the_setting(monkeypatch):
    from flows.server import check_prefect_api

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_free_port()}/api")
    with pytest.raises(ValueError, match=r"PREFECT_API_URL=.*does not answer"):
        check_prefect_api()


def test_unreachable_ray_address_names_the_setting(monkeypatch):
    from pipeline.raykit import check_address

    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{_free_port()}")
    with pytest.raises(ValueError, match=r"RAY_ADDRESS=.*unreachable"):
        check_address()
