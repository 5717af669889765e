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


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package `chromium`) is not installed")
def test_an_embedded_picture_renders_in_the_prefect_ui(prefect_server, tmp_path):
    """A markdown artifact made by `reports.embed_png`, as every stage makes its pictures, rendered by the
    real Prefect UI in headless Chromium: the image region is drawn, not a broken-image icon."""
    import io

    import numpy as np
    from PIL import Image

    ui, api = prefect_server
    tile = np.zeros((120, 120, 3), np.uint8)
    tile[:, :] = (255, 0, 255)  # magenta: a colour the UI itself never paints
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="PNG")
    (tmp_path / "tile.png").write_bytes(buf.getvalue())
    code = (
        "from prefect import flow\n"
        "from prefect.artifacts import create_markdown_artifact\n"
        "from pipeline.reports import embed_png\n"
        "@flow\n"
        "def show():\n"
        f"    png = open({str(tmp_path / 'tile.png')!r}, 'rb').read()\n"
        f"    md = embed_png(png, 'tile', link={str(tmp_path / 'tile.png')!r})\n"
        "    return str(create_markdown_artifact(md, key='embedded-picture'))\n"
        "print('ARTIFACT', show())\n"
    )
    env = {**os.environ, "PREFECT_API_URL": api}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    artifact_id = done.stdout.split("ARTIFACT", 1)[1].split()[0]

    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000",
           "--virtual-time-budget=20000", f"--screenshot={shot}",
           f"{ui.rstrip('/')}/artifacts/artifact/{artifact_id}"]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists(), "Chromium wrote no screenshot"
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    magenta = ((px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] > 200)).sum()
    assert magenta > 0.5 * 120 * 120, f"the embedded picture is not on the page ({magenta} magenta pixels)"
