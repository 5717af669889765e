"""The one adapter between the pipeline and Ray: connect, fan out, storage, cluster fit, Tune.

Every stage that runs on Ray goes through here (Ray Train's own worker code lives in
`training/ray_train.py`, the only other module that imports `ray`). What it holds, and why in one place:

* `connect()` / `session()`: connect to `RAY_ADDRESS` (checked to answer within a timeout first, so an
  unreachable address fails in seconds with its name instead of retrying forever) or start a local
  cluster bound to 127.0.0.1; `session()` shuts down only a cluster it started.
* `fan_out(fn, items)`: run `fn(item)` as Ray tasks, shipping the driver's non-secret storage settings
  with each task (credentials never travel: each node finds its own), and re-raising a task's own
  exception instead of Ray's wrapper.
* `absolute(uri)` and `ray_storage(uri)`: workers run elsewhere, so local paths must be absolute, and
  Ray's run storage must use the same fsspec filesystem (endpoint, options) as `storage.py`.
* `concurrent_trials(need, ...)`: how many trials of a given size fit the cluster, checked before any
  trial starts.
* Tune: `tune_fit`, `saved_settings`, `restore_name`, `experiment_path`, `report`, `trial_id`,
  `search_dim`, `train_report_callback`. Nothing here restores Tune's pickled state (see
  `saved_settings`): searches and sweeps keep their own state as JSON and a restore re-runs the
  points that have no result.
* The placement-group workaround: a Tune trial stopped by ASHA is killed with its Train controller,
  which cannot remove its workers' placement group (Ray's cleaner needs the dashboard's state API). A
  step hook records the group under the trial folder and a Tune callback removes it.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

from . import storage

ADDRESS_ENV = "RAY_ADDRESS"
AUTH_MODE_ENV, AUTH_TOKEN_ENV, AUTH_TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
CONNECT_TIMEOUT_S = float(os.environ.get("PIPELINE_RAY_CONNECT_TIMEOUT_S", "15"))
PLACEMENT_FILE = "placement_group.json"
TUNE_DIR = "tune"


# ---- connecting ---------------------------------------------------------------------------------


def absolute(uri: str) -> str:
    """Workers run in other working directories (and on other nodes): local paths must be absolute."""
    return storage.split_scheme(uri)[1] if storage.is_local(uri) else uri


def check_address(address: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """`RAY_ADDRESS` (or `address`) when a cluster answers there within `timeout_s`; None when unset
    (a local cluster starts). Ray's own client retries an unreachable GCS for minutes, printing
    warnings: a scheduled run should fail in seconds with the setting to fix."""
    address = address if address is not None else os.environ.get(ADDRESS_ENV)
    if not address or address == "local":
        return None
    if address == "auto":
        return address  # ray.init resolves it and names the problem itself
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if address.startswith("ray://") else 6379)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return address
    except OSError as e:
        raise ValueError(
            f"{ADDRESS_ENV}={address} is unreachable ({host}:{port}: {e}). Start the cluster "
            "(`ray up infra/ray/cluster-aws-gpu.yaml` or `kubectl apply -f infra/k8s/raycluster.yaml`), "
            f"fix {ADDRESS_ENV}, or unset it to start a local Ray.") from e


def connect(*, log_to_driver: bool = True, dashboard: bool = False) -> bool:
    """Connect to `RAY_ADDRESS`, or start a local cluster on 127.0.0.1; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = check_address()
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, "configure_logging": False}
    if address is None:
        # A local cluster listens on loopback only, and with Ray's token authentication on: other
        # users of this machine can reach loopback too. The token is made for this cluster and
        # travels only in the environment its processes inherit (never a file, never a runtime_env).
        # Ray turns token auth on for a new local cluster unless RAY_AUTH_MODE says otherwise
        # (RAY_AUTH_MODE=disabled, set by the user, turns it off); without a token it would write one
        # to ~/.ray/auth_token.
        if os.environ.get(AUTH_MODE_ENV, "token") == "token" and not (
                os.environ.get(AUTH_TOKEN_ENV) or os.environ.get(AUTH_TOKEN_PATH_ENV)):
            import secrets

            os.environ[AUTH_TOKEN_ENV] = secrets.token_hex(32)
        _loopback_only()
        kwargs.update(include_dashboard=dashboard, _node_ip_address="127.0.0.1")
        if dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
    env = storage.worker_env()  # endpoints and regions, never secrets
    global _CONTEXT
    _CONTEXT = ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kwargs)
    return True


