"""`run` checks every stage's options before anything starts: a bad sampler, guidance, step count, a
preset that does not fit the data, or an unwritable root fail before Prefect, Ray or sharding."""

from __future__ import annotations

import os

import pytest

from pipeline.preflight import check_run


def _params(root: str, **groups) -> dict:
    p = {"source": "digits", "root": root, "preset": "tiny-digits", "seed": 0,
         "train": {"steps": 10, "batch_size": 32, "workers": 1, "gpus_per_worker": 0.0, "report_every": 5,
                   "checkpoint_every": 10, "xflip": False},
         "evaluate": {"n_samples": 20, "sampler": "heun", "sample_steps": 8, "guidance": 1.0,
                      "sample_workers": 0, "likelihood_samples": 8, "elbo_samples": 2},
         "sweep": {"weights": None, "samples": 20, "steps": 4}}
    for g, kv in groups.items():
        p[g] = {**p[g], **kv} if isinstance(p.get(g), dict) else kv
    return p


def test_good_params_pass_and_say_what_they_found(tmp_path):
    res = check_run(_params(str(tmp_path / "run")))
    assert res["image_shape"] == (8, 8, 1) and res["levels"] == 17 and res["features"] == "domain"
    assert res["conditional"] and not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("change,match", [
    ({"evaluate": {"sampler": "nope"}}, "method must be one of"),
    ({"evaluate": {"guidance": -1.0}}, "evaluate.guidance"),
    ({"evaluate": {"guidance": float("inf")}}, "evaluate.guidance"),
    ({"evaluate": {"sample_steps": 0}}, "steps"),
    ({"evaluate": {"n_samples": 0}}, "n must be"),
    ({"sweep": {"weights": [0.0, float("nan")]}}, "sweep.weights"),
    ({"sweep": {"weights": [1.0, 1.0]}}, "duplicates"),
    ({"preset": "small-32"}, "one resolution"),
    ({"preset": "nope"}, "preset must be one of"),
    ({"train": {"batch_size": 30, "workers": 4}}, "divisible"),
    ({"root": "/proc/self/run"}, "cannot be written|not writable"),
    ({"root": "s3://"}, "no bucket named"),
])
def test_bad_options_fail_before_anything_starts(tmp_path, change, match):
    if change.get("root", "").startswith("/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    p = _params(str(tmp_path / "run"))
    for k, v in change.items():
        p[k] = {**p[k], **v} if isinstance(v, dict) else v
    with pytest.raises(ValueError, match=match):
        check_run(p)


def test_run_with_a_bad_sampler_fails_before_prefect_ray_or_sharding(tmp_path, monkeypatch, capsys):
    pytest.importorskip("prefect")
    import flows.server as server
    from pipeline import cli

    for name in ("check_prefect_api", "ensure_local_server", "start_local_ray"):
        monkeypatch.setattr(server, name, lambda *a, **k: pytest.fail("started before validation"))
    root = tmp_path / "run"
    code = cli.main(["run", "--root", str(root), "--sampler", "nope", "--server", "env"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "method must be one of" in err[0]
    assert not root.exists()  # no shard, no folder
