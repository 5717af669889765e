"""pipeline.storage on plain paths, file://, memory:// and a real S3 API server (moto) through s3fs."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import uuid

import pytest

from pipeline import storage

pytest_plugins = ("tests.fixtures_s3",)  # s3_server, s3_bucket, ray_local


@pytest.fixture(params=["path", "file", "memory", "s3"])
def root(request, tmp_path) -> str:
    """A fresh, empty folder URI on each kind of storage."""
    if request.param == "path":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    if request.param == "memory":
        return f"memory://storage-test-{uuid.uuid4().hex[:8]}"
    return storage.join(request.getfixturevalue("s3_bucket"), "root")


def test_bytes_json_list_remove_round_trip(root):
    a, b = storage.join(root, "a.bin"), storage.join(root, "sub", "b.json")
    assert not storage.exists(a)
    payload = os.urandom(3000)
    storage.write_bytes(a, payload)
    storage.write_json(b, {"x": [1, 2.5, "σ"]})
    assert storage.exists(a)
    assert storage.read_bytes(a) == payload
    assert storage.read_json(b) == {"x": [1, 2.5, "σ"]}
    assert storage.listdir(root) == ["a.bin", "sub"]
    assert storage.find(root) == sorted([a, b])
    with storage.open_uri(a, "rb") as f:
        assert f.read(10) == payload[:10]
    storage.remove(a)
    assert not storage.exists(a)
    storage.remove(a)  # removing what is gone is not an error
    storage.remove(storage.join(root, "sub"), recursive=True)
    assert storage.listdir(root) == []
    assert storage.listdir(storage.join(root, "never-written")) == []


def test_overwrite_replaces_whole_object(root):
    uri = storage.join(root, "x.bin")
    storage.write_bytes(uri, b"old" * 1000)
    storage.write_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"new"


def test_atomic_write_leaves_nothing_on_error(root):
    uri = storage.join(root, "model.pt")
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(uri) as f:
        f.write(b"partial" * 10_000)
        # a reader during the write sees no object at the final key
        assert not storage.exists(uri)
        raise RuntimeError("boom")
    assert not storage.exists(uri)
    assert storage.listdir(root) == []  # the temporary key is gone too


def test_atomic_write_failure_keeps_previous_version(root):
    uri = storage.join(root, "manifest.json")
    storage.write_json(uri, {"version": 1})
    with pytest.raises(KeyError), storage.atomic_write(uri, "w") as f:
        f.write('{"version": 2, "trunc')
        raise KeyError("interrupted")
    assert storage.read_json(uri) == {"version": 1}
    assert storage.listdir(root) == ["manifest.json"]


def test_text_mode_atomic_write(root):
    uri = storage.join(root, "t.txt")
    with storage.atomic_write(uri, "w") as f:
        f.write("β = 0.1\n")
    assert storage.read_bytes(uri).decode("utf-8") == "β = 0.1\n"


def test_join_keeps_scheme():
    assert storage.join("s3://b/x/", "y", "/z.tar") == "s3://b/x/y/z.tar"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"
    assert storage.parent("s3://b/x/y.tar") == "s3://b/x"
    assert storage.split_scheme("file:///tmp/a") == ("file", "/tmp/a")


def test_unknown_scheme_and_missing_package_are_clear():
    with pytest.raises(ValueError, match="scheme 'ftp' not supported"):
        storage.get_fs("ftp://host/x")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="gcsfs"):
            storage.get_fs("gs://bucket/x")
    try:
        import adlfs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="adlfs"):
            storage.get_fs("az://container/x")


def test_options_from_env_carry_endpoint_but_no_secret(s3_server, caplog):
    caplog.set_level(logging.DEBUG)
    opts = storage.storage_options_from_env("s3://b/x")
    assert opts["client_kwargs"]["endpoint_url"] == s3_server
    text = json.dumps(opts) + json.dumps(storage.worker_env())
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text
    assert storage.redact({"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "e"}}) == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"endpoint_url": "e"},
    }
    storage.get_fs(f"s3://b-{uuid.uuid4().hex[:6]}/x")  # logs the options of a new filesystem
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in caplog.text


def test_check_writable_missing_bucket(s3_server):
    with pytest.raises(ValueError, match="bucket 'no-such-bucket-x1' does not exist"):
        storage.check_writable("s3://no-such-bucket-x1/data")


def test_check_writable_missing_credentials(s3_bucket, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(ValueError, match="no credentials") as e:
        storage.check_writable(storage.join(s3_bucket, "data"))
    assert s3_bucket in str(e.value)


def test_check_writable_local(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "deeper"))  # creatable: fine
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        storage.check_writable(str(tmp_path / "afile" / "sub"))
    storage.check_writable(f"memory://probe-{uuid.uuid4().hex[:6]}")


def _child_read(uri: str) -> bytes:
    return storage.read_bytes(uri)


def test_s3_filesystem_is_rebuilt_after_fork(s3_bucket):
    uri = storage.join(s3_bucket, "fork.bin")
    storage.write_bytes(uri, b"written by the parent")  # the parent's s3fs instance now holds a loop
    parent_fs, _ = storage.get_fs(uri)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(_child_read, (uri,)) == b"written by the parent"
    assert storage.get_fs(uri)[0] is parent_fs  # same process: cached
