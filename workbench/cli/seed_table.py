"""``workbench seed-table``: the command line of :func:`workbench.studies.seed_note.seed_table`.

Owns: the flags and what the command prints and writes. Must not: measure anything itself.
"""

from __future__ import annotations

import argparse

from ..config import ConfigError
from ..figures.results import estimator_markdown
from ..figures.seed_note import format_seed_table
from ..io import atomic_write_json
from ..studies.pipeline import estimator_table
from ..studies.seed_note import seed_table
from ._results import header, write_results


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seed-table", help="rebuild the seed note's Progress table from simulated scenes")
    p.add_argument("--n", type=int, default=64, help="scenes per preset (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated scenes and of the untrained model (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--results", metavar="PATH", help="also write the result file the README quotes: PATH.json and PATH.md")
    p.set_defaults(func=_cli_seed_table)
    e = sub.add_parser("estimator-table", help="NMSE of every R_samp estimator against SNR (median [interquartile range])")
    e.add_argument("--n", type=int, default=64, help="scenes per SNR (default 64)")
    e.add_argument("--snrs", default="0,10,20,30", help="SNRs in dB, comma-separated (default 0,10,20,30)")
    e.add_argument("--seed", type=int, default=0, help="seed of the scenes (default 0; the same scenes at every SNR)")
    e.add_argument("--results", metavar="PATH", help="also write the result file the README quotes: PATH.json and PATH.md")
    e.set_defaults(func=_cli_estimator_table)


def _cli_seed_table(args: argparse.Namespace) -> int:
    rows = seed_table(n_scenes=args.n, seed=args.seed)
    print(format_seed_table(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    if args.results:
        write_results(args.results, {**header("seed_table"), "rows": rows})
    return 0


def _cli_estimator_table(args: argparse.Namespace) -> int:
    try:
        snrs = tuple(float(s) for s in args.snrs.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--snrs = {args.snrs!r}: expected comma-separated numbers (dB), e.g. 0,10,20") from None
    if not snrs or args.n < 1:
        raise ConfigError(f"--snrs = {args.snrs!r}, --n = {args.n}: expected at least one SNR and n >= 1")
    rows = estimator_table(snrs=snrs, n=args.n, seed=args.seed)
    print(estimator_markdown(rows))
    if args.results:
        write_results(args.results, {**header("estimators"), "rows": rows})
    return 0
