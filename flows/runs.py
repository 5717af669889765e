"""What a flow run needs from Prefect to place itself: its identity (for root templates and the lease
owner) and the deployments' concurrency limit. The logic itself lives in `pipeline.runs` and
`pipeline.lease`."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from pipeline.lease import DEFAULT_TTL_S, default_owner
from pipeline.runs import RunIdentity

# Deployments of the pipeline run one at a time: a run scheduled while another is still running waits
# for it (ENQUEUE) or is cancelled at once (CANCEL_NEW), as the deployment says.
COLLISION_STRATEGIES = ("ENQUEUE", "CANCEL_NEW")


def current_run() -> RunIdentity:
    """This flow run's scheduled start, id and deployment name, read once from Prefect's runtime."""
    from prefect.runtime import deployment, flow_run

    start = flow_run.scheduled_start_time
    if not isinstance(start, dt.datetime):  # outside a flow run: now
        start = dt.datetime.now(dt.timezone.utc)
    return RunIdentity(scheduled_start=start, flow_run_id=str(flow_run.id or "local"),
                       deployment=deployment.name or None)


def run_owner(run: RunIdentity) -> str:
    """The lease owner's name as other runs will read it in their refusal."""
    from prefect.runtime import flow_run

    dep = f" of deployment {run.deployment}" if run.deployment else ""
    return default_owner(f"flow run {flow_run.name or '?'} ({run.flow_run_id}){dep}")


def lease_ttl_s() -> float:
    """The lease expiry (PIPELINE_LEASE_TTL_S; renewed every third of it while the run lives)."""
    raw = os.environ.get("PIPELINE_LEASE_TTL_S", "")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise ValueError(f"PIPELINE_LEASE_TTL_S must be a number of seconds, got {raw!r}") from None
    if not ttl > 0:
        raise ValueError(f"PIPELINE_LEASE_TTL_S must be > 0 seconds, got {raw!r}")
    return ttl


def concurrency_limit(collision_strategy: str = "ENQUEUE") -> Any:
    """One run at a time for a deployment, with `collision_strategy` for the runs that arrive meanwhile."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    name = collision_strategy.upper().replace("-", "_")
    if name not in COLLISION_STRATEGIES:
        raise ValueError(f"collision strategy must be one of {COLLISION_STRATEGIES}, "
                         f"got {collision_strategy!r}")
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy(name))


__all__ = ["COLLISION_STRATEGIES", "concurrency_limit", "current_run", "lease_ttl_s", "run_owner"]
