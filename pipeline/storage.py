"""The one place where URIs become files: fsspec filesystems, storage options from the environment,
atomic writes.

URIs: plain paths and ``file://`` are local; ``s3://`` goes through s3fs; ``memory://`` is fsspec's
per-process in-memory store (tests); ``gs://`` and ``az://``/``abfs://`` work when gcsfs / adlfs are
installed.

Credentials are never passed through this module: botocore (and gcsfs/adlfs) read the standard
variables, profiles or instance roles themselves, so the options built here, which may be logged, hold
only endpoints, regions and profile names.

Filesystems are cached per process (the cache key starts with ``os.getpid()``): s3fs refuses to be
used across ``fork`` (DataLoader workers, Ray workers), so a child builds its own on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import IO, Any

log = logging.getLogger(__name__)

LOCAL_PROTOCOLS = ("file", "local")
# scheme → (fsspec protocol, package that provides it)
_PROTOCOLS: dict[str, tuple[str, str | None]] = {
    "file": ("file", None),
    "local": ("file", None),
    "memory": ("memory", None),
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gs", "gcsfs"),
    "gcs": ("gs", "gcsfs"),
    "az": ("abfs", "adlfs"),
    "abfs": ("abfs", "adlfs"),
    "abfss": ("abfs", "adlfs"),
}
# Variables whose values decide which credentials a filesystem holds. Only a hash of them enters the
# cache key, so a change of credentials builds a new filesystem and no secret is kept in the key.
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_KEY",
)
CREDENTIAL_VARS = (*_CREDENTIAL_VARS, "AWS_SECURITY_TOKEN")
# Non-secret variables that worker processes on other nodes need to reach the same store.
WORKER_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "GOOGLE_CLOUD_PROJECT",
    "AZURE_STORAGE_ACCOUNT_NAME",
)
_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "connection_string", "sas")

# Every object-store call has connect and read timeouts and a bounded number of retries (then a
# ValueError naming the endpoint): a hung endpoint must fail a scheduled run, not stall it for hours.
TIMEOUT_ENV = {"connect": "PIPELINE_STORAGE_CONNECT_TIMEOUT_S", "read": "PIPELINE_STORAGE_READ_TIMEOUT_S",
               "retries": "PIPELINE_STORAGE_RETRIES"}
_TIMEOUT_DEFAULTS = {"connect": 10.0, "read": 60.0, "retries": 3}


def timeouts() -> dict[str, float]:
    """{"connect": s, "read": s, "retries": n} from the environment (defaults 10 s, 60 s, 3)."""
    out: dict[str, float] = {}
    for key, var in TIMEOUT_ENV.items():
        raw = os.environ.get(var)
        try:
            value = float(raw) if raw not in (None, "") else _TIMEOUT_DEFAULTS[key]
        except ValueError:
            raise ValueError(f"{var}={raw!r}: expected a number") from None
        low = 0 if key == "retries" else 1e-3
        if not low <= value < float("inf"):
            raise ValueError(f"{var}={raw!r}: expected a finite number >= {low:g}")
        out[key] = int(value) if key == "retries" else value
    return out


_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def split_scheme(uri: str) -> tuple[str, str]:
    """Return (scheme, rest); plain paths have scheme 'file' and rest the absolute local path."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"uri={uri!r}: expected a non-empty string (a path or scheme://...)")
    if "://" not in uri:
        return "file", os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme not in _PROTOCOLS:
        raise ValueError(f"uri={uri!r}: scheme {scheme!r} not supported; allowed: {sorted(_PROTOCOLS)}")
    if _PROTOCOLS[scheme][0] == "file":
        return "file", os.path.abspath(os.path.expanduser(rest or "/"))
    if _PROTOCOLS[scheme][0] == "memory":
        return "memory", "/" + rest.lstrip("/")
    if not rest.strip("/"):
        raise ValueError(f"uri={uri!r}: no bucket named; write {scheme}://BUCKET/path")
    return scheme, rest.strip("/")


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return split_scheme(uri)[0] == "file"


def storage_options_from_env(uri: str) -> dict:
    """fsspec options for `uri` taken from the environment; holds no secrets, so it may be logged."""
    scheme, _ = split_scheme(uri)
    protocol = _PROTOCOLS[scheme][0]
    options: dict[str, Any] = {}
    if protocol == "s3":
        client_kwargs: dict[str, str] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        # The region is left to botocore (AWS_REGION / AWS_DEFAULT_REGION / profile): passed here, s3fs
        # would also send it as a LocationConstraint, which us-east-1 rejects.
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        t = timeouts()
        # botocore's own retries (standard mode, total attempts) bound every call; s3fs's retry loop
        # on top is set to one attempt in _make_fs so that the two do not multiply.
        options["config_kwargs"] = {"connect_timeout": t["connect"], "read_timeout": t["read"],
                                    "retries": {"total_max_attempts": int(t["retries"]) + 1,
                                                "mode": "standard"}}
        if os.environ.get("AWS_PROFILE"):
            options["profile"] = os.environ["AWS_PROFILE"]
    elif protocol == "gs":
        if os.environ.get("GOOGLE_CLOUD_PROJECT"):
            options["project"] = os.environ["GOOGLE_CLOUD_PROJECT"]
    elif protocol == "abfs" and os.environ.get("AZURE_STORAGE_ACCOUNT_NAME"):
        options["account_name"] = os.environ["AZURE_STORAGE_ACCOUNT_NAME"]
    return options


def redact(options: Any) -> Any:
    """A copy of `options` with every value under a secret-looking key replaced by '***'."""
    if isinstance(options, dict):
        return {
            k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) and k != "endpoint_url" else redact(v)
            for k, v in options.items()
        }
    return options


