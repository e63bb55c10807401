"""``workbench train`` and ``workbench verify``: the command line of :func:`workbench.train.fit` and
:func:`workbench.train.verify`.

Owns: the flags, the CLI defaults (:data:`DEFAULT_PRESET`, :data:`VERIFY_BUDGET`, :data:`VERIFY_THREADS`), the
config a command line means (preset + ``--set``/``--epochs``/``--n-train``), and what the commands print and
write. Must not: train or check anything itself.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..checkpoints import CHECKPOINT_FILE, HISTORY_FILE, RunFolder, check_out_folder
from ..config import ConfigError, ExperimentConfig, parse_overrides
from ..experiments import ENTRIES, entry_config
from ..figures import fmt
from ..io import atomic_write_json
from ..train import fit, torch_threads, verify

DEFAULT_PRESET = "recommended"
# `workbench verify` without --epochs/--n-train: enough for the four checks, under a minute on 2 CPU cores
VERIFY_BUDGET = {"train.n_train": 32, "train.n_val": 8, "train.epochs": 3, "train.batch_size": 8}
# one torch thread for it: measured 20 s on the shared 2-core machine, against 167 s with two (OpenMP threads spinning on busy cores)
VERIFY_THREADS = 1


def register(sub: argparse._SubParsersAction) -> None:
    budget = ", ".join(f"{k.split('.')[1]} {v}" for k, v in VERIFY_BUDGET.items())
    for name, helptext in (("train", "train a model under a preset (a resumable run folder)"),
                           ("verify", f"the seed note's four checks after a short training ({budget}), PASS/FAIL")):
        p = sub.add_parser(name, help=helptext)
        resumed = "; with --resume: the run's own config" if name == "train" else ""
        p.add_argument("--preset", choices=ENTRIES, metavar="PRESET",
                       help=f"base config, one of {', '.join(ENTRIES)} (a preset, or a variant of workbench compare such as "
                            f"localiser; default {DEFAULT_PRESET}{resumed})")
        p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="override a field, e.g. --set train.epochs 3 (value parsed as JSON when possible)")
        default_epochs = "the preset's" if name == "train" else VERIFY_BUDGET["train.epochs"]
        p.add_argument("--epochs", type=int, help=f"epochs (default {default_epochs})")
        p.add_argument("--n-train", type=int, help="training scenes" + (f" (default {VERIFY_BUDGET['train.n_train']})" if name == "verify" else ""))
        if name == "train":
            p.add_argument("--data", metavar="DIR", help="train on the scenes of this dataset folder (workbench data generate / import; "
                                                          "its system replaces the preset's) instead of simulated ones")
            p.add_argument("--out", help="run folder for history.json and checkpoint.pt (default runs/train_PRESET)")
            p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint (same system and model config)")
        else:
            p.add_argument("--out", help="folder for verify.json")
        p.add_argument("--threads", type=int, default=None if name == "train" else VERIFY_THREADS,
                       help="torch threads (default: torch's choice)" if name == "train" else
                       f"torch threads (default {VERIFY_THREADS}: the default budget's batches are tiny, and spare threads only wait)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and CI)")
        p.set_defaults(func=_cli_train if name == "train" else _cli_verify)


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_overrides(args.set)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.n_train is not None:
        overrides["train.n_train"] = args.n_train
    return overrides


def _cli_config(args: argparse.Namespace, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """``--preset`` (or ``base``, or the default preset) with ``--set``/``--epochs``/``--n-train`` applied."""
    overrides = _cli_overrides(args)
    if args.preset is not None or base is None:
        return entry_config(args.preset or DEFAULT_PRESET, overrides)
    return base.replace(**overrides) if overrides else base


def _cli_train(args: argparse.Namespace) -> int:
    with torch_threads(args.threads, "--threads"):
        return _train_command(args)


def _train_command(args: argparse.Namespace) -> int:
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--out = '{args.out}' and --resume = '{args.resume}': a resumed run stays in its folder; give one of them")
        out = Path(args.resume)
        cfg = _cli_config(args, base=RunFolder(out).config())
    else:
        cfg = _cli_config(args)
        out = Path(args.out or f"runs/train_{args.preset or DEFAULT_PRESET}")
    data = None
    if args.data:
        from ..forward import TrainingData

        cfg = TrainingData.dataset_config(args.data, cfg)
        data = TrainingData.from_dataset(args.data, cfg)
    RunFolder(out).check_writable()  # before any scene is simulated
    from ..runs import finish_run, start_run

    start_run(out, "train", out.name, {"config": cfg.to_dict(), "data": args.data, "resume": bool(args.resume)}, device=data.device if data else None)
    result = fit(cfg, data, progress=not args.no_progress, run_dir=out, resume=bool(args.resume))
    last = result.history[-1] if result.history else {}
    finish_run(out, "ok", None, epochs=len(result.history))
    print(f"wrote {out}/{HISTORY_FILE} and {out}/{CHECKPOINT_FILE} ({len(result.history)} epochs); final val_nmse {fmt(last.get('val_nmse'))}")
    return 0


def _verify_config(args: argparse.Namespace) -> ExperimentConfig:
    """The verify config: the preset and overrides, with :data:`VERIFY_BUDGET` for every budget key not given."""
    cfg = _cli_config(args)
    given = set(_cli_overrides(args))
    budget = {k: v for k, v in VERIFY_BUDGET.items() if k not in given}
    return cfg.replace(**budget) if budget else cfg


def _cli_verify(args: argparse.Namespace) -> int:
    cfg = _verify_config(args)
    if args.out:
        check_out_folder(Path(args.out))
    t0 = time.perf_counter()
    with torch_threads(args.threads, "--threads"):
        report = verify(cfg, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    for c in report["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}")
    passed = sum(c["passed"] for c in report["checks"])
    t = cfg.train
    print(f"verdict: {'PASS' if report['passed'] else 'FAIL'} ({passed}/{len(report['checks'])} checks) in {seconds:.1f} s "
          f"({t.epochs} epochs, {t.n_train} training / {t.n_val} validation scenes; --epochs / --n-train for a longer run)")
    if args.out:
        atomic_write_json(Path(args.out) / "verify.json", {**report, "seconds": seconds, "config": cfg.to_dict()})
    return 0 if report["passed"] else 1
