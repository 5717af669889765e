"""A lease on a run's root: one driver at a time writes checkpoints and reports into a root.

A lease is a small JSON object with an owner and an expiry, kept on the same storage as the run:

    {root}/lease/00000001.json   {"owner", "token", "generation", "acquired", "expires", "released"}

Each holder writes the next *generation*, created all-or-nothing (`create_exclusive`: S3's conditional
PUT `If-None-Match: *`, a hard link on local disks). Two drivers that both find the root free race to
create the same generation and exactly one wins; the loser reads the winner and refuses with its
owner's name. A holder renews its expiry in the background (`Lease.__enter__`); a holder that died
stops renewing, so its lease goes stale after `ttl_s` and the next driver takes over by writing the
following generation. Nothing is ever deleted to take a lease, so no two takers can both succeed.

Expiry compares wall clocks of different machines: keep `ttl_s` well above their skew (NTP keeps it
under a second; the default is ten minutes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import storage
from .layout import RunLayout

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 600.0
_NAME = re.compile(r"^(\d{8,})\.json$")


class LeaseHeldError(RuntimeError):
    """The root is leased by another live driver; `record` names it."""

    def __init__(self, root: str, record: LeaseRecord, now: float) -> None:
        self.root, self.record = root, record
        left = max(record.expires - now, 0.0)
        super().__init__(
            f"root {root} is in use by {record.owner} (lease taken {_iso(record.acquired)}, valid for "
            f"{left:.0f} s more unless renewed). Wait for that run to finish or cancel it; a crashed "
            f"run's lease expires on its own. Refusing to write into the same root at once.")


class LeaseLostError(RuntimeError):
    """Another driver took this lease over (ours had expired): what this run wrote may be mixed."""


@dataclass(frozen=True)
class LeaseRecord:
    """One generation of a root's lease (unix times in seconds)."""

    owner: str
    token: str
    generation: int
    acquired: float
    expires: float
    released: bool = False

    def live(self, now: float) -> bool:
        return not self.released and now < self.expires


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_owner(label: str = "") -> str:
    """`label` (e.g. the flow run) with this host and process, for the refusal message of others."""
    where = f"host {socket.gethostname()} pid {os.getpid()}"
    return f"{label} ({where})" if label else where


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create the object `uri` holding `data` only if nothing is there; True when this call created it.

    All-or-nothing: readers never see a partial object. S3 uses a conditional PUT (`If-None-Match: *`),
    local disks a hard link of a finished temporary file (link(2) fails when the name exists). Other
    stores fall back to exists-then-write, which is not race-free (say so in their deployments)."""
    scheme, _ = storage.split_scheme(uri)
    fs, path = storage.get_fs(uri)
    if scheme == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = posixpath.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    if scheme in ("s3", "s3a"):
        try:
            with storage.storage_errors(uri, "creating"):
                fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:  # s3fs: HTTP 412 PreconditionFailed
            return False
    if storage.exists(uri):
        return False
    storage.write_bytes(uri, data)
    return True


def _generations(folder: str) -> list[int]:
    return sorted(int(m.group(1)) for n in storage.listdir(folder) if (m := _NAME.match(n)))


def _gen_uri(folder: str, generation: int) -> str:
    return storage.join(folder, f"{generation:08d}.json")


def _read(folder: str, generation: int) -> LeaseRecord:
    return LeaseRecord(**storage.read_json(_gen_uri(folder, generation)))


def read_lease(root: str) -> LeaseRecord | None:
    """The newest lease generation of `root` (live, stale or released), or None when it never had one."""
    folder = RunLayout(root).lease
    gens = _generations(folder)
    return _read(folder, gens[-1]) if gens else None


class Lease:
    """The lease on `root` held by `owner`; `acquire()` or use as a context manager (which renews it
    every `ttl_s / 3` seconds in a background thread and releases it on exit)."""

    def __init__(self, root: str, owner: str, *, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds, got {ttl_s!r}")
        self.root, self.owner, self.ttl_s, self.clock = root, owner, float(ttl_s), clock
        self.folder = RunLayout(root).lease
        self.record: LeaseRecord | None = None
        self.took_over: LeaseRecord | None = None  # the stale lease this one replaced, if any
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> LeaseRecord:
        """Take the lease, or raise LeaseHeldError naming the live holder."""
        for _ in range(5):
            now = self.clock()
            gens = _generations(self.folder)
            try:
                current = _read(self.folder, gens[-1]) if gens else None
            except FileNotFoundError:  # pruned by a newer holder since the listing: list again
                continue
            if current is not None and current.live(now):
                raise LeaseHeldError(self.root, current, now)
            generation = gens[-1] + 1 if gens else 1
            rec = LeaseRecord(owner=self.owner, token=uuid.uuid4().hex, generation=generation, acquired=now,
                              expires=now + self.ttl_s)
            if create_exclusive(_gen_uri(self.folder, rec.generation), _dump(rec)):
                self.record = rec
                if current is not None and not current.released:
                    self.took_over = current
                    log.warning("took over the stale lease of %s on %s (expired %s)", current.owner,
                                self.root, _iso(current.expires))
                for g in gens[:-1]:  # older generations say nothing any more
                    storage.remove(_gen_uri(self.folder, g))
                return rec
            # Another driver created this generation first: read it on the next pass.
        raise RuntimeError(f"could not take the lease on {self.root}: it changed hands 5 times meanwhile")

    def _check_ours(self) -> LeaseRecord:
        if self.record is None:
            raise RuntimeError("the lease is not held (call acquire() first)")
        newest = read_lease(self.root)
        if newest is None or newest.token != self.record.token:
            self.lost = True
            by = newest.owner if newest else "nobody (the lease folder is gone)"
            raise LeaseLostError(f"the lease on {self.root} was taken over by {by}: this run's lease had "
                                 "expired")
        return newest

    def renew(self) -> LeaseRecord:
        """Push the expiry `ttl_s` ahead; LeaseLostError when another driver took the lease meanwhile."""
        self._check_ours()
        assert self.record is not None
        self.record = replace(self.record, expires=self.clock() + self.ttl_s)
        storage.write_bytes(_gen_uri(self.folder, self.record.generation), _dump(self.record))
        return self.record

    def release(self) -> None:
        """Mark the lease released (the next driver need not wait for its expiry)."""
        if self.record is None:
            return
        with contextlib.suppress(LeaseLostError):
            self._check_ours()
            self.record = replace(self.record, released=True)
            storage.write_bytes(_gen_uri(self.folder, self.record.generation), _dump(self.record))
        self.record = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLostError as e:
                log.error("%s", e)
                return
            except Exception as e:  # a storage hiccup: try again at the next beat, before expiry
                log.warning("renewing the lease on %s failed (%s); retrying", self.root, e)

    def __enter__(self) -> Lease:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        lost = self.lost
        self.release()
        if lost and exc_type is None:
            raise LeaseLostError(f"the lease on {self.root} was lost while this run wrote into it: another "
                            "driver may have written there too; check the root before trusting it")


def _dump(rec: LeaseRecord) -> bytes:
    return json.dumps(asdict(rec), sort_keys=True).encode()


__all__ = ["DEFAULT_TTL_S", "Lease", "LeaseHeldError", "LeaseLostError", "LeaseRecord", "create_exclusive",
           "default_owner", "read_lease"]
