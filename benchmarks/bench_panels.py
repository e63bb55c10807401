"""Update time of every cheap knob of every panel, at each notebook's DEFAULT parameters (no kernel, no browser).

A panel is built as its notebook builds it and drawn once (not timed: the headless cell pays that); then each
cheap knob is changed once and the panel's own update time (``panel.seconds``: compute plus drawing the figure,
the time from the change to the new status and figure) is recorded. The goal is under one second each.
Training (04) and running more trials (06) are buttons with a progress bar, not cheap knobs, and are left out;
05's networks come from a quick training first (as notebook 04 would have left them). Writes
benchmarks/results_panels.md (and .json) atomically and prints the table.

    .venv/bin/python benchmarks/bench_panels.py [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import write_results  # noqa: E402

from workbench import experiments, sweep, ui  # noqa: E402
from workbench import params as wp  # noqa: E402
from workbench.forward import TrainingData  # noqa: E402
from workbench.studies import localisation  # noqa: E402

GOAL_S = 1.0


def _timed(panel, changes: list[tuple[str, object]], notebook: str) -> list[dict]:
    rows = []
    for name, value in changes:
        with contextlib.redirect_stdout(io.StringIO()):
            panel.controls[name].value = value
        assert panel.error is None, (notebook, name, panel.error)
        rows.append({"notebook": notebook, "knob": name, "value": str(value), "seconds": panel.seconds})
        print(f"{notebook:<28} {name:<24} {str(value):<24} {panel.seconds:6.2f} s", flush=True)
    return rows


def bench(tmp: Path) -> list[dict]:
    rows = []
    p1 = wp.notebook_params("01_covariance_normalisation", out_dir=str(tmp / "01"))
    panel = ui.NormalisationPanel(p1)
    panel.update()
    rows += _timed(panel, [("c_eps", 0.01), ("beta", 0.5), ("rsamp_normalise", not panel.controls["rsamp_normalise"].value),
                           ("estimator", "beamscan"), ("preset", "seed_fix2")], "01_covariance_normalisation")
    p2 = wp.notebook_params("02_eigen_spectrum", out_dir=str(tmp / "02"))
    panel = ui.SpectrumPanel(p2)
    panel.update()
    rows += _timed(panel, [("c_eps", 0.01), ("scene", 3), ("beta", 0.5), ("estimator", "beamscan"), ("preset", "recommended")],
                   "02_eigen_spectrum")
    p3 = wp.notebook_params("03_nan_gradients", out_dir=str(tmp / "03"), subspace_backend="eigh")
    panel = ui.GradientPanel(p3)
    panel.update()
    rows += _timed(panel, [("subspace_backend", "safe"), ("gap_backend", "svd"), ("c_eps", 0.01), ("preset", "recommended")],
                   "03_nan_gradients")
    p5 = wp.notebook_params("05_localisation", out_dir=str(tmp / "05"))
    configs = experiments.entry_configs(p5.preset_names, p5.dotted_overrides())  # as notebook 05's cells
    cfg = next(iter(configs.values()))
    runs = experiments.train_entries(configs, TrainingData.simulate(cfg), p5.models_path, progress=False)
    physics_k = ("true" if p5.use_true_k else "mdl") if p5.physics_baseline else None
    sources = localisation.localisation_sources(cfg, p5.estimator_names, physics_k=physics_k, runs=runs, blend=p5.blend)
    panel = ui.LocalisationPanel(p5, sources)
    with contextlib.redirect_stdout(io.StringIO()):
        panel.update()
    rows += _timed(panel, [("scene", 3), ("source", "R_samp[beamscan]"), ("source", "physics[ML]"), ("snr_db", 0.0), ("method", "mvdr")],
                   "05_localisation")
    p6 = wp.notebook_params("06_sweep", out_dir=str(tmp / "06"))
    sweep.run_sweep(p6.search_space, trials=p6.trials, study=p6.study, storage=p6.storage_url, seed=p6.seed, pruner=p6.pruner,
                    enqueue=p6.enqueued, verbose=False)  # as notebook 06 runs it
    panel = ui.SweepPanel(p6)
    panel.update()
    knobs = [k for k in panel.controls["knob"].options if k != "(all)"][:3]
    rows += _timed(panel, [("knob", k) for k in knobs], "06_sweep")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| notebook | knob | new value | update s |", "|---|---|---|---:|"]
    lines += [f"| {r['notebook']} | {r['knob']} | {r['value']} | {r['seconds']:.2f} |" for r in rows]
    worst = max(rows, key=lambda r: r["seconds"])
    over = [r for r in rows if r["seconds"] > GOAL_S]
    lines.append(f"\nSlowest: {worst['notebook']} {worst['knob']} {worst['seconds']:.2f} s; {len(over)} of {len(rows)} changes over "
                 f"the {GOAL_S:g} s goal.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(Path(tmp))
    head = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, python {sys.version.split()[0]}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, {time.time() - t0:.0f} s in all. Default notebook parameters.")
    print(write_results("results_panels", "Panel update time per cheap knob", head, table(rows), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