_CONTEXT: Any = None


def _loopback_only() -> None:
    """Make a local cluster's node address 127.0.0.1, so that GCS, raylet and workers listen on
    loopback only. `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: Ray replaces a
    loopback address by the host's routable one unless Ray clusters are "disabled", which is how it
    keeps macOS and Windows single-node clusters local (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). The
    constant is read when ray is imported, so it is set both in the environment (child processes)
    and on the imported module (this one)."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def dashboard_url() -> str | None:
    """The dashboard of the cluster `connect()` joined or started, if it has one."""
    url = getattr(_CONTEXT, "dashboard_url", None)
    return f"http://{url}" if url and "://" not in url else url


@contextlib.contextmanager
def session(**kwargs: Any) -> Iterator[None]:
    """`connect()` for the duration of a block; shuts down only a cluster this block started."""
    started = connect(**kwargs)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def is_running() -> bool:
    """True when this process is connected to Ray or `RAY_ADDRESS` names a cluster."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() or bool(os.environ.get(ADDRESS_ENV))


def cluster_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


# ---- fan-out ------------------------------------------------------------------------------------


def _call_with_env(fn: Callable[[Any], Any], env: dict[str, str], item: Any) -> Any:
    """Run fn(item) in a Ray worker after setting the driver's non-secret storage variables."""
    os.environ.update(env)
    return fn(item)


def fan_out(fn: Callable[[Any], Any], items: Sequence[Any], *, num_cpus: float = 1, num_gpus: float = 0,
            max_retries: int = 1) -> Iterator[tuple[int, Any]]:
    """Yield (position, fn(item)) as Ray tasks finish; the first failure cancels the rest and is raised
    as the task's own exception. `fn` must pickle (a module-level function or a functools.partial)."""
    import ray

    with session():
        # Endpoint and region travel with each task (a runtime_env would start fresh worker processes).
        env = storage.worker_env()
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(_call_with_env)
        refs = {remote.remote(fn, env, item): i for i, item in enumerate(items)}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for ref in done:
                    i = refs.pop(ref)
                    yield i, _unwrap(ray.get, ref)
        finally:
            for ref in refs:
                ray.cancel(ref, force=False)


def _unwrap(get: Callable[[Any], Any], ref: Any) -> Any:
    import ray

    try:
        return get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, Exception) else e) from None


