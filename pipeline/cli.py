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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"diffusion-pipeline {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
