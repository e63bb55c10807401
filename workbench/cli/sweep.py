"""``workbench sweep``: the command line of :mod:`workbench.sweep`.

Owns: the flags (``--heartbeat``/``--grace`` as whole seconds >= 1), the storage URL a command line means, and
the printed summary. Must not: create studies or run trials itself.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import optuna

from ..config import PRESETS, ConfigError, parse_overrides
from ..io import atomic_write_json
from ..storage import STORAGE_ENV, default_storage_url, mask_url
from ..sweep import DEFAULT_STUDY, PRUNERS, parse_devices, run_sweep, run_worker, summarize, trials_table
from ..train import torch_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Optuna sweep over fix knobs and training hyperparameters",
                       description="Create (or resume) an Optuna study and run workers on it. Re-running the same command resumes; "
                                   "--join runs one more worker on an existing study (e.g. on another machine with --storage).")
    p.add_argument("--trials", type=int, default=8, help="finished trials the study should hold (default 8)")
    p.add_argument("--epochs", type=int, help=f"epochs per trial (default {SWEEP_DEFAULTS['epochs']}; with --join: the study's)")
    p.add_argument("--n-train", type=int, help=f"training scenes (default {SWEEP_DEFAULTS['n_train']}; with --join: the study's)")
    p.add_argument("--n-val", type=int, help=f"validation scenes (default {SWEEP_DEFAULTS['n_val']}; with --join: the study's)")
    p.add_argument("--study", default=DEFAULT_STUDY)
    p.add_argument("--space", help="search-space file (JSON, or YAML); default: the built-in space over every fix knob")
    p.add_argument("--storage", help=f"SQLAlchemy URL (default: ${STORAGE_ENV}, else sqlite:///runs/optuna.db); postgresql+psycopg2://... "
                   f"to share across machines. A URL with a password is better passed in ${STORAGE_ENV}: a command line is visible to ps")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--devices", help="one worker per GPU: 'all' or CUDA device indices, e.g. 0,1 (each worker sees only its "
                                     "own device; replaces --workers). Workers on other machines join with --join --storage")
    p.add_argument("--preset", choices=PRESETS, metavar="PRESET",
                   help=f"base config, one of {', '.join(PRESETS)} (default recommended; a space file's 'preset' wins; "
                        "with --join: the study's, and a different one is refused)")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="fixed override of the base config")
    p.add_argument("--pruner", choices=PRUNERS, help="default median; with --join: the study's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heartbeat", type=_seconds("--heartbeat"), default=10,
                   help="seconds (>= 1) between trial heartbeats; a trial silent for 3 of them is failed and re-run")
    p.add_argument("--grace", type=_seconds("--grace"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help="torch threads in this process")
    p.add_argument("--join", action="store_true", help="run one worker on an existing study (no creation); --space, --preset, --set, "
                   "--epochs, --n-train, --n-val and --pruner that differ from the stored study are refused, naming them")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the study summary here")
    p.set_defaults(func=_cli_sweep)


SWEEP_DEFAULTS = {"epochs": 2, "n_train": 256, "n_val": 64, "preset": "recommended", "pruner": "median"}  # without --join


def _seconds(flag: str) -> Callable[[str], int]:
    """An argparse type: a whole number of seconds >= 1; anything else is refused, naming ``flag``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} = {text!r}: expected a whole number of seconds >= 1 "
                                             "(0 or less would let a killed worker's trial hang the sweep)")
        return value

    return parse


def _cli_sweep(args: argparse.Namespace) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with torch_threads(args.threads or None, "--threads"):
        return _sweep_command(args)


def _sweep_command(args: argparse.Namespace) -> int:
    url = args.storage or os.environ.get(STORAGE_ENV) or default_storage_url()
    if args.join:
        if args.devices:
            raise ConfigError("--devices with --join: a joining worker is one process on one device; start one per GPU, "
                              "e.g. CUDA_VISIBLE_DEVICES=1 workbench sweep --join ...")
        options = {"space": args.space, "preset_name": args.preset, "overrides": parse_overrides(args.set) or None, "epochs": args.epochs,
                   "n_train": args.n_train, "n_val": args.n_val, "pruner": args.pruner}
        run_worker(url, args.study, args.trials, worker=args.worker_index, seed=args.seed, heartbeat=args.heartbeat, grace=args.grace,
                   join_options={k: v for k, v in options.items() if v is not None})
        return 0
    d = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SWEEP_DEFAULTS.items()}
    s = run_sweep(args.space, trials=args.trials, epochs=d["epochs"], n_train=d["n_train"], n_val=d["n_val"], study=args.study,
                  storage=url, workers=args.workers, preset_name=d["preset"], overrides=parse_overrides(args.set), seed=args.seed,
                  pruner=d["pruner"], heartbeat=args.heartbeat, grace=args.grace,
                  devices=parse_devices(args.devices) if args.devices else None)
    summary = summarize(s)
    c = summary["counts"]
    print(f"study {args.study!r} in {mask_url(url)}: {c['done']} done ({c['complete']} complete, {c['pruned']} pruned of which "
          f"{summary['nonfinite']} non-finite, {c['failed']} failed), {c['running']} running")
    if summary["best"]:
        print(f"best trial {summary['best']['number']}: val_nmse {summary['best']['value']:.5g} with {json.dumps(summary['best']['params'])}")
    if args.json:
        atomic_write_json(args.json, {**summary, "trials": trials_table(s)})
    return 0
