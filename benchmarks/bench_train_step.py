"""A training step's time with every loss term on versus the NMSE term alone, for `recommended` and each seed
preset, measured in one run (goal: the eigen-terms add at most 10 % to a `recommended` step at batch 64).

    .venv/bin/python benchmarks/bench_train_step.py [--quick] [--threads 2] [--batch 64] [--repeats 7]

Each configuration runs forward + backward + AdamW step on the same batch with its preset's own model and
R_samp; all configurations are interleaved in one run (each preset's two steps back to back). The table gives
the best (least disturbed) time of each over the repeats, since on a shared machine noise only adds time, the
ratio of those best times, and the median over repeats of the paired ratio (all terms / NMSE only measured back
to back), which cancels slow drifts of the machine's load.
`recommended` computes its eigen-terms on the factored R_blend (workbench.spectral); two more rows show what
they cost on the full 144 x 144 matrix (the previous path) and with a blended low-rank R_samp.
Also printed: the share of a `recommended` step spent in model.prior_factor (an eigh of R_samp in the model)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench import spectral
from workbench.config import SEED_PRESETS, preset
from workbench.estimators import rsamp_for
from workbench.losses import compute_losses, term_weights
from workbench.model import CovarianceNet, build_model
from workbench.physics import simulate, steering

PRESETS = ("recommended", *SEED_PRESETS)


def full_matrix_losses(out, data, R_samp, cfg):
    """`recommended`'s losses with the two eigen-terms on the formed R_blend (eigvalsh hinge, safe subspace on a
    144 x 144 eigh): the path every step took before the factored one."""
    losses, cov = compute_losses(out, data, R_samp, cfg, terms=("nmse", "k_ce", "aux"))
    f, w = cfg.fixes, term_weights(cfg)
    a_true = steering(cfg.system, data.phi, data.theta, torch.where(data.mask, data.r, 1.0))
    gap = spectral.eigengap_hinge(cov.R_blend, data.K, f.gap_margin, f.eps_psd, "eigvalsh").mean()
    subspace = spectral.subspace_energy(cov.R_blend, a_true, data.mask, data.K, "safe").mean()
    return {"total": losses["total"] + w["gap"] * gap + w["subspace"] * subspace}


def variants(batch: int):
    """name -> (cfg, terms or None, loss function); the data and R_samp of each preset are built once."""
    out = {}
    for name in PRESETS:
        cfg = preset(name)
        out[f"{name} | NMSE only"] = (cfg, ("nmse",), compute_losses)
        out[f"{name} | all terms"] = (cfg, None, compute_losses)
    rec = preset("recommended")
    out["recommended, eigen-terms on the full matrix | all terms"] = (rec, None, full_matrix_losses)
    out["recommended, beta = 0.3 (low-rank beamscan R_samp blended) | all terms"] = (rec.replace(**{"fixes.beta": 0.3}), None, compute_losses)
    return out


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
    cases = variants(batch)
    rsamp = {}
    for cfg, _, _ in cases.values():
        key = (cfg.fixes.rsamp_estimator, cfg.fixes.rsamp_normalise)
        if key not in rsamp:
            rsamp[key] = rsamp_for(data, cfg.fixes, cfg.system)
    models = {name: build_model(cfg.system, cfg.model) for name, (cfg, _, _) in cases.items()}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    prior_times: list[float] = []
    R_rec = rsamp[(base.fixes.rsamp_estimator, base.fixes.rsamp_normalise)]
    for rep in range(repeats + 1):
        for name, (cfg, terms, loss_fn) in cases.items():
            model, opt = models[name], opts[name]
            R_samp = rsamp[(cfg.fixes.rsamp_estimator, cfg.fixes.rsamp_normalise)]
            t0 = time.perf_counter()
            out = model(data.y, data.H, data.codes, R_samp=R_samp)
            losses = loss_fn(out, data, R_samp, cfg) if terms is None else loss_fn(out, data, R_samp, cfg, terms=terms)
            if isinstance(losses, tuple):
                losses = losses[0]
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        CovarianceNet.prior_factor(R_rec, base.system.K_max)
        if rep:
            prior_times.append(time.perf_counter() - t0)
    best = {name: min(ts) for name, ts in times.items()}
    ref_name = "recommended | NMSE only"

    def paired(name: str, nmse_name: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[nmse_name]))

    print(f"batch {batch}, N = {base.system.N}, {args.threads} threads, torch {torch.__version__}, {repeats} repeats, one run\n")
    print("| preset | eigen-term path | NMSE only, best (ms) | all terms, best (ms) | ratio of best times | median paired ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for name in PRESETS:
        cfg = preset(name)
        path = "factored (K_max x K_max Gram)" if name == "recommended" else f"full matrix ({cfg.fixes.gap_backend} + {cfg.fixes.subspace_backend})"
        nm, al = best[f"{name} | NMSE only"], best[f"{name} | all terms"]
        pr = paired(f"{name} | all terms", f"{name} | NMSE only")
        print(f"| {name} | {path} | {1000 * nm:.1f} | {1000 * al:.1f} | {al / nm:.2f}x | {pr:.2f}x |")
    ref = best[ref_name]
    for name in cases:
        if name.startswith("recommended,"):
            label = name.split(" | ")[0]
            print(f"| {label} | {'full matrix (eigvalsh + safe)' if 'full' in label else 'factored (2 K_max)'} | {1000 * ref:.1f} | "
                  f"{1000 * best[name]:.1f} | {best[name] / ref:.2f}x | {paired(name, ref_name):.2f}x |")
    prior = min(prior_times)
    print(f"\nmodel.prior_factor (eigh of R_samp, inside every recommended step): {1000 * prior:.1f} ms = "
          f"{100 * prior / ref:.0f} % of the NMSE-only step, {100 * prior / best['recommended | all terms']:.0f} % of the full step")
    ratio = best["recommended | all terms"] / ref
    print(f"goal (recommended: all terms at most 1.10x NMSE only): {'met' if ratio <= 1.10 else 'MISSED'} ({ratio:.2f}x best times, "
          f"{paired('recommended | all terms', ref_name):.2f}x median paired)")


if __name__ == "__main__":
    main()
