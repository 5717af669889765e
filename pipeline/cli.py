"""The `diffusion-pipeline` command: one subcommand per stage, plus `demo`.

Each stage module exposes `add_parser(subparsers)`, which registers its subcommand and sets
`func(args) -> int`. Modules are imported only when the command line is parsed, so a stage's
heavy imports (ray, prefect, s3fs) cost nothing to the others.
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
    "flows.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
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
