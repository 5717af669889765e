"""No storage secret reaches a runtime environment or a log: after a Ray Tune run with credentials in
the driver's environment, no file under Ray's session folder (its logs, including the runtime-env
agent's) nor under Prefect's home contains the secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import raykit, storage
from tests.fixtures_s3 import S3_ENV, ray_local, s3_server  # noqa: F401


def _echo_trial(config: dict) -> None:
    # A trial that touches storage with its own credentials, as real trials do.
    out = config["out"]
    storage.write_json(storage.join(out, f"t{config['i']}.json"), {"i": config["i"]})
    raykit.report({"score": float(config["i"]), "step": 1})


def _files_with(root: Path, secret: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if secret in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return hits


@pytest.mark.integration
@pytest.mark.slow
def test_a_tune_run_leaves_no_secret_in_ray_or_prefect_logs(ray_local, tmp_path):  # noqa: F811
    import ray

    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"].encode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret.decode()
    bucket = "s3://secrets-test"
    fs, _ = storage.get_fs(bucket)
    fs.mkdir("secrets-test")
    space = {"i": raykit.search_dim("grid", [0, 1]), "out": f"{bucket}/trials"}
    results = raykit.tune_fit(raykit.trainable(_echo_trial, {"CPU": 0.5}), param_space=space,
                              out=f"{bucket}/exp", name="echo", metric="score", mode="max", max_concurrent=2)
    assert results.num_errors == 0 and results.num_terminated == 2  # the trials reached storage
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert (session / "logs").is_dir()
    assert _files_with(session, secret) == []
    prefect_home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    if prefect_home.is_dir():
        assert _files_with(prefect_home, secret) == []