def worker_env() -> dict[str, str]:
    """The non-secret storage variables set here, for Ray runtime_env of workers on other nodes."""
    return {k: os.environ[k] for k in WORKER_ENV_VARS if os.environ.get(k)}


def _credentials_digest() -> str:
    h = hashlib.sha256()
    for k in _CREDENTIAL_VARS:
        h.update(f"{k}={os.environ.get(k, '')}\0".encode())
    return h.hexdigest()


def get_fs(uri: str) -> tuple[Any, str]:
    """(filesystem, path inside it) for `uri`; one filesystem per process, options and credentials."""
    scheme, path = split_scheme(uri)
    protocol, package = _PROTOCOLS[scheme]
    options = storage_options_from_env(uri)
    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True), _credentials_digest())
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _make_fs(protocol, package, options)
            # Drop filesystems inherited from a parent process: they must never be used here.
            for k in [k for k in _cache if k[0] != os.getpid()]:
                del _cache[k]
            _cache[key] = fs
            log.debug("new %s filesystem in pid %d, options %s", protocol, os.getpid(), redact(options))
    return fs, path


def _make_fs(protocol: str, package: str | None, options: dict) -> Any:
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise ValueError(
            f"{protocol}:// needs the {package} package, which is not installed (pip install {package})"
        ) from e
    if protocol in ("file", "memory"):
        return cls()
    # skip_instance_cache: fsspec's own instance cache is shared across fork; ours is keyed on the pid.
    fs = cls(skip_instance_cache=True, **options)
    if protocol == "s3":
        fs.retries = 1  # botocore retries (config_kwargs); s3fs's loop would multiply the wait by 5
    return fs


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI with '/', keeping its scheme."""
    out = uri.rstrip("/") if uri.rstrip("/") else uri
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}" if not out.endswith("/") else out + p
    return out


def parent(uri: str) -> str:
    """The URI of the folder holding `uri`."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(os.path.expanduser(uri)).rstrip("/"))


def basename(uri: str) -> str:
    """The last path component of `uri`."""
    return posixpath.basename(uri.rstrip("/"))


def _translate(e: BaseException, uri: str, action: str) -> BaseException:
    """A ValueError naming the URI and the likely cause for storage errors a researcher can fix."""
    name = type(e).__name__
    scheme, path = split_scheme(uri)
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"):
        return ValueError(
            f"{action} {uri}: no credentials found for {scheme}://; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
                "ServerTimeoutError", "TimeoutError", "FSTimeoutError", "ClientConnectorError"):
        endpoint = storage_options_from_env(uri).get("client_kwargs", {}).get("endpoint_url", "the default")
        t = timeouts()
        return ValueError(
            f"{action} {uri}: cannot reach the storage endpoint {endpoint} ({name}: {e}); gave up after "
            f"{t['retries'] + 1} attempts with connect/read timeouts of {t['connect']:g}/{t['read']:g} s "
            f"({TIMEOUT_ENV['connect']}, {TIMEOUT_ENV['read']}, {TIMEOUT_ENV['retries']})")
    if isinstance(e, PermissionError) or (name == "ClientError" and "AccessDenied" in str(e)):
        return ValueError(f"{action} {uri}: access denied ({e})")
    if isinstance(e, FileNotFoundError) and "bucket" in str(e).lower():
        bucket = path.split("/", 1)[0]
        return ValueError(f"{action} {uri}: bucket {bucket!r} does not exist")
    if isinstance(e, FileNotFoundError) and uri not in str(e):
        return FileNotFoundError(f"{action} {uri}: not found")
    return e


@contextlib.contextmanager
def storage_errors(uri: str, action: str = "accessing") -> Iterator[None]:
    """Re-raise missing-bucket / missing-credential / permission errors as ValueErrors naming `uri`.

    A missing object stays a FileNotFoundError (now naming `uri`), so callers can still catch it.
    """
    try:
        yield
    except ValueError:
        raise
    except Exception as e:
        translated = _translate(e, uri, action)
        if translated is e:
            raise
        raise translated from e


def exists(uri: str) -> bool:
    """True when an object or folder is at `uri`."""
    fs, path = get_fs(uri)
    with storage_errors(uri, "checking"):
        return bool(fs.exists(path))


def open_uri(uri: str, mode: str = "rb", **kwargs: Any) -> IO:
    """Open `uri` through fsspec (not atomic for writes: use `atomic_write` for anything others read)."""
    fs, path = get_fs(uri)
    if any(c in mode for c in "wa") and is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with storage_errors(uri, "opening"):
        return fs.open(path, mode, **kwargs)


