"""``workbench localiser``: a trained learned localiser against the ML fit on the held-out test split, the table the
README quotes (section "The learned localiser").

Owns: its flags, what it prints and the result file it writes. Must not: measure
(:func:`workbench.studies.localiser.localiser_vs_ml`) or format (:func:`workbench.figures.localiser.localiser_markdown`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import DEVICES, ConfigError, check_choice
from ..detector import DECODING_FIELDS
from ..figures.localiser import localiser_markdown
from ._results import header, write_results
from .compare import parse_snrs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("localiser", help="a trained learned localiser against the ML fit on the test split (per source, with "
                                         "95 %% intervals, seconds per scene on one device)")
    p.add_argument("--run", required=True, metavar="DIR",
                   help="the localiser's run folder (workbench train --preset localiser --out DIR, or DIR/localiser of workbench compare)")
    p.add_argument("--snrs", default="10,20", help="SNRs of the test scenes, dB (default 10,20)")
    p.add_argument("--n-per-snr", type=int, default=256, help="test scenes per SNR (default 256)")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the test split's scenes (default 0; a second seed re-checks a claim)")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default auto: CUDA when present); both estimators run there")
    p.add_argument("--batch-size", type=int, default=64, help="scenes per localiser call (default 64)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the scenes for the 95 %% intervals (default 1000)")
    p.add_argument("--own-decoding", action="store_true",
                   help="keep the run's own decoding settings (default: the localiser entry's, chosen on the dev split)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--results", metavar="PATH", help="also write the result file the README quotes: PATH.json and PATH.md")
    p.set_defaults(func=_cli_localiser)


def _cli_localiser(args: argparse.Namespace) -> int:
    from ..checkpoints import CHECKPOINT_FILE, load_checkpoint
    from ..config import resolve_device
    from ..studies.localiser import localiser_vs_ml, training_summary, with_entry_decoding
    from ..train import torch_threads

    snrs = parse_snrs(args.snrs)
    check_choice("--device", args.device.split(":")[0], DEVICES)
    for flag, value, low in (("--n-per-snr", args.n_per_snr, 1), ("--batch-size", args.batch_size, 1), ("--n-boot", args.n_boot, 1)):
        if value < low:
            raise ConfigError(f"{flag} = {value}: expected an integer >= {low}")
    path = Path(args.run) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"--run = '{args.run}': no {CHECKPOINT_FILE} there; give the run folder of a trained localiser "
                          "(workbench train --preset localiser --out DIR)")
    device = resolve_device(args.device)
    with torch_threads(args.threads, "--threads"):
        run = load_checkpoint(path, device=device)
        if run.config.model.head != "detector":
            raise ConfigError(f"--run = '{args.run}': its model.head is {run.config.model.head!r}, not 'detector' (the learned localiser)")
        if not args.own_decoding:
            with_entry_decoding(run)
        res = localiser_vs_ml(run, snrs, args.n_per_snr, seed=args.test_seed, split="test", device=device,
                              batch_size=args.batch_size, n_boot=args.n_boot)
    summary = {**header("localiser"), **res, "decoding": {k: getattr(run.model.cfg, k) for k in DECODING_FIELDS},
               "training": training_summary(run)}
    print(localiser_markdown(summary))
    if args.results:
        write_results(args.results, summary)
    return 0

