"""The lease on a run's root: one holder at a time, refusals name the holder, stale leases expire —
on a local disk and on the S3 API server, with real processes for the killed-holder case."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import storage
from pipeline.lease import Lease, LeaseHeldError, LeaseLostError, create_exclusive, read_lease

pytest_plugins = ("tests.fixtures_s3",)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/runs/a"


def test_create_exclusive_creates_once_and_keeps_the_first(root):
    uri = storage.join(root, "x.json")
    assert create_exclusive(uri, b"first")
    assert not create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_second_holder_is_refused_with_the_owner_named_until_release(root):
    a = Lease(root, "flow run alpha (host h1)")
    a.acquire()
    with pytest.raises(LeaseHeldError, match=r"in use by flow run alpha \(host h1\)") as e:
        Lease(root, "flow run beta").acquire()
    assert e.value.record.owner == "flow run alpha (host h1)"
    a.release()
    b = Lease(root, "flow run beta")
    b.acquire()
    assert read_lease(root).owner == "flow run beta" and b.took_over is None  # a release is not a takeover


def test_stale_lease_is_taken_over_after_its_expiry_and_the_old_holder_learns_it(tmp_path):
    root, clock = str(tmp_path / "run"), Clock()
    old = Lease(root, "crashed run", ttl_s=60, clock=clock)
    old.acquire()
    clock.t += 59.0
    with pytest.raises(LeaseHeldError, match="crashed run"):
        Lease(root, "new run", ttl_s=60, clock=clock).acquire()
    clock.t += 2.0  # 61 s after the last renewal: stale
    new = Lease(root, "new run", ttl_s=60, clock=clock)
    new.acquire()
    assert new.took_over is not None and new.took_over.owner == "crashed run"
    assert read_lease(root).owner == "new run" and read_lease(root).generation == 2
    with pytest.raises(LeaseLostError, match="taken over by new run"):
        old.renew()
    old.release()  # a lost lease's release leaves the new holder alone
    assert read_lease(root).owner == "new run" and not read_lease(root).released


def test_renewal_keeps_a_live_holder_past_its_ttl(tmp_path):
    root = str(tmp_path / "run")
    with Lease(root, "long run", ttl_s=0.6):
        time.sleep(1.5)  # 2.5 TTLs: only the heartbeat's renewals keep it live
        with pytest.raises(LeaseHeldError, match="long run"):
            Lease(root, "other").acquire()
    assert read_lease(root).released
    Lease(root, "other").acquire()


def test_racing_acquirers_get_exactly_one_lease(root):
    winners, refused, go = [], [], threading.Barrier(6)

    def contend(i: int) -> None:
        go.wait()
        try:
            Lease(root, f"racer {i}").acquire()
            winners.append(i)
        except LeaseHeldError as e:
            refused.append(e.record.owner)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 5
    assert set(refused) == {f"racer {winners[0]}"}  # every loser names the one winner


_HOLDER = """
import sys, time
from pipeline.lease import Lease
lease = Lease(sys.argv[1], "killed run (pid holder)", ttl_s=float(sys.argv[2]))
lease.__enter__()
print("held", flush=True)
time.sleep(600)
"""


def test_lease_of_a_killed_process_is_taken_over_after_expiry(s3_bucket):
    root, ttl = f"{s3_bucket}/runs/killed", 2.0
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, root, str(ttl)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        time.sleep(ttl)  # longer than the holder's renewal period: it is alive and renewing
        with pytest.raises(LeaseHeldError, match=r"killed run \(pid holder\)"):
            Lease(root, "next run").acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.time()
    deadline = killed_at + 3 * ttl
    while True:  # refused until the last renewal expires, then taken over
        try:
            lease = Lease(root, "next run")
            lease.acquire()
            break
        except LeaseHeldError:
            assert time.time() < deadline, "the dead holder's lease never expired"
            time.sleep(0.2)
    assert lease.took_over.owner == "killed run (pid holder)"
    assert lease.took_over.expires <= time.time()


def test_bad_ttl_is_refused():
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        Lease("/tmp/x", "me", ttl_s=0)
