"""A training step's time with every loss term on versus the NMSE term alone (issue 3's speed goal:
the eigen-terms add at most 25 % at batch 64 on CPU), for the gap/subspace backends side by side.

    .venv/bin/python benchmarks/bench_train_step.py [--quick] [--threads 2]

Each configuration runs forward + backward + optimiser step on the same batch; the table gives the median
over repeats, all configurations interleaved in one run so machine noise hits them alike."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench.config import preset
from workbench.losses import compute_losses
from workbench.model import build_model
from workbench.physics import simulate
from workbench.covariance import rsamp_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 8, 2 repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch, repeats = (8, 2) if args.quick else (args.batch, args.repeats)
    base = preset("recommended")
    data = simulate(base.system, batch, seed=0)
    R_samp = rsamp_for(data, base.fixes, base.system)
    variants = {
        "NMSE only": (base, ("nmse",)),
        "all terms, recommended (eigvalsh + safe)": (base, None),
        "all terms, topk + safe": (base.replace(**{"fixes.gap_backend": "topk"}), None),
        "all terms, seed's eigh hinge + safe": (base.replace(**{"fixes.gap_backend": "eigh"}), None),
        "all terms, eigh + lorentzian": (base.replace(**{"fixes.gap_backend": "eigh", "fixes.subspace_backend": "lorentzian"}), None),
    }
    models = {name: build_model(cfg.system, cfg.model) for name, (cfg, _) in variants.items()}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats + 1):
        for name, (cfg, terms) in variants.items():
            model, opt = models[name], opts[name]
            t0 = time.perf_counter()
            out = model(data.y, data.H, data.codes, R_samp=R_samp)
            losses, _ = compute_losses(out, data, R_samp, cfg, terms=terms)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["NMSE only"])
    print(f"batch {batch}, N = {base.system.N}, {args.threads} threads, torch {torch.__version__}, median of {repeats}\n")
    print("| configuration | ms per step | vs NMSE only |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {1000 * m:.1f} | {m / ref:.2f}x |")


if __name__ == "__main__":
    main()
