"""The schedule search's storage layout under its `out` folder, and the trial records in it.

    {out}/search.json                 the settings (a restore rebuilds the search from it)
    {out}/tune/{name}/                Tune's experiment
    {out}/trials/{trial_id}/          the trial's Train run (checkpoints, history), trial.json,
                                      attempts/ (one marker per start), result.json once it finishes,
                                      placement_group.json (see raykit's placement-group workaround),
                                      status.json once Tune ended it (status, point, last result:
                                      the search's own record of what is done; a restore reads
                                      this, never Tune's pickled state)
    {out}/fid-stats/                  the FID reference statistics, computed once by the driver
    {out}/report.md, report.json, best.json, pareto.png

Both the driver (schedules.py) and the report (report.py) read trials through here, so neither imports
the other.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from .. import storage

SEARCH_FILE = "search.json"
TRIALS_DIR = "trials"
ATTEMPTS_DIR = "attempts"
RESULT_FILE = "result.json"
TRIAL_FILE = "trial.json"
STATUS_FILE = "status.json"
STATS_DIR = "fid-stats"
BEST_FILE = "best.json"


def trial_uri(out: str, trial_id: str) -> str:
    return storage.join(out, TRIALS_DIR, trial_id)


def record_attempt(out: str, trial_id: str) -> None:
    """One marker per start of a trial (restarts after failures or restores are counted)."""
    storage.write_json(storage.join(trial_uri(out, trial_id), ATTEMPTS_DIR,
                                    f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"),
                       {"trial_id": trial_id, "pid": os.getpid(), "started": time.time()})


def write_trial(out: str, trial_id: str, record: dict[str, Any]) -> None:
    storage.write_json(storage.join(trial_uri(out, trial_id), TRIAL_FILE), {"trial_id": trial_id, **record})


def write_result(out: str, trial_id: str, result: dict[str, Any]) -> None:
    storage.write_json(storage.join(trial_uri(out, trial_id), RESULT_FILE), {"trial_id": trial_id, **result})


def write_status(out: str, trial_id: str, status: str, point: dict[str, Any],
                 last_result: dict[str, Any]) -> None:
    """How Tune ended the trial (TERMINATED, also when ASHA stopped it, or ERROR) and its last report."""
    last = {k: v for k, v in last_result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    storage.write_json(storage.join(trial_uri(out, trial_id), STATUS_FILE),
                       {"trial_id": trial_id, "status": status, "point": point, "last_result": last})


def load_trial(out: str, trial_id: str) -> dict[str, Any]:
    """A trial's record (point, resolved point, TrainConfig), its attempts and its result, from storage."""
    uri = trial_uri(out, trial_id)
    rec_uri = storage.join(uri, TRIAL_FILE)
    rec = storage.read_json(rec_uri) if storage.exists(rec_uri) else {"trial_id": trial_id}
    attempts = storage.join(uri, ATTEMPTS_DIR)
    rec["attempts"] = len(storage.listdir(attempts)) if storage.exists(attempts) else 0
    result = storage.join(uri, RESULT_FILE)
    rec["finished"] = storage.read_json(result) if storage.exists(result) else None
    status = storage.join(uri, STATUS_FILE)
    rec["ended"] = storage.read_json(status) if storage.exists(status) else None
    return rec


def trial_ids(out: str) -> list[str]:
    root = storage.join(out, TRIALS_DIR)
    return storage.listdir(root) if storage.exists(root) else []


__all__ = ["ATTEMPTS_DIR", "BEST_FILE", "RESULT_FILE", "SEARCH_FILE", "STATS_DIR", "STATUS_FILE",
           "TRIALS_DIR", "TRIAL_FILE", "load_trial", "record_attempt", "trial_ids", "trial_uri",
           "write_result", "write_status", "write_trial"]
