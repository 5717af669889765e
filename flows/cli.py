"""`diffusion-pipeline run` (the end-to-end flow) and `serve` (a cron-scheduled deployment)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

_GROUPS = {"train": ("train_steps:steps", "batch_size", "workers", "gpus_per_worker", "xflip", "slice_steps"),
           "evaluate": ("n_samples", "sampler", "sample_steps", "guidance")}


def _flow_params(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's parameters from the command line: flags fill the groups, and `--param` sets any
    parameter, `group.field=value` one field of a group (JSON values)."""
    params: dict[str, Any] = {"source": args.source, "root": args.root, "preset": args.preset,
                              "seed": args.seed, "mode": args.mode}
    for group, fields in _GROUPS.items():
        params[group] = {}
        for spec in fields:
            flag, _, name = spec.partition(":")
            params[group][name or flag] = getattr(args, flag)
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param wants key=value or group.field=value, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        group, dot, field = key.partition(".")
        if dot:
            params.setdefault(group, {})[field] = parsed
        else:
            params[key] = parsed
    _check_params(params)
    return params


def _check_params(params: dict[str, Any]) -> None:
    """Every parameter against the flow's signature and groups, before Prefect or Ray starts."""
    import inspect

    import pydantic

    from pipeline.runs import MODES, template_fields

    from .params import EvalParams, SweepParams, TrainParams
    from .pipeline import diffusion_pipeline

    known = set(inspect.signature(diffusion_pipeline.fn).parameters)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"--param: unknown flow parameter(s) {unknown}; allowed: {sorted(known)}")
    template_fields(str(params.get("root", "")))  # an unknown {field} fails here, before the run
    if params.get("mode", "fresh") not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {params['mode']!r}")
    for group, model in (("train", TrainParams), ("evaluate", EvalParams), ("sweep", SweepParams)):
        try:
            model(**params.get(group, {}))
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{group}.{field}: {err['msg']} (got {err.get('input')!r})") from None


def _add_flow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="digits",
                   help="'digits' (embedded), an image folder, .npz, or CIFAR tarball")
    p.add_argument("--root", default=os.environ.get("PIPELINE_ROOT") or "artifacts/run",
                   help="where every artifact goes (path, file://, s3://...; default $PIPELINE_ROOT); a "
                        "template resolved per run, e.g. s3://bucket/runs/{deployment}/{date}: fields "
                        "{date} {time} {datetime} {flow_run_id} {deployment}")
    p.add_argument("--mode", choices=("fresh", "continue"), default="fresh",
                   help="fresh: train from scratch into this run's root; continue: advance the newest run "
                        "of the root's series by --slice-steps steps, then evaluate it")
    p.add_argument("--slice-steps", type=int, default=1000, help="steps per run in --mode continue")
    p.add_argument("--preset", default="tiny-digits")
    from .params import EvalParams, TrainParams

    t, e = TrainParams(), EvalParams()  # the flags' defaults are the flow's own
    p.add_argument("--train-steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--workers", type=int, default=t.workers, help="Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, default=t.gpus_per_worker)
    p.add_argument("--n-samples", type=int, default=e.n_samples)
    p.add_argument("--sampler", default=e.sampler)
    p.add_argument("--sample-steps", type=int, default=e.sample_steps)
    p.add_argument("--guidance", type=float, default=e.guidance,
                   help="classifier-free guidance weight w of the evaluated samples (the sweep covers "
                        "the others)")
    p.add_argument("--xflip", action="store_true",
                   help="random horizontal flips (refused on data whose manifest says mirroring changes "
                        "the class)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other flow parameter (JSON values), e.g. --param evaluate.likelihood_samples=64 "
                        "or --param sweep.weights=[0,2]")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the end-to-end Prefect flow: shard → train → sample → FID → bits/dim")
    _add_flow_args(p)
    p.add_argument("--server", choices=("local", "env", "temporary"), default="env",
                   help="local: start or reuse a Prefect server with its UI on 127.0.0.1:4200; env: use "
                        "PREFECT_API_URL (a temporary server when unset); temporary: always a temporary one")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray without its dashboard")
    p.add_argument("--require-gates", action="store_true",
                   help="exit 1 when a quality gate of the report fails (FID against its floor, class "
                        "accuracy, bits/dim)")
    p.set_defaults(func=_run)

    p = sub.add_parser("serve", help="serve the end-to-end flow as a cron-scheduled deployment (blocks)")
    _add_flow_args(p)
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *"')
    p.add_argument("--name", default="diffusion-pipeline-scheduled")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--collision", choices=("enqueue", "cancel-new"), default="enqueue",
                   help="one run at a time: a run due while another runs waits (enqueue) or is cancelled")
    p.set_defaults(func=_serve)


def _run(args: argparse.Namespace) -> int:
    from .server import check_prefect_api, ensure_local_server, start_local_ray

    params = _flow_params(args)
    from pipeline.preflight import check_run  # every stage's options, before Prefect, Ray or sharding

    from .params import EvalParams, SweepParams, TrainParams
    groups = {"train": TrainParams, "evaluate": EvalParams, "sweep": SweepParams}
    check_run({**params, **{g: m(**params.get(g, {})).model_dump() for g, m in groups.items()}})
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
    from pipeline.layout import RunLayout

    print()
    if ui:
        print(f"Prefect UI:   {ui}  (flow run {state.state_details.flow_run_id})")
    if dashboard:
        print(f"Ray dashboard: {dashboard}")
    if not state.is_completed():
        print(f"flow run ended {state.name}: {state.message}")
        return 1
    layout = RunLayout(state.result()["root"])  # the root the template resolved to
    print(f"report:       {layout.report}")
    print(storage.read_bytes(layout.report).decode())
    failed = [v for v in storage.read_json(layout.summary).get("verdicts", []) if not v["passed"]]
    if args.require_gates and failed:
        print(f"{len(failed)} quality gate(s) failed: {', '.join(v['name'] for v in failed)}")
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .pipeline import diffusion_pipeline
    from .runs import concurrency_limit

    deployment_kwargs = cron_deployment_kwargs(args.cron, args.timezone)
    diffusion_pipeline.serve(name=args.name, parameters=_flow_params(args),
                             global_limit=concurrency_limit(args.collision), **deployment_kwargs)
    return 0


def cron_deployment_kwargs(cron: str, timezone: str = "UTC") -> dict[str, Any]:
    """A validated cron schedule for `flow.serve` / `flow.to_deployment`."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except Exception as e:  # pydantic's error names the problem; we name the flag
        raise ValueError(f"--cron {cron!r} (timezone {timezone!r}) is not a valid cron schedule: {e}") from e
    return {"schedules": [schedule]}
