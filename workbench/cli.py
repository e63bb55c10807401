"""The ``workbench`` command. Each module that offers a subcommand defines ``register_cli(subparsers)``;
this file only collects them, so a new command lives beside the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError

# modules that register subcommands, in the order they appear in --help
COMMAND_MODULES = ("data", "diagnostics", "train", "sweep", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="RIS covariance-learning workbench")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"workbench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"workbench.{name}":
                continue  # not written yet
            raise
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
