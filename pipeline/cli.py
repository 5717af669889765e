"""The `diffusion-pipeline` command: one subcommand per stage, plus `demo`.

Each stage module exposes `add_parser(subparsers)`, which registers its subcommand and sets
`func(args) -> int`. Modules are imported only when the command line is parsed, so a stage's
heavy imports (ray, prefect, s3fs) cost nothing to the others. Commands of other packages (the
Prefect flows' `run` and `serve`) register through the `diffusion_pipeline.commands` entry-point group,
so the library does not depend on the orchestrator.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# (module path) — each registers one or more subcommands.
COMMANDS: tuple[str, ...] = (
    "pipeline.demo",
    "pipeline.training.cli",
    "pipeline.models.cli",
    "pipeline.data.cli",
    "pipeline.evaluation.cli",
    "pipeline.tuning.cli",
)
PLUGIN_GROUP = "diffusion_pipeline.commands"


def _plugins() -> list[str]:
    from importlib.metadata import entry_points

    return [ep.value for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (*COMMANDS, *_plugins()):
        importlib.import_module(module).add_parser(sub)
    return parser


# Errors a user can fix (bad input, a missing file, a diverged run): one line naming the field or file,
# exit 2. Anything else is a bug in this program: its traceback is kept, under a line that says so.
EXPECTED: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                            IsADirectoryError, PermissionError)
_BAD_KWARGS = ("unexpected keyword argument", "required positional argument", "required keyword-only")


def expected_error(e: BaseException) -> BaseException | None:
    """The user-fixable error `e` is or wraps (Ray re-raises a worker's error inside its own), if any:
    the EXPECTED types, a training run that diverged, and a TypeError from options passed as keywords
    (`--loss-kwargs '{"bogus": 1}'`)."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, EXPECTED) or type(err).__name__ == "TrainingDivergedError":
            return err
        if isinstance(err, TypeError) and any(k in str(err) for k in _BAD_KWARGS):
            return err
        todo += [err.__cause__, getattr(err, "cause", None)]
        failures = getattr(err, "worker_failures", None)  # Ray Train V2's TrainingFailedError
        if isinstance(failures, dict):
            todo += list(failures.values())
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


def _check_device(args: argparse.Namespace) -> None:
    """`--device` parses as a torch device (a bad name fails here, not deep in a stage)."""
    device = getattr(args, "device", None)
    if not isinstance(device, str):
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {device!r}: not a device ({' '.join(str(e).split())}); "
                         "use cpu, cuda or cuda:N") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"diffusion-pipeline {args.command}"
    try:
        _check_device(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        known = expected_error(e)
        if known is not None:  # bad input or a fixable condition: one clear line, no traceback
            print(f"{prog}: error: {_one_line(known)}", file=sys.stderr)
            return 2
        print(f"{prog}: internal error: {type(e).__name__}: this is a bug in diffusion-pipeline; "
              "please report it with the traceback below", file=sys.stderr)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
