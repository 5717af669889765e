"""Root templates, the `latest` pointer and the run log: pure functions, exact values."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline import storage
from pipeline.layout import RunLayout
from pipeline.runs import (
    RunIdentity,
    plan_run,
    read_latest,
    record_start,
    resolve_root,
    series_of,
    template_fields,
    write_latest,
)

UTC = dt.timezone.utc
NIGHT1 = RunIdentity(dt.datetime(2026, 12, 1, 2, 0, 5, tzinfo=UTC), "0b5e-1", "nightly cifar10")
NIGHT2 = RunIdentity(dt.datetime(2026, 12, 2, 2, 0, 0, tzinfo=UTC), "77aa-2", "nightly cifar10")


def test_fields_resolve_to_exact_values():
    tpl = "s3://b/runs/{deployment}/{date}/{time}-{datetime}-{flow_run_id}"
    assert resolve_root(tpl, NIGHT1) == "s3://b/runs/nightly-cifar10/2026-12-01/020005-20261201T020005Z-0b5e-1"
    # A scheduled time in another zone is written in UTC; outside a deployment the name is 'manual'.
    cet = dt.timezone(dt.timedelta(hours=1))
    run = RunIdentity(dt.datetime(2026, 12, 1, 0, 30, tzinfo=cet), "x", None)
    assert resolve_root("runs/{deployment}/{datetime}", run) == "runs/manual/20261130T233000Z"
    assert resolve_root("s3://b/fixed", NIGHT1) == "s3://b/fixed"


@pytest.mark.parametrize("tpl, bad", [("s3://b/{deploymnet}/{date}", "{deploymnet}"), ("runs/{}", "{}"),
                                      ("runs/{date.year}", "{date.year}")])
def test_unknown_field_is_named_with_the_known_ones(tpl, bad):
    with pytest.raises(ValueError) as e:
        template_fields(tpl)
    msg = str(e.value)
    assert f"unknown field {bad}" in msg
    assert all(k in msg for k in ("{date}", "{time}", "{datetime}", "{flow_run_id}", "{deployment}"))


def test_unmatched_brace_and_format_spec_are_refused():
    with pytest.raises(ValueError, match="root template"):
        template_fields("runs/{date")
    with pytest.raises(ValueError, match="no format spec"):
        template_fields("runs/{date:>12}")


def test_series_is_the_folder_above_the_first_per_run_component():
    assert series_of("s3://b/runs/{deployment}/{date}", NIGHT1) == "s3://b/runs/nightly-cifar10"
    assert series_of("runs/x-{datetime}/more", NIGHT1) == "runs"
    assert series_of("/abs/{flow_run_id}", NIGHT1) == "/abs"
    with pytest.raises(ValueError, match="no per-run field"):
        series_of("s3://b/runs/{deployment}", NIGHT1)


def test_a_scheduled_fixed_root_warns_but_a_dated_one_does_not():
    fixed = plan_run("s3://b/runs/nightly", NIGHT1)
    (warning,) = fixed.warnings
    assert "same root s3://b/runs/nightly for every scheduled time" in warning
    assert plan_run("s3://b/runs/{deployment}/{date}", NIGHT1).warnings == ()
    manual = RunIdentity(NIGHT1.scheduled_start, "m", None)
    assert plan_run("artifacts/run", manual).warnings == ()  # a hand-run fixed root is the user's choice
    with pytest.raises(ValueError, match="mode must be one of"):
        plan_run("artifacts/run", manual, mode="resume")


def test_reused_root_from_another_scheduled_time_warns_in_the_run_log(tmp_path):
    tpl = str(tmp_path / "runs" / "{deployment}" / "{date}")
    first = plan_run(tpl, NIGHT1)
    assert record_start(first) == []
    again = plan_run(tpl, RunIdentity(NIGHT1.scheduled_start, "retry", NIGHT1.deployment))
    assert record_start(again) == []  # the same scheduled time again (a retry) is no surprise
    hourly = RunIdentity(NIGHT1.scheduled_start + dt.timedelta(hours=1), "h", NIGHT1.deployment)
    plan = plan_run(tpl, hourly)
    assert plan.root == first.root
    (warning,) = record_start(plan)
    assert "already used by the run scheduled at 2026-12-01T02:00:05Z (flow run retry)" in warning
    log = storage.read_json(RunLayout(first.root).runs_log)
    assert [r["flow_run_id"] for r in log] == ["0b5e-1", "retry", "h"]


def test_latest_points_at_the_newest_completed_run_and_continue_follows_it(tmp_path):
    tpl = str(tmp_path / "runs" / "{deployment}" / "{date}")
    series = str(tmp_path / "runs" / "nightly-cifar10")
    with pytest.raises(ValueError, match=r"mode='continue': no completed run under .*start the series"):
        plan_run(tpl, NIGHT1, mode="continue")
    p1, p2 = plan_run(tpl, NIGHT1), plan_run(tpl, NIGHT2)
    assert write_latest(p2) == RunLayout.latest(series)
    write_latest(p1)  # a late finisher scheduled earlier does not move the pointer back
    assert read_latest(series)["root"] == p2.root == str(tmp_path / "runs/nightly-cifar10/2026-12-02")
    night3 = RunIdentity(dt.datetime(2026, 12, 3, 2, tzinfo=UTC), "c3", NIGHT1.deployment)
    cont = plan_run(tpl, night3, mode="continue")
    assert cont.root == p2.root and cont.mode == "continue" and cont.series == series
    assert write_latest(plan_run("artifacts/fixed", NIGHT1)) is None  # a single root has no series
