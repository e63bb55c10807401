"""``workbench seed-table``: the command line of :func:`workbench.studies.seed_note.seed_table`.

Owns: the flags and what the command prints and writes. Must not: measure anything itself.
"""

from __future__ import annotations

import argparse

from ..figures.seed_note import format_seed_table
from ..io import atomic_write_json
from ..studies.seed_note import seed_table
from ._results import header, write_results


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seed-table", help="rebuild the seed note's Progress table from simulated scenes")
    p.add_argument("--n", type=int, default=64, help="scenes per preset (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated scenes and of the untrained model (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--results", metavar="PATH", help="also write the result file the README quotes: PATH.json and PATH.md")
    p.set_defaults(func=_cli_seed_table)



def _cli_seed_table(args: argparse.Namespace) -> int:
    rows = seed_table(n_scenes=args.n, seed=args.seed)
    print(format_seed_table(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    if args.results:
        write_results(args.results, {**header("seed_table"), "rows": rows})
    return 0

