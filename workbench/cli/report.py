"""``workbench report``: the command line of :mod:`workbench.report` (headless notebook runs).

Owns: the flags, ``--help-notebook``'s listing and the printed summary and exit code. Must not: run notebooks itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import parse_value
from ..report import NOTEBOOK_DIR, ci_parameters, list_notebooks, notebook_parameters, run_report, select


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="execute every notebook headless with papermill into runs/, with an index page")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this notebook (name or prefix, e.g. 03); repeatable")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="pass a parameter to the notebooks that declare it (VALUE parsed as JSON when possible; negative numbers "
                        "and lists such as -10,0 are values); --help-notebook NAME lists them")
    p.add_argument("--ci", action="store_true", help="small parameters, as in CI")
    p.add_argument("--out", default="runs", help="the runs folder (default runs/): each report is a new run folder in it, "
                                                 "report-<UTC time>/, and <out>/index.html accumulates them")
    p.add_argument("--run", metavar="NAME", help="name the report's run folder <out>/NAME instead (reused if it exists: its "
                                                 "notebooks' earlier outputs are replaced)")
    p.add_argument("--notebooks", default=str(NOTEBOOK_DIR), help="folder of the notebooks")
    p.add_argument("--help-notebook", metavar="NAME", help="list a notebook's parameters with types, defaults and meanings, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    p.set_defaults(func=_cli_report)


def _cli_report(args: argparse.Namespace) -> int:
    notebooks = list_notebooks(args.notebooks)
    if args.help_notebook:
        path = select(notebooks, [args.help_notebook], "--help-notebook")[0]
        print(f"{path.stem}: parameters (pass with -p KEY VALUE)")
        ci = ci_parameters(path.stem)
        for k, v in notebook_parameters(path).items():
            if k == "out_dir":  # the report sets it (-p refuses it): not a parameter here
                continue
            extra = f" [--ci: {ci[k]!r}]" if k in ci else ""
            print(f"  {k:<18} {v['type'] or '?':<13} default {v['default']:<14} {v['help']}{extra}")
        print("  (out_dir is set by the report: <--out>/<run>/<name>; choose the folder with --out / --run)")
        return 0
    selected = select(notebooks, args.only)
    params = {k: parse_value(v) for k, v in args.parameter}
    runs = run_report(selected, args.out, params, ci=args.ci, progress=not args.no_progress, run_name=args.run)
    for r in runs:
        print(f"{r.name}: {r.status} in {r.seconds:.1f} s (cells {sum(r.cell_seconds):.1f} s) -> {r.out_dir}/{r.notebook}")
    failed = [r for r in runs if r.status != "ok"]
    for r in failed:
        print(f"workbench report: notebook {r.name} failed in {r.where or f'cell {r.cell}'} ({r.cell_source}): {r.error}; "
              f"partial output in {r.out_dir}/{r.notebook}", file=sys.stderr)
    if runs:
        print(f"run: {Path(runs[0].out_dir).parent} (its index.html); all reports: {Path(args.out) / 'index.html'}")
    return 1 if failed else 0
