"""``workbench diagnose``: the command line of :func:`workbench.diagnostics.gradient_report`.

Owns: the flags, the printed summary or JSON, and the exit code (1 when the total's value or gradient is
non-finite). Must not: compute gradients itself.
"""

from __future__ import annotations

import argparse
import math

from ..config import PRESETS, parse_overrides, preset
from ..diagnostics import gradient_report
from ..figures.gradients import format_report
from ..io import dumps_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="one forward/backward pass: gradient norms per group and term, NaN provenance; "
                                        "exit code 1 when the total's value or gradient is non-finite",
                       description="One forward/backward pass under a preset: gradient norms per parameter group and loss term, "
                                   "and where a NaN came from. Exit code 1 when a term in the total (non-zero weight) has a non-finite "
                                   "value or gradient, 0 otherwise (a term of weight 0 does not count).")
    p.add_argument("--preset", default="recommended", choices=PRESETS, metavar="PRESET",
                   help=f"base config, one of {', '.join(PRESETS)} (default recommended)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="override a field, e.g. --set fixes.gap_backend svd (value parsed as JSON when possible)")
    p.add_argument("--n", type=int, default=16, help="scenes in the batch (default 16)")
    p.add_argument("--json", action="store_true", help="print the raw record as strict JSON instead of the summary")
    p.set_defaults(func=_cli_diagnose)


def total_is_finite(report: dict) -> bool:
    """True unless the total's loss or gradient is non-finite, or a term in the total (non-zero weight) has a
    non-finite value or gradient (a provenance record with ``in_total``)."""
    return (bool(report["ok"]) and math.isfinite(report["loss"])
            and not any(r.get("in_total") for r in report["provenance"]))


def _cli_diagnose(args: argparse.Namespace) -> int:
    cfg = preset(args.preset, **parse_overrides(args.set))
    report = gradient_report(cfg, n=args.n)
    if args.json:
        print(dumps_json(report), end="")
    else:
        print(f"workbench diagnose: preset {args.preset}" + "".join(f", {k}={v}" for k, v in args.set) + f", {args.n} scenes, N = {cfg.system.N}")
        print(format_report(report))
    return 0 if total_is_finite(report) else 1
