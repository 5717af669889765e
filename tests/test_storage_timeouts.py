"""Storage never hangs and never leaves litter: an endpoint that accepts connections and never answers
fails within the configured timeouts with a one-line error naming the endpoint; a rerun of `shard`
removes the temporary objects a killed run left; a URI without a bucket and an unwritable local root
are refused before any work."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from pipeline import storage
from tests.fixtures_s3 import s3_bucket, s3_server  # noqa: F401


@pytest.fixture
def silent_endpoint(monkeypatch):
    """A TCP server that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                 "AWS_DEFAULT_REGION": "us-east-1", "PIPELINE_STORAGE_CONNECT_TIMEOUT_S": "1",
                 "PIPELINE_STORAGE_READ_TIMEOUT_S": "1", "PIPELINE_STORAGE_RETRIES": "1"}.items():
        monkeypatch.setenv(k, v)
    yield endpoint
    stop.set()
    thread.join()
    for s in held:
        s.close()
    server.close()


def test_a_silent_endpoint_fails_within_the_timeouts(silent_endpoint):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="cannot reach the storage endpoint") as e:
        storage.read_bytes("s3://bucket/x.json")
    assert time.monotonic() - t0 < 15  # 2 attempts × 1 s read timeout, plus backoff
    assert silent_endpoint in str(e.value) and "PIPELINE_STORAGE_READ_TIMEOUT_S" in str(e.value)


def test_shard_against_a_silent_endpoint_exits_2_within_the_timeouts(silent_endpoint, tmp_path, capsys):
    from pipeline.cli import main

    src = tmp_path / "x.npz"
    np.savez(src, x=np.zeros((4, 8, 8, 1), np.uint8), y=np.zeros(4, np.int64))
    t0 = time.monotonic()
    assert main(["shard", str(src), "s3://bucket/out"]) == 2
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the storage endpoint" in err[0]


def test_timeout_settings_are_validated(monkeypatch):
    monkeypatch.setenv("PIPELINE_STORAGE_READ_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="PIPELINE_STORAGE_READ_TIMEOUT_S"):
        storage.timeouts()
    monkeypatch.setenv("PIPELINE_STORAGE_READ_TIMEOUT_S", "inf")
    with pytest.raises(ValueError, match="finite"):
        storage.timeouts()


@pytest.mark.parametrize("uri", ["s3://", "s3:///", "gs://", "s3a://"])
def test_a_uri_without_a_bucket_is_refused(uri):
    with pytest.raises(ValueError, match="no bucket named"):
        storage.split_scheme(uri)


def test_shard_to_a_uri_without_a_bucket_writes_nothing(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "x.npz"
    np.savez(src, x=np.zeros((4, 8, 8, 1), np.uint8), y=np.zeros(4, np.int64))
    assert main(["shard", str(src), "s3://"]) == 2
    assert "no bucket named" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]  # no local folder named "s3:"


def test_an_unwritable_local_root_is_refused(tmp_path):
    import os

    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    with pytest.raises(ValueError, match=r"cannot be written|not writable"):
        storage.check_writable("/proc/self/pipeline-out")


def test_a_rerun_of_shard_removes_the_orphans_of_a_killed_run(s3_bucket, tmp_path):  # noqa: F811
    from pipeline.data.shard import shard_dataset

    src = tmp_path / "x.npz"
    rng = np.random.default_rng(0)
    np.savez(src, x=rng.integers(0, 255, (20, 8, 8, 1), dtype=np.uint8), y=np.arange(20) % 2)
    dest = f"{s3_bucket}/digits"
    orphan = f"{dest}/train/.shard-000000.tar.tmp-0123456789ab"
    storage.write_bytes(orphan, b"half an upload")
    assert storage.exists(orphan)
    shard_dataset(str(src), dest, shard_size=8, parallel="none")
    left = [u for u in storage.find(dest) if storage.TMP_MARK in storage.basename(u)]
    assert left == [] and not storage.exists(orphan)
