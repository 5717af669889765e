"""Reach Prefect and Ray before any work starts: reuse or start a local Prefect server, check the
configured addresses, and say exactly what to set when something is not there."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LOCAL_HOST, LOCAL_PORT = "127.0.0.1", 4200
_started: list[subprocess.Popen] = []  # servers this process started (stop_started_servers ends them)


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_prefect_api() -> str | None:
    """The configured PREFECT_API_URL if it answers; None when unset (a temporary server is used)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return None
    if not api_healthy(url):
        raise ValueError(
            f"PREFECT_API_URL={url} does not answer at {url.rstrip('/')}/health. Start the server there "
            "(`prefect server start`), point PREFECT_API_URL at a running one, or unset it to run with a "
            "temporary local server.")
    return url


def ensure_local_server(host: str = LOCAL_HOST, port: int = LOCAL_PORT,
                        log: str | Path = "artifacts/prefect.log", timeout_s: float = 90.0) -> str:
    """Reuse the Prefect server on host:port or start one in the background (it outlives this
    process, so the UI stays up); sets PREFECT_API_URL and returns the UI URL."""
    api = f"http://{host}:{port}/api"
    if not api_healthy(api):
        log = Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        # The UI asks the API at PREFECT_UI_API_URL (default :4200): on another port it must be told.
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api}
        env.pop("PREFECT_API_URL", None)
        with open(log, "ab") as fh:
            cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
            _started.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True))
        deadline = time.monotonic() + timeout_s
        while not api_healthy(api):
            if time.monotonic() > deadline:
                raise ValueError(f"the Prefect server did not come up on {host}:{port} within "
                                 f"{timeout_s:.0f} s; see {log}")
            time.sleep(1.0)
    os.environ["PREFECT_API_URL"] = api
    return f"http://{host}:{port}"


def stop_started_servers(timeout_s: float = 20.0) -> None:
    """Stop the Prefect servers this process started (tests; `run` leaves its UI up on purpose)."""
    while _started:
        proc = _started.pop()
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_local_ray(dashboard: bool = True) -> str | None:
    """Join `RAY_ADDRESS` (checked within a timeout) or start a local Ray on 127.0.0.1 for the whole run,
    so every stage shares it; returns the dashboard URL."""
    from pipeline import raykit

    if not raykit.connect(dashboard=dashboard):
        return None
    return raykit.dashboard_url()
