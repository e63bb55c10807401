"""The ``workbench`` command. Each module that offers a subcommand defines ``register_cli(subparsers)``;
this file only collects them, so a new command lives beside the code it runs."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from .config import ConfigError

# modules that register subcommands, in the order they appear in --help
COMMAND_MODULES = ("data", "diagnostics", "train", "sweep", "report")


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false, lists, objects), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(pairs: list[list[str]]) -> dict[str, Any]:
    """``--set KEY VALUE`` pairs as a dict of dotted keys to parsed values."""
    return {key: parse_value(value) for key, value in pairs}


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
