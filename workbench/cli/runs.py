"""``workbench runs`` and ``workbench runs diff A B``: the command line of :mod:`workbench.runs`.

Owns: the flags and the printed tables. Must not: read or compare runs itself (:mod:`workbench.runs` does).
"""

from __future__ import annotations

import argparse
import json

from ..figures import fmt
from ..runs import diff_runs, list_runs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list the runs under runs/ (time, kind, name, commit, status), or compare two: runs diff A B")
    p.add_argument("--root", default="runs", help="the folder the runs are under (default runs/)")
    p.set_defaults(func=_cli_list)
    actions = p.add_subparsers(dest="runs_command", metavar="ACTION")
    ls = actions.add_parser("list", help="list the runs (the default action)")
    ls.add_argument("--root", default="runs", help="the folder the runs are under (default runs/)")
    ls.add_argument("--kind", help="only runs of this kind (report, notebook, train, compare)")
    ls.set_defaults(func=_cli_list)
    d = actions.add_parser("diff", help="two runs' parameters and metrics side by side (metrics.json numbers, flattened keys)")
    d.add_argument("a", help="a run folder, or its path under --root (as `workbench runs` lists it)")
    d.add_argument("b", help="the other run")
    d.add_argument("--root", default="runs", help="the folder the runs are under (default runs/)")
    d.add_argument("--changed", action="store_true", help="only the rows whose values differ")
    d.set_defaults(func=_cli_diff)


def _cell(v) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return fmt(v, 6)


def _cli_list(args: argparse.Namespace) -> int:
    runs = list_runs(args.root)
    kind = getattr(args, "kind", None)
    if kind:
        runs = [r for r in runs if r.get("kind") == kind]
    if not runs:
        print(f"no runs under {args.root}/ (runs written before runs had manifests are not listed)")
        return 0
    print(f"{'time (UTC)':<26} {'kind':<9} {'status':<8} {'commit':<13} path")
    for r in runs:
        commit = (r.get("commit") or "-")[:10] + ("+" if r.get("dirty") else "")
        print(f"{r.get('time') or '-':<26} {r.get('kind'):<9} {r.get('status') or '-':<8} {commit:<13} {r['path']}")
    print("(commit+ : the checkout had uncommitted changes)")
    return 0


def _cli_diff(args: argparse.Namespace) -> int:
    d = diff_runs(args.a, args.b, args.root, only_different=args.changed)
    width = max([len(k) for _, k, _, _ in d["rows"]] + [10])
    print(f"A: {d['a']['path']}\nB: {d['b']['path']}")
    section = None
    for sec, key, va, vb in d["rows"]:
        if sec != section:
            section = sec
            print(f"\n[{sec}]\n{'':<{width}}  {'A':<24} {'B':<24}")
        mark = "" if va == vb else "  *"
        print(f"{key:<{width}}  {_cell(va):<24} {_cell(vb):<24}{mark}")
    return 0
