"""Shared fixtures: a real S3 API server (moto in server mode) on 127.0.0.1, and a local Ray cluster.

Use them from a test module with `pytest_plugins = ("tests.fixtures_s3",)` (importing the fixture
functions also works). `s3_server` sets AWS_* variables for the whole session (so Ray workers started
later inherit them); s3fs then reaches the server through `pipeline.storage` exactly as it would a
cloud bucket. However many modules hold the fixture, one server runs per session.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One server per session even when several modules import the fixture (each import is a separate
# fixture definition to pytest): [server, endpoint, saved environment, users].
_shared: list = []


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free local port (once per session); yields its endpoint URL."""
    if not _shared:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        _shared.extend([server, endpoint, saved, 0])
    _shared[3] += 1
    try:
        yield _shared[1]
    finally:
        _shared[3] -= 1
        if _shared[3] == 0:
            server, _, saved, _ = _shared
            _shared.clear()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the test server; yields its s3:// URI."""
    from pipeline import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.get_fs(f"s3://{name}")
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def ray_local(s3_server: str) -> Iterator[object]:
    """A local 2-CPU Ray cluster started after the S3 variables are set (workers inherit them)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