def read_bytes(uri: str) -> bytes:
    """The whole object at `uri`."""
    fs, path = get_fs(uri)
    with storage_errors(uri, "reading"):
        return fs.cat_file(path)


def _tmp_path(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary key beside `uri`, then move it into place; on error nothing reaches `uri`."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode={mode!r}: atomic_write allows 'wb' or 'w'")
    fs, path = get_fs(uri)
    tmp = _tmp_path(path)
    if is_local(uri):
        with storage_errors(uri, "writing"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
                yield f
            os.replace(tmp, path)  # atomic rename, also over an existing file
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    # Object stores: s3fs commits whatever was buffered when a file is closed, even after an exception,
    # so the caller writes into a local spool and nothing is sent until the block has succeeded.
    with tempfile.SpooledTemporaryFile(max_size=64 << 20, mode="w+b") as spool:
        f: IO = spool if mode == "wb" else io.TextIOWrapper(spool, encoding="utf-8", write_through=True)
        yield f
        f.flush()
        spool.seek(0)
        try:
            with storage_errors(uri, "writing"):
                with fs.open(tmp, "wb") as out:
                    shutil.copyfileobj(spool, out, 8 << 20)
                # Server-side copy then delete: the final key appears whole or not at all.
                fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(tmp)
            raise
        finally:
            if hasattr(fs, "invalidate_cache"):
                fs.invalidate_cache(posixpath.dirname(path))
            if mode == "w":
                f.detach()


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically."""
    with atomic_write(uri, "wb") as f:
        f.write(data)


def read_json(uri: str) -> Any:
    """Parse the JSON object at `uri`."""
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e})") from e


def write_json(uri: str, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `uri` atomically."""
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def listdir(uri: str) -> list[str]:
    """Sorted names (not URIs) directly under `uri`; [] when nothing is there."""
    fs, path = get_fs(uri)
    with storage_errors(uri, "listing"):
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    own = path.rstrip("/")
    return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries if str(e).rstrip("/") != own})


def find(uri: str) -> list[str]:
    """Sorted URIs of every file below the folder `uri` (recursive); [] when nothing is there."""
    fs, path = get_fs(uri)
    scheme = split_scheme(uri)[0]
    with storage_errors(uri, "listing"):
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(path)
        try:
            found = fs.find(path)
        except FileNotFoundError:
            return []
    if scheme == "file":
        # Answer in the caller's spelling: file:// URIs for file:// folders, plain paths otherwise.
        return sorted(f"file://{p}" for p in found) if "://" in uri else sorted(found)
    if scheme == "memory":
        return sorted(f"memory://{p.lstrip('/')}" for p in found)
    return sorted(f"{scheme}://{p}" for p in found)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete the object (or, with recursive=True, the folder) at `uri`; missing is not an error."""
    fs, path = get_fs(uri)
    with storage_errors(uri, "removing"), contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(posixpath.dirname(path))


TMP_MARK = ".tmp-"


def remove_temp_objects(uri: str) -> list[str]:
    """Remove the temporary keys `atomic_write` leaves behind when a writer is killed mid-upload
    (`.{name}.tmp-{hex}`) anywhere under the folder `uri`; returns the URIs removed. Only for a stage
    rerunning into its own output folder, where no other writer is active."""
    if not exists(uri):
        return []
    removed = []
    for child in find(uri):
        name = basename(child)
        if name.startswith(".") and TMP_MARK in name:
            with contextlib.suppress(FileNotFoundError):
                remove(child)
            removed.append(child)
    if removed:
        log.info("removed %d orphan temporary object(s) under %s", len(removed), uri)
    return removed


def sha256(uri: str, chunk_size: int = 8 << 20) -> str:
    """Hex sha256 of the object at `uri`, streamed."""
    h = hashlib.sha256()
    with open_uri(uri, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def check_writable(uri: str) -> None:
    """Raise a ValueError naming `uri` unless a small object can be written and removed under it."""
    scheme, path = split_scheme(uri)
    if scheme == "file":
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ValueError(f"destination {uri}: {probe} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ValueError(f"destination {uri}: {probe} is not writable")
        # os.access says yes to root everywhere (even /proc): write and delete a real file.
        try:
            fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=probe)
            os.close(fd)
            os.unlink(name)
        except OSError as e:
            raise ValueError(f"destination {uri}: {probe} cannot be written ({e})") from None
        return
    if scheme != "memory":
        bucket = path.split("/", 1)[0]
        if not bucket:
            raise ValueError(f"destination {uri}: no bucket named")
    probe_uri = join(uri, f".write-probe-{uuid.uuid4().hex[:12]}")
    try:
        with storage_errors(uri, "writing to"):
            write_bytes(probe_uri, b"")
            remove(probe_uri)
    except ValueError as e:
        # Name the destination the caller gave, not the probe object.
        raise ValueError(str(e).replace(f"writing {probe_uri}", f"destination {uri}")) from e
