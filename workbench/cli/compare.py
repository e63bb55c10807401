"""``workbench compare``: the command line of :func:`workbench.studies.compare.compare`.

Owns: the flags, checking every one of them before anything is simulated (``--snrs`` finite and in the system's SNR
range, ``--out`` a writable folder with room for the run folders), and the files the command writes as one unit:
``compare.json``, ``table.md`` and ``manifest.json`` (:data:`MANIFEST`). Must not: train or evaluate anything itself.

The output unit. Before any training, ``manifest.json`` is removed (so nothing in ``--out`` is marked current any
more), then the previous ``table.md`` and ``compare.json``. After the work, ``compare.json`` and ``table.md`` are
written (each atomically), then ``manifest.json`` last: it names the config of every entry (and its run folder), and
the SHA-256 of the table and the JSON. So a failed or killed rerun leaves the old complete set (when it failed before
touching anything) or no manifest and no table: never an old table beside new run folders. A table is current only
when ``manifest.json`` exists and its checksums match (:func:`current_outputs`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import shutil
from pathlib import Path

from .. import __version__
from ..checkpoints import check_out_folder
from ..config import ConfigError, SystemConfig, check_choice, parse_overrides
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


MANIFEST = "manifest.json"
OUTPUTS = ("compare.json", "table.md")
SNR_RANGE = tuple(SystemConfig.__dataclass_fields__["snr_db_min"].metadata.get("range", (-60.0, 100.0)))
DISK_MARGIN = 16 << 20  # bytes kept free beyond the run folders' estimate


def parse_snrs(text: str) -> list[float]:
    """``--snrs``: comma-separated finite SNRs in dB within the system's SNR range; ConfigError naming ``--snrs``."""
    try:
        snrs = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--snrs = {text!r}: expected comma-separated numbers (dB), e.g. 0,10,20") from None
    if not snrs:
        raise ConfigError("--snrs: expected at least one SNR in dB")
    lo, hi = SNR_RANGE
    bad = [s for s in snrs if not (math.isfinite(s) and lo <= s <= hi)]
    if bad:
        raise ConfigError(f"--snrs = {text!r}: {', '.join(str(b) for b in bad)} is not a finite SNR in [{lo:g}, {hi:g}] dB "
                          "(the range of system.snr_db_min/snr_db_max)")
    return snrs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invalidate_outputs(out: Path) -> None:
    """Unmark the previous output set: remove ``manifest.json`` first (one unlink: nothing is current from here on),
    then the table and the JSON it described."""
    for name in (MANIFEST, *OUTPUTS):
        (out / name).unlink(missing_ok=True)


def write_outputs(out: Path, result: dict, cfgs: dict, text: str) -> None:
    """``compare.json`` and ``table.md``, then ``manifest.json`` (each atomic; the manifest last, keeping the run's identity
    fields that :func:`workbench.runs.start_run` wrote)."""
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "table.md", text)
    try:  # the run's identity (workbench.runs: time, commit, versions, parameters, status) stays in the one manifest
        identity = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        identity = {}
    atomic_write_json(out / MANIFEST, {
        **(identity if isinstance(identity, dict) else {}), "format": 1, "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "entries": {name: {"run": name, "config": cfg.to_dict()} for name, cfg in cfgs.items()},
        "files": {name: {"sha256": _sha256(out / name)} for name in OUTPUTS}})


def current_outputs(out: str | Path) -> dict | None:
    """The manifest of the complete output set in ``out``, or None when there is none (no manifest, or a file it names
    is missing or altered)."""
    out = Path(out)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        ok = all(_sha256(out / name) == info["sha256"] for name, info in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if ok else None


def _check_space(out: Path, cfgs: dict) -> None:
    """ConfigError naming ``--out`` unless its disk has room for a run folder per entry (weights + two Adam moments,
    two epoch folders at a switch) and a margin."""
    from ..model import build_model

    need = DISK_MARGIN + sum(2 * 3 * 4 * sum(p.numel() for p in build_model(c.system, c.model).parameters()) for c in cfgs.values())
    free = shutil.disk_usage(out).free
    if need > free:
        raise ConfigError(f"--out = '{out}': the run folders need about {need / 1e6:.0f} MB but only {free / 1e6:.0f} MB is free; "
                          "free disk space or choose another --out")


def _cli_compare(args: argparse.Namespace) -> int:
    entries = [e.strip() for e in args.presets.split(",") if e.strip()]
    for e in entries:
        check_choice("--presets", e, ENTRIES)
    snrs = parse_snrs(args.snrs)
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
    cfgs = entry_configs(entries, overrides)  # refuse a bad configuration before anything is simulated
    check_out_folder(out)  # a folder that exists or can be made, and accepts files
    _check_space(out, cfgs)
    invalidate_outputs(out)  # from here on, nothing in --out is marked current until the new set is complete
    with torch_threads(args.threads, "--threads"):
        result = compare(entries, overrides, out, snrs, args.n_per_snr, reuse=not args.no_reuse, progress=not args.no_progress,
                         data=data, test_seed=args.test_seed, n_boot=args.n_boot)
    from ..runs import finish_run, start_run

    # the run's identity goes into the manifest only once the set is complete: a killed run leaves no manifest at all
    start_run(out, "compare", out.name, {"entries": entries, "overrides": overrides, "budget": args.budget, "data": args.data,
                                         "snrs": snrs, "n_per_snr": args.n_per_snr, "test_seed": args.test_seed, "n_boot": args.n_boot})
    finish_run(out, "ok", result["seconds"])
    table = format_table(result["table"])
    write_outputs(out, result, cfgs, f"{table}\n\n{conclusion(result)}\n")
    print(table)
    print()
    print(conclusion(result))
    if args.results:
        write_results(args.results, {**header("compare"), **summary(result)})
    print(f"\nwrote {out}/compare.json, {out}/table.md, {out}/{MANIFEST} and a run folder per entry ({result['seconds']:.0f} s)")
    return 0
