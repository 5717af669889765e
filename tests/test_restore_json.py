"""Restoring a schedule search or a guidance sweep reads only the project's own JSON: a tampered Tune
experiment state with a code payload is never unpickled, only the missing points are re-run, and the
`out` asked for wins over the one recorded."""

from __future__ import annotations

import contextlib
import json
import pickle
import random
from pathlib import Path

import pytest

from pipeline import raykit, storage
from pipeline.config import TrainConfig
from pipeline.tuning import guidance, schedules, store
from pipeline.tuning.search import ScheduleSearch


class Payload:
    """Unpickling this writes the marker file: what an attacker with bucket access would plant."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _tamper(experiment: Path, marker: Path) -> None:
    experiment.mkdir(parents=True, exist_ok=True)
    blob = pickle.dumps(Payload(str(marker)))
    (experiment / "tuner.pkl").write_bytes(blob)
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [], "runner_data": {"CLOUDPICKLE_FALLBACK": blob.hex()}}))


@pytest.fixture
def fake_tune(monkeypatch):
    """Ray stands aside: record what the restore would send to Tune."""
    calls: list[dict] = []
    monkeypatch.setattr(raykit, "session", contextlib.nullcontext)
    monkeypatch.setattr(raykit, "tune_fit", lambda fn, **kw: calls.append(kw))
    return calls


def _search(out: str, space: dict, num_samples: int = 1) -> ScheduleSearch:
    return ScheduleSearch(space=space, base=TrainConfig(steps=10).to_dict(), data="/nowhere", out=out,
                          num_samples=num_samples)


def test_schedule_restore_reruns_only_missing_trials_and_never_unpickles(tmp_path, fake_tune, monkeypatch):
    out, marker = tmp_path / "moved" / "search", tmp_path / "marker"
    recorded = _search("/old/place", {"sde": ["vp", "subvp", "ve"], "beta_max": {"uniform": [5.0, 20.0]}})
    storage.write_json(str(out / store.SEARCH_FILE), recorded.to_dict())
    _tamper(out / "tune" / "schedules", marker)
    done = {"sde": "vp", "beta_max": 7.0}
    store.write_trial(str(out), "t-done", {"point": done})
    store.write_status(str(out), "t-done", "TERMINATED", done, {"step": 10, "heldout_loss": 0.5})
    half = {"sde": "subvp", "beta_max": 9.0}
    store.write_trial(str(out), "t-half", {"point": half})  # interrupted: no status.json
    monkeypatch.setattr(schedules, "validate_search", lambda s: None)
    monkeypatch.setattr(schedules, "max_concurrent_trials", lambda s: 1)

    res = schedules.restore_schedules(str(out))

    assert not marker.exists()
    (call,) = fake_tune
    assert call["out"] == str(out) and call["name"].startswith("schedules-restore-")
    todo = call["param_space"]["restore"]["grid_search"]
    by_sde = {t["point"]["sde"]: t for t in todo}
    assert set(by_sde) == {"subvp", "ve"}  # the finished vp trial is not re-run
    assert by_sde["subvp"] == {"point": half, "folder": "t-half"}  # continues in its own folder
    assert by_sde["ve"]["folder"] is None and 5.0 <= by_sde["ve"]["point"]["beta_max"] <= 20.0
    assert storage.read_json(str(out / store.SEARCH_FILE))["out"] == str(out)  # --out wins
    assert not res.complete and {r["trial_id"] for r in res.rows} == {"t-done", "t-half"}


def test_pending_trials_counts_num_samples_per_grid_combination(tmp_path):
    out = str(tmp_path)
    search = _search(out, {"sde": ["vp", "ve"], "weighting": {"choice": ["simple", "likelihood"]}}, 3)
    for i in range(3):
        p = {"sde": "vp", "weighting": "simple"}
        store.write_trial(out, f"vp{i}", {"point": p})
        store.write_status(out, f"vp{i}", "TERMINATED" if i < 2 else "ERROR", p, {})
    todo = schedules.pending_trials(search, random.Random(0))
    assert [t["folder"] for t in todo if t["point"]["sde"] == "vp"] == ["vp2"]  # errored: restarts there
    assert sum(t["point"]["sde"] == "ve" for t in todo) == 3
    assert all(t["point"]["weighting"] in ("simple", "likelihood") for t in todo)


def test_schedule_restore_with_nothing_missing_starts_no_ray(tmp_path, fake_tune, monkeypatch):
    out, marker = tmp_path / "s", tmp_path / "marker"
    storage.write_json(str(out / store.SEARCH_FILE), _search(str(out), {"sde": ["vp"]}).to_dict())
    _tamper(out / "tune" / "schedules", marker)
    store.write_trial(str(out), "a", {"point": {"sde": "vp"}})
    store.write_status(str(out), "a", "TERMINATED", {"sde": "vp"}, {"step": 10, "heldout_loss": 0.25})
    res = schedules.restore_schedules(str(out))
    assert fake_tune == [] and not marker.exists()
    assert res.complete and res.best["trial_id"] == "a" and res.best["heldout_loss"] == 0.25


def test_guidance_restore_draws_only_unscored_points(tmp_path, fake_tune, monkeypatch):
    out, marker = tmp_path / "copy", tmp_path / "marker"
    sweep = guidance.GuidanceSweep(checkpoint="/c.pt", data="/d", classifier="/k", out="/elsewhere",
                                   weights=(0.0, 1.0, 2.0))
    storage.write_json(str(out / guidance.SWEEP_FILE), sweep.to_dict())
    _tamper(out / "tune" / "guidance", marker)
    storage.write_json(storage.join(guidance.point_uri(str(out), "heun", 16, 1.0), "score.json"),
                       {"fid": 3.0, "precision": 0.9, "trial_id": "x"})
    monkeypatch.setattr(guidance, "validate_sweep", lambda s: None)
    monkeypatch.setattr(guidance, "_reference", lambda s: None)
    monkeypatch.setattr(raykit, "concurrent_trials", lambda *a, **k: 1)
    res = guidance.restore_guidance(str(out))
    assert not marker.exists()
    (call,) = fake_tune
    assert [p["w"] for p in call["param_space"]["point"]["grid_search"]] == [0.0, 2.0]
    assert call["out"] == str(out)
    assert [r["status"] for r in res["rows"]] == ["MISSING", "TERMINATED", "MISSING"]
    assert res["best"]["overall"]["w"] == 1.0 and not res["complete"]


def test_saved_settings_refuses_what_is_not_a_settings_object(tmp_path):
    storage.write_json(str(tmp_path / "search.json"), [1, 2])
    with pytest.raises(ValueError, match="JSON object"):
        raykit.saved_settings(str(tmp_path), "search.json", ScheduleSearch.from_dict, "schedule search")
    storage.write_json(str(tmp_path / "search.json"), {"bogus": 1})
    with pytest.raises(ValueError, match="not the settings of a schedule search"):
        raykit.saved_settings(str(tmp_path), "search.json", ScheduleSearch.from_dict, "schedule search")


def test_nothing_in_the_package_restores_tune_state():
    """Tuner.restore unpickles from storage: no module may call it."""
    root = Path(raykit.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "Tuner.restore(" not in text and ".can_restore(" not in text, path
