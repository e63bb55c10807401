"""Seconds per scene of the learned localiser (workbench/detector.py) and of the maximum-likelihood fit it replaces, on
the same scenes and device in one run, each at its best batch size (scenes per call). Prints a markdown table.

    .venv/bin/python benchmarks/bench_localiser.py [--run DIR] [--decoding FIELD VALUE] [--device cpu|cuda|auto] [--snr 20]
                                                   [--quick] [--threads 2]

--run: a trained localiser's run folder (``workbench compare --presets localiser`` writes ``<out>/localiser/``; its
checkpoint.pt is loaded onto --device, with the entry's current decoding settings unless --own-decoding). Without one
an untrained localiser of the ``localiser`` entry on the quick budget's system is timed: its heatmap finds fewer
sources, so its refinement is cheaper than a trained one's, which the output says. The ML fit:
:func:`workbench.ml_fit.ml_localise` with K by MDL (its ``chunk`` is the batch size), plain and with the study's
RELAX cycles (the strongest baseline). All see only y, H and the codes. Best of --repeats per batch size, after one warm-up call.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import best_time  # noqa: E402

from workbench.checkpoints import TrainResult, load_checkpoint
from workbench.config import DEVICES, parse_value, resolve_device
from workbench.detector import DECODING_FIELDS
from workbench.experiments import budget_overrides, entry_config
from workbench.ml_fit import ml_localise
from workbench.model import build_model
from workbench.physics import simulate
from workbench.studies.localiser import RELAX_CYCLES, run_localiser, with_entry_decoding


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a trained localiser's run folder (default: an untrained localiser)")
    ap.add_argument("--own-decoding", action="store_true", help="keep the run's own decoding settings (default: the localiser "
                    "entry's current decoding: workbench.detector.DECODING_FIELDS)")
    ap.add_argument("--decoding", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                    help="a decoding setting on top of the above, e.g. --decoding detector_relax 0 (repeatable; one of "
                    "workbench.detector.DECODING_FIELDS)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (CUDA when present)")
    ap.add_argument("--snr", type=float, default=20.0, help="SNR of the timed scenes, dB (default 20)")
    ap.add_argument("--scenes", type=int, default=128, help="scenes timed (default 128)")
    ap.add_argument("--batches", default="16,64,256", help="batch sizes tried for each estimator (comma-separated)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--quick", action="store_true", help="32 scenes, batches 16,32, one repeat: a smoke run")
    args = ap.parse_args(argv)
    if args.device.split(":")[0] not in DEVICES:
        ap.error(f"--device {args.device}: expected one of {', '.join(DEVICES)}")
    args.batches = [int(x) for x in args.batches.split(",") if x.strip()]
    if args.quick:
        args.scenes, args.batches, args.repeats = 32, [16, 32], 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.run:
        run = load_checkpoint(Path(args.run) / "checkpoint.pt", device=device)
        if not args.own_decoding:  # the entry's current decoding settings (they are not weights)
            with_entry_decoding(run)
        what = f"trained run {args.run}, decoding " + ", ".join(f"{k} {getattr(run.model.cfg, k)}" for k in DECODING_FIELDS)
    else:
        cfg = entry_config("localiser", budget_overrides("quick"))
        run = TrainResult(history=[], provenance=[], model=build_model(cfg.system, cfg.model, device), config=cfg)
        what = "UNTRAINED localiser (fewer detections, cheaper refinement than a trained one)"
    if args.decoding:
        run.model.set_decoding(**{k: parse_value(v) for k, v in args.decoding})
        what += "; set: " + ", ".join(f"{k} {v}" for k, v in args.decoding)
    system = run.config.system
    batch = simulate(system.replace(snr_db_min=args.snr, snr_db_max=args.snr), args.scenes, seed=0, device=device)
    n = len(batch)
    rows = []
    for name, call in (("learned localiser", lambda bs: run_localiser(run, batch, bs)),
                       ("ML fit (MDL)", lambda bs: ml_localise(batch.y, batch.H, batch.codes, system, chunk=bs)),
                       ("ML fit + RELAX (MDL)", lambda bs: ml_localise(batch.y, batch.H, batch.codes, system, chunk=bs,
                                                                        relax_cycles=RELAX_CYCLES))):
        per = {bs: best_time(lambda bs=bs, call=call: call(bs), args.repeats, warmup=True) / n for bs in args.batches if bs <= n}
        best = min(per, key=per.get)
        rows.append((name, best, per[best], per))
    print(f"device: {device}, threads: {torch.get_num_threads()}, scenes: {n} at {args.snr:g} dB, N = {system.N}, "
          f"K_max = {system.K_max}; {what}; best of {args.repeats} per batch size\n")
    print("| estimator | best batch | s / scene | s / scene at each batch |")
    print("|---|---|---|---|")
    for name, best, sec, per in rows:
        print(f"| {name} | {best} | {sec:.4f} | {', '.join(f'{b}: {s:.4f}' for b, s in per.items())} |")
    print(f"\nML fit / learned localiser: {rows[1][2] / rows[0][2]:.1f}x the seconds per scene")


if __name__ == "__main__":
    main()
