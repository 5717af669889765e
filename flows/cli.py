"""`diffusion-pipeline run` (the end-to-end flow) and `serve` (a cron-scheduled deployment)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def _flow_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {"source": args.source, "root": args.root, "preset": args.preset,
              "train_steps": args.train_steps, "batch_size": args.batch_size, "workers": args.workers,
              "gpus_per_worker": args.gpus_per_worker,
              "n_samples": args.n_samples, "sampler": args.sampler, "sample_steps": args.sample_steps,
              "guidance": args.guidance, "seed": args.seed}
    for item in args.param:
        key, _, value = item.partition("=")
        if not _:
            raise ValueError(f"--param wants key=value, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _add_flow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="digits",
                   help="'digits' (embedded), an image folder, .npz, or CIFAR tarball")
    p.add_argument("--root", default=os.environ.get("PIPELINE_ROOT") or "artifacts/run",
                   help="where every artifact goes (path, file://, s3://...; default $PIPELINE_ROOT)")
    p.add_argument("--preset", default="tiny-digits")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--n-samples", type=int, default=500)
    p.add_argument("--sampler", default="heun")
    p.add_argument("--sample-steps", type=int, default=32)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight w")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other flow parameter (JSON values), e.g. --param likelihood_samples=64")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the end-to-end Prefect flow: shard → train → sample → FID → bits/dim")
    _add_flow_args(p)
    p.add_argument("--server", choices=("local", "env", "temporary"), default="env",
                   help="local: start or reuse a Prefect server with its UI on 127.0.0.1:4200; env: use "
                        "PREFECT_API_URL (a temporary server when unset); temporary: always a temporary one")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray without its dashboard")
    p.set_defaults(func=_run)

    p = sub.add_parser("serve", help="serve the end-to-end flow as a cron-scheduled deployment (blocks)")
    _add_flow_args(p)
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    p.add_argument("--name", default="diffusion-pipeline-scheduled")
    p.add_argument("--timezone", default="UTC")
    p.set_defaults(func=_serve)


def _run(args: argparse.Namespace) -> int:
    from .server import check_prefect_api, ensure_local_server, start_local_ray

    params = _flow_params(args)
    ui = None
    if args.server == "local":
        ui = ensure_local_server()
    elif args.server == "env":
        api = check_prefect_api()
        ui = api[: -len("/api")] if api and api.rstrip("/").endswith("/api") else api
    else:
        os.environ.pop("PREFECT_API_URL", None)
    dashboard = start_local_ray(dashboard=not args.no_dashboard)
    if dashboard:
        params["ray_dashboard"] = dashboard
    from .pipeline import diffusion_pipeline

    state = diffusion_pipeline(**params, return_state=True)
    from pipeline import storage

    print()
    if ui:
        print(f"Prefect UI:   {ui}  (flow run {state.state_details.flow_run_id})")
    if dashboard:
        print(f"Ray dashboard: {dashboard}")
    if not state.is_completed():
        print(f"flow run ended {state.name}: {state.message}")
        return 1
    print(f"report:       {storage.join(params['root'], 'report.md')}")
    print(storage.read_bytes(storage.join(params["root"], "report.md")).decode())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .pipeline import diffusion_pipeline

    deployment_kwargs = cron_deployment_kwargs(args.cron, args.timezone)
    diffusion_pipeline.serve(name=args.name, parameters=_flow_params(args), **deployment_kwargs)
    return 0


def cron_deployment_kwargs(cron: str, timezone: str = "UTC") -> dict[str, Any]:
    """A validated cron schedule for `flow.serve` / `flow.to_deployment`."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except Exception as e:  # pydantic's error names the problem; we name the flag
        raise ValueError(f"--cron {cron!r} (timezone {timezone!r}) is not a valid cron schedule: {e}") from e
    return {"schedules": [schedule]}