# ---- storage and cluster fit --------------------------------------------------------------------


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a Ray RunConfig: a local path, or storage.py's fsspec
    filesystem (same endpoint and options) behind pyarrow with a path without its scheme (Ray refuses
    a filesystem together with an `s3://` path)."""
    if storage.is_local(uri):
        return storage.split_scheme(uri)[1], None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.get_fs(uri)
    return path, PyFileSystem(FSSpecHandler(fs))


def concurrent_trials(need: dict[str, float], *, requested: int | None = None,
                      resources: dict[str, float] | None = None, detail: str = "") -> int:
    """How many trials needing `need` (e.g. {"CPU": 1.1, "GPU": 1}) fit the cluster's `resources`
    (default: the connected cluster's) at once; `requested` above that is a ValueError."""
    if resources is None:
        resources = cluster_resources()
    need = {r: float(n) for r, n in need.items() if n > 0}
    if not need:
        raise ValueError("a trial must need some resource (CPU or GPU)")
    fits = {r: math.floor(float(resources.get(r, 0.0)) / n + 1e-9) for r, n in need.items()}
    allowed = min(fits.values())
    have = ", ".join(f"{float(resources.get(r, 0.0)):g} {r}" for r in need)
    want = ", ".join(f"{n:g} {r}" for r, n in need.items()) + (f" ({detail})" if detail else "")
    if allowed < 1:
        raise ValueError(f"one trial needs {want} but the Ray cluster has {have}")
    if requested is not None and requested > allowed:
        raise ValueError(f"max_concurrent={requested} trials, each needing {want}, do not fit the Ray "
                         f"cluster's {have}: at most {allowed} do")
    return requested or allowed


# ---- Tune ---------------------------------------------------------------------------------------


def experiment_path(out: str, name: str) -> tuple[str, Any]:
    """Tune's experiment folder (and filesystem) of a search or sweep under `out`: `{out}/tune/{name}`."""
    storage_path, fs = ray_storage(storage.join(out, TUNE_DIR))
    return f"{storage_path.rstrip('/')}/{name}", fs


def saved_settings(out: str, settings_file: str, from_dict: Callable[[dict], Any], kind: str) -> Any:
    """The settings a search or sweep saved as JSON under `out`, with `out` itself as their `out`.

    A restore never calls Ray's `Tuner.restore`: that unpickles `tuner.pkl` and the
    `CLOUDPICKLE_FALLBACK` entries of `experiment_state-*.json` from storage, so anyone able to write
    to the bucket could run code on the cluster. The project's own JSON (settings, per-trial records)
    says what is done; the caller re-runs only what is missing. The folder the restore was asked for
    wins over the one recorded (a moved or copied experiment is restored where it now is)."""
    import dataclasses

    uri = storage.join(out, settings_file)
    if not storage.exists(uri):
        raise ValueError(f"out={out}: no {settings_file}; is it the folder of a {kind}?")
    try:
        saved = storage.read_json(uri)
    except ValueError as e:
        raise ValueError(f"{uri}: not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{uri}: expected a JSON object of settings, got {type(saved).__name__}")
    try:
        settings = from_dict({**saved, "out": out})
    except TypeError as e:
        raise ValueError(f"{uri}: not the settings of a {kind} ({e})") from None
    return dataclasses.replace(settings, out=out) if dataclasses.is_dataclass(settings) else settings


def restore_name(name: str) -> str:
    """A fresh Tune experiment name for the points a restore re-runs (never Tune's saved state)."""
    import time

    return f"{name}-restore-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def trainable(fn: Callable[..., Any], resources: dict[str, float], **parameters: Any) -> Any:
    """A Tune trainable calling fn(config, **parameters) with `resources` per trial."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(fn, **parameters),
                               {k: v for k, v in resources.items() if v > 0})


def search_dim(kind: str, values: Sequence[Any]) -> Any:
    """A Tune search dimension: "grid" and "choice" over values, "uniform"/"loguniform" over [lo, hi]."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice}
    if kind in make:
        return make[kind](list(values))
    if kind in ("uniform", "loguniform"):
        return getattr(tune, kind)(*values)
    raise ValueError(f"search dimension kind must be grid, choice, uniform or loguniform, got {kind!r}")


def keep_secrets_out_of_runtime_envs() -> None:
    """Stop Ray Tune from copying the driver's credential variables into every trial's runtime_env.

    Tune adds AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the session tokens to each trainable's
    `runtime_env["env_vars"]` (`ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE`), and Ray's
    runtime-env agent writes every runtime_env in clear text to `runtime_env_agent.log`, a
    world-readable file under Ray's temp folder. Trial processes find credentials the way every Ray
    worker does here: their own environment (inherited from the raylet on a local cluster), a
    credentials file of mode 600, or the instance's identity."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(
        v for v in class_cache.ENV_VARS_TO_PROPAGATE if v not in storage.CREDENTIAL_VARS)


def tune_fit(train_fn: Any, *, param_space: dict[str, Any], out: str, name: str, metric: str, mode: str,
             max_concurrent: int, num_samples: int = 1, asha: dict[str, Any] | None = None,
             callbacks: Sequence[Any] = ()) -> Any:
    """Run a Tune experiment under `{out}/tune/{name}`; `asha`: ASHAScheduler options (time_attr "step")."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    keep_secrets_out_of_runtime_envs()
    storage_path, fs = ray_storage(storage.join(out, TUNE_DIR))
    scheduler = ASHAScheduler(time_attr="step", **asha) if asha else None
    return tune.Tuner(
        train_fn, param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                  callbacks=list(callbacks) or None, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    ).fit()


def trials_of(results: Any) -> list[Any]:
    """The Tune trials (status, config, last result) of a ResultGrid."""
    return list(results._experiment_analysis.trials)


def report(metrics: dict[str, Any]) -> None:
    from ray import tune

    tune.report(metrics)


def trial_id() -> str:
    from ray import tune

    return tune.get_context().get_trial_id()


def train_report_callback() -> Any:
    """The Ray Train callback that forwards a Train run's rank-0 reports to its Tune trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


# ---- the placement-group workaround -------------------------------------------------------------


class PlacementGroupRecorder:
    """Step hook: rank 0 writes its worker group's placement group id to `uri` once."""

    def __init__(self, uri: str) -> None:
        self.uri, self._done = uri, False

    def __call__(self, trainer: Any, x: Any, labels: Any) -> None:
        if self._done or trainer.rank != 0:
            return
        self._done = True
        from ray.util import get_current_placement_group

        pg = get_current_placement_group()
        if pg is not None:
            storage.write_json(self.uri, {"placement_group": pg.id.hex(), "pid": os.getpid()})


def release_placement_group(folder: str) -> bool:
    """Remove the placement group recorded under `folder` if it is still there; True when removed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    uri = storage.join(folder, PLACEMENT_FILE)
    if not storage.exists(uri):
        return False
    pg = PlacementGroup(PlacementGroupID.from_hex(storage.read_json(uri)["placement_group"]))
    try:
        if placement_group_table(pg).get("state", "REMOVED") == "REMOVED":
            return False
        remove_placement_group(pg)
    except Exception:  # already gone, or removed concurrently by its controller
        return False
    return True


def trial_end_callback(on_end: Callable[[str, dict[str, Any], str, dict[str, Any]], None]) -> Any:
    """A Tune callback calling on_end(trial_id, config, status, last_result) on the driver whenever
    Tune finishes a trial ("TERMINATED", also when its scheduler stopped it early) or loses it
    ("ERROR"): how searches keep their own record of what is done, as JSON."""
    from ray import tune

    class TrialEnd(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            on_end(trial.trial_id, dict(trial.config), "TERMINATED", dict(trial.last_result or {}))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            on_end(trial.trial_id, dict(trial.config), "ERROR", dict(trial.last_result or {}))

    return TrialEnd()


def release_callback(folder_of: Callable[[str], str]) -> Any:
    """A Tune callback freeing the recorded placement group of every trial Tune finished or lost;
    `folder_of(trial_id)` is where the trial's recorder wrote it."""
    return trial_end_callback(lambda trial_id, *_: release_placement_group(folder_of(trial_id)))


__all__ = [
    "ADDRESS_ENV",
    "PLACEMENT_FILE",
    "TUNE_DIR",
    "PlacementGroupRecorder",
    "absolute",
    "check_address",
    "cluster_resources",
    "concurrent_trials",
    "connect",
    "dashboard_url",
    "experiment_path",
    "fan_out",
    "is_running",
    "keep_secrets_out_of_runtime_envs",
    "ray_storage",
    "release_callback",
    "release_placement_group",
    "report",
    "restore_name",
    "saved_settings",
    "search_dim",
    "session",
    "train_report_callback",
    "trainable",
    "trial_end_callback",
    "trial_id",
    "trials_of",
    "tune_fit",
]
