"""``workbench compare``: the command line of :func:`workbench.studies.compare.compare`.

Owns: the flags, checking them before anything is simulated, and the files the command writes (compare.json,
table.md). Must not: train or evaluate anything itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError, check_choice, parse_overrides
from ..experiments import BUDGETS, DEFAULT_ENTRIES, ENTRIES, budget_overrides, entry_configs
from ..figures.compare import conclusion, format_table
from ..io import atomic_write_json, atomic_write_text
from ..studies.compare import compare, summary
from ..train import torch_threads
from ._results import header, write_results


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train every preset on the same scenes and budget; NMSE, baselines, localisation vs the CRB")
    p.add_argument("--presets", default=",".join(DEFAULT_ENTRIES),
                   help=f"comma-separated entries, from {', '.join(ENTRIES)} (default: the five presets); "
                        "physics_head = recommended with a measurements-only physics head")
    p.add_argument("--budget", default="quick", choices=tuple(BUDGETS), metavar="BUDGET",
                   help="sizes of system, data and network: " + "; ".join(f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}"
                                                                       for k, v in BUDGETS.items()) + " (default quick)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="override a field for every entry")
    p.add_argument("--out", default=None, help="folder for the run folders, compare.json and table.md (default runs/compare_BUDGET)")
    p.add_argument("--data", metavar="DIR", help="train on the scenes of this dataset folder (workbench data generate / import; its "
                                                  "system replaces the budget's); the test scenes are simulated for that system")
    p.add_argument("--snrs", default="0,10,20", help="SNRs of the localisation scenes, dB (default 0,10,20)")
    p.add_argument("--n-per-snr", type=int, default=None, help="localisation scenes per SNR (default 64 on a CPU, 256 on a GPU)")
    p.add_argument("--test-seed", type=int, default=None,
                   help="seed of the held-out test scenes every reported number comes from (default: train.seed); another value "
                        "re-scores the same trained networks on fresh scenes")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the scenes for the 95 %% intervals (default 1000)")
    p.add_argument("--results", metavar="PATH", default=None,
                   help="also write the summary the README's tables are made from: PATH (.json) and PATH with .md (the tables)")
    p.add_argument("--no-reuse", action="store_true", help="retrain entries even when their folder holds a complete run of the same config")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    p.set_defaults(func=_cli_compare)


def _cli_compare(args: argparse.Namespace) -> int:
    entries = [e.strip() for e in args.presets.split(",") if e.strip()]
    for e in entries:
        check_choice("--presets", e, ENTRIES)
    try:
        snrs = [float(s) for s in args.snrs.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--snrs = {args.snrs!r}: expected comma-separated numbers (dB), e.g. 0,10,20") from None
    if not snrs:
        raise ConfigError("--snrs: expected at least one SNR in dB")
    for flag, value in (("--n-per-snr", args.n_per_snr), ("--n-boot", args.n_boot)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} = {value}: expected an integer >= 1")
    if args.test_seed is not None and args.test_seed < 0:
        raise ConfigError(f"--test-seed = {args.test_seed}: expected an integer >= 0")
    out = Path(args.out or f"runs/compare_{args.budget}")
    overrides = budget_overrides(args.budget, parse_overrides(args.set))
    data = None
    if args.data:
        from ..data import dataset_system
        from ..forward import TrainingData

        overrides.update({f"system.{k}": v for k, v in dataset_system(args.data).to_dict().items()})
        data = TrainingData.from_dataset(args.data, next(iter(entry_configs(entries, overrides).values())))
    entry_configs(entries, overrides)  # refuse a bad configuration before anything is simulated
    out.mkdir(parents=True, exist_ok=True)
    from ..runs import finish_run, start_run

    start_run(out, "compare", out.name, {"entries": entries, "overrides": overrides, "budget": args.budget, "data": args.data,
                                         "snrs": snrs, "n_per_snr": args.n_per_snr, "test_seed": args.test_seed, "n_boot": args.n_boot})
    with torch_threads(args.threads, "--threads"):
        result = compare(entries, overrides, out, snrs, args.n_per_snr, reuse=not args.no_reuse, progress=not args.no_progress,
                         data=data, test_seed=args.test_seed, n_boot=args.n_boot)
    finish_run(out, "ok", result["seconds"])
    table = format_table(result["table"])
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "table.md", f"{table}\n\n{conclusion(result)}\n")
    print(table)
    print()
    print(conclusion(result))
    if args.results:
        write_results(args.results, {**header("compare"), **summary(result)})
    print(f"\nwrote {out}/compare.json, {out}/table.md and a run folder per entry ({result['seconds']:.0f} s)")
    return 0
