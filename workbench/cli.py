"""The ``workbench`` command: collects the subcommands that the modules owning each concern define.

Each module below defines ``register_cli(subparsers)`` beside the code it runs; this file lists them in the
order of ``--help`` and turns a :class:`~workbench.config.ConfigError` into a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys

from . import data, diagnostics, report, sweep, train
from .config import ConfigError
from .studies import compare, seed_note

COMMAND_MODULES = (data, seed_note, diagnostics, train, compare, sweep, report)  # in the order of --help


class _Parser(argparse.ArgumentParser):
    """argparse, except that a value that looks like a negative number or a list of numbers ("-10,0", "-1e-3")
    is a value, not an unknown option: ``-p snrs_db -10,0`` and ``--set system.snr_db_min -5`` work. Subparsers
    inherit the class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d)[\d.,eE+-]*$")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="RIS covariance-learning workbench")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register_cli(sub)
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
