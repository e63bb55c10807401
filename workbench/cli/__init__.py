"""The ``workbench`` command: one module per subcommand group, and the one error path.

Owns: the parser (:func:`build_parser`; :data:`COMMAND_MODULES` lists the subcommand modules in the order of
``--help``, each defining ``register(subparsers)``), the global flags ``--version`` and ``--debug``, and how an
error reaches the user (:func:`main`): a :class:`~workbench.config.ConfigError` becomes one line
``workbench COMMAND: error: MESSAGE`` and exit code 2; an :class:`OSError` (permission denied, no space left, a
file where a folder is expected, ...) one line naming what failed, the path and what to do, and exit code 1.
``--debug`` (before the subcommand) re-raises either, so the traceback shows. Must not: compute anything; the
modules of the package outside ``workbench/cli/`` never import argparse (their functions take data, not
``args``).
"""

from __future__ import annotations

import argparse
import errno
import re
import sys

from ..config import ConfigError
from . import compare, data, diagnose, localiser, report, runs, seed_table, sweep, tables, train

COMMAND_MODULES = (data, seed_table, tables, diagnose, train, compare, localiser, sweep, report, runs)  # in the order of --help

# a value, not an option: a negative number or list of numbers ("-5", "-1e-3", "-10,0"), or -inf / -Infinity / -nan
NEGATIVE_NUMBER = re.compile(r"^-((\d|\.\d)[\d.,eE+-]*|inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse, except that a value that looks like a negative number, a list of numbers ("-10,0", "-1e-3") or a
    negative infinity ("-inf", "-Infinity") is a value, not an unknown option: ``-p snrs_db -10,0`` and
    ``--set system.snr_db_min -5`` work, and ``--set system.snr_db_min -inf`` reaches the config's refusal of
    non-finite values. Subparsers inherit the class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER


def _version() -> str:
    import torch

    from .. import __version__

    return f"workbench {__version__} (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="RIS covariance-learning workbench")
    parser.add_argument("--version", action="store_true", help="print the workbench and torch versions and exit")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line (give it before the command: workbench --debug train ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


# what to do about an OSError, by errno; {flag} is the command's --out (or "path")
_OS_ADVICE = {
    errno.EACCES: "check the folder's permissions or choose another {flag}",
    errno.EPERM: "check the folder's permissions or choose another {flag}",
    errno.EROFS: "the file system is read-only: choose another {flag}",
    errno.ENOSPC: "free some disk space or choose another {flag}",
    errno.EDQUOT: "free some of your disk quota or choose another {flag}",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another {flag}",
    errno.EISDIR: "it is a folder where a file is expected: give a file's path",
    errno.EEXIST: "it is in the way: move it or choose another {flag}",
    errno.ENOENT: "check the path (a folder on it does not exist)",
    errno.ENAMETOOLONG: "choose a shorter {flag}",
}


def os_error_message(e: OSError, flag: str = "path") -> str:
    """One line for an OSError: what failed (its strerror), the path(s) (``e.filename``, ``e.filename2``) and what
    to do (by errno; ``flag`` names the option to change, e.g. "--out")."""
    what = e.strerror or str(e) or type(e).__name__
    path = "" if e.filename is None else f" {str(e.filename)!r}"
    if e.filename2 is not None:
        path += f" -> {str(e.filename2)!r}"
    advice = _OS_ADVICE.get(e.errno, "check the path and the disk").format(flag=flag)
    return f"{what}:{path} ({type(e).__name__}); {advice}" if path else f"{what} ({type(e).__name__}); {advice}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version())
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug:
            raise
        flag = "--out" if hasattr(args, "out") else "path"
        print(f"workbench {args.command}: error: {os_error_message(e, flag)} (--debug shows the traceback)", file=sys.stderr)
        return 1
