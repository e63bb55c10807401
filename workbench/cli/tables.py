"""``workbench estimator-table`` and ``workbench steering-mismatch``: two measurement tables the README quotes.

Owns: their flags and the files they write. Must not: measure (:func:`workbench.studies.pipeline.estimator_table`,
:func:`workbench.studies.steering.mismatch_rows`) or format (:mod:`workbench.figures.results`).
"""

from __future__ import annotations

import argparse

from ..config import STEERING_MODELS, ConfigError, SystemConfig, check_choice
from ..figures.results import estimator_markdown, mismatch_markdown
from ..studies.pipeline import estimator_table
from ..studies.steering import mismatch_rows
from ._results import header, write_results


def _numbers(flag: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"{flag} = {text!r}: expected comma-separated numbers, e.g. 0,10,20")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("estimator-table", help="NMSE of every R_samp estimator against SNR (median [interquartile range])")
    e.add_argument("--n", type=int, default=64, help="scenes per SNR (default 64)")
    e.add_argument("--snrs", default="0,10,20,30", help="SNRs in dB, comma-separated (default 0,10,20,30)")
    e.add_argument("--seed", type=int, default=0, help="seed of the scenes (default 0; the same scenes at every SNR)")
    e.add_argument("--results", metavar="PATH", help="also write the result file the README quotes: PATH.json and PATH.md")
    e.set_defaults(func=_cli_estimator_table)
    m = sub.add_parser("steering-mismatch", help="bias of a separable- or Fresnel-model estimate of the exact spherical wave, "
                                                 "beside sqrt(CRB) under the exact model")
    m.add_argument("--model", default="separable", help=f"the assumed model, one of {', '.join(STEERING_MODELS)} (default separable)")
    m.add_argument("--phis", default="0,20,40,60", help="azimuths in degrees (default 0,20,40,60)")
    m.add_argument("--ranges", default="0.75,1.5,3,6,10", help="ranges in metres (default 0.75,1.5,3,6,10)")
    m.add_argument("--snr", type=float, default=20.0, help="SNR of the bound, dB (default 20)")
    m.add_argument("--results", metavar="PATH", help="also write the result file the README quotes: PATH.json and PATH.md")
    m.set_defaults(func=_cli_mismatch)


def _cli_estimator_table(args: argparse.Namespace) -> int:
    snrs = _numbers("--snrs", args.snrs)
    if args.n < 1:
        raise ConfigError(f"--n = {args.n}: expected an integer >= 1")
    rows = estimator_table(snrs=snrs, n=args.n, seed=args.seed)
    print(estimator_markdown(rows))
    if args.results:
        write_results(args.results, {**header("estimators"), "rows": rows})
    return 0


def _cli_mismatch(args: argparse.Namespace) -> int:
    check_choice("--model", args.model, STEERING_MODELS)
    rows = mismatch_rows(SystemConfig(), _numbers("--phis", args.phis), _numbers("--ranges", args.ranges), model=args.model,
                         snr_db=args.snr)
    print(mismatch_markdown(rows))
    if args.results:
        write_results(args.results, {**header("mismatch"), "rows": rows})
    return 0
