"""A training step's time on one device: forward, backward and AdamW through ``workbench.forward.forward`` with the
R_samp and the prior factor taken from the batch's cache (as training takes them: computed once per scene, so no step
decomposes R_samp), for `recommended` at several batch sizes and a seed preset; then every loss term on versus the
NMSE term alone for `recommended` and each seed preset (goal: the eigen-terms add at most 10 % to a `recommended`
step at batch 64).

    .venv/bin/python benchmarks/bench_train_step.py [--device cpu|cuda|auto] [--quick] [--threads 2] [--batches 64,256]
        [--batch 64] [--seed-preset seed_fix3] [--repeats 7] [--amp]

Every configuration has its preset's own model and R_samp; the configurations are interleaved in one run. The tables
give the best (least disturbed) time of each over the repeats (on a shared machine noise only adds time); the
second also the ratio of those best times and the median over repeats of the paired ratio (all terms / NMSE only
measured back to back), which cancels slow drifts of the machine's load. On CUDA every step is synchronised.
``--amp``: also the `recommended` step with ``train.amp`` (the encoder under autocast: float16 with a GradScaler on
CUDA, bfloat16 without one on a CPU), with the number of steps the scaler skipped (an inf/NaN gradient under float16).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench import spectral
from workbench.config import SEED_PRESETS, check_choice, preset, resolve_device
from workbench.forward import forward, rsamp_cache
from workbench.losses import term_weights
from workbench.model import CovarianceNet, build_model
from workbench.physics import simulate, steering

PRESETS = ("recommended", *SEED_PRESETS)
DEVICES = ("cpu", "cuda", "auto")


def full_matrix_losses(model, b, Rs, prior, cfg, amp):
    """`recommended`'s losses with the two eigen-terms on the formed R_blend (eigvalsh hinge, safe subspace on a
    144 x 144 eigh): the path every step took before the factored one."""
    run = forward(model, b, Rs, cfg, prior=prior, terms=("nmse", "k_ce", "aux"), amp=amp)
    losses, cov = run.losses, run.cov
    f, w = cfg.fixes, term_weights(cfg)
    a_true = steering(cfg.system, b.phi, b.theta, torch.where(b.mask, b.r, 1.0))
    gap = spectral.eigengap_hinge(cov.R_blend, b.K, f.gap_margin, f.eps_psd, "eigvalsh").mean()
    subspace = spectral.subspace_energy(cov.R_blend, a_true, b.mask, b.K, "safe").mean()
    return {"total": losses["total"] + w["gap"] * gap + w["subspace"] * subspace}


def forward_losses(terms):
    def fn(model, b, Rs, prior, cfg, amp):
        return forward(model, b, Rs, cfg, prior=prior, terms=terms, losses=True, amp=amp).losses
    return fn


class Case:
    """One timed configuration: its config, batch size, loss function and amp flag, with its own model, optimiser and
    (on CUDA with amp) GradScaler; ``times`` collects the step times, ``skipped`` the steps the scaler skipped."""

    def __init__(self, cfg, batch: int, loss_fn, device, amp: bool = False):
        self.cfg, self.batch, self.loss_fn, self.amp = cfg, batch, loss_fn, amp
        self.model = build_model(cfg.system, cfg.model, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
        self.times: list[float] = []
        self.skipped = 0

    def step(self, data, device, record: bool) -> None:
        cache = rsamp_cache(data)
        b = data[:self.batch]
        Rs, prior = cache.rsamp_of(self.cfg)[:self.batch], cache.prior_of(self.cfg)
        prior = None if prior is None else prior[:self.batch]
        _sync(device)
        t0 = time.perf_counter()
        losses = self.loss_fn(self.model, b, Rs, prior, self.cfg, self.amp)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.opt)
        self.scaler.update()
        _sync(device)
        if record:
            self.times.append(time.perf_counter() - t0)
            if scale is not None and self.scaler.get_scale() < scale:  # the scaler lowers its scale when it skips
                self.skipped += 1

    @property
    def best_ms(self) -> float:
        return 1000 * min(self.times)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (CUDA when present); cuda:N also works")
    ap.add_argument("--quick", action="store_true", help="batches 8,16, batch 8, 2 repeats: a smoke run")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--batches", default="64,256", help="batch sizes of the `recommended` step (comma-separated)")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the seed preset's step and of the terms table")
    ap.add_argument("--seed-preset", default="seed_fix3", help=f"the seed preset of the device table ({', '.join(SEED_PRESETS)})")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--amp", action="store_true", help="also the mixed-precision `recommended` step (train.amp)")
    args = ap.parse_args(argv)
    if args.device.split(":")[0] not in DEVICES:
        ap.error(f"--device {args.device}: expected one of {', '.join(DEVICES)}")
    check_choice("--seed-preset", args.seed_preset, SEED_PRESETS)
    args.batches = [int(x) for x in args.batches.split(",") if x.strip()]
    if args.quick:
        args.batches, args.batch, args.repeats = [8, 16], 8, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = preset("recommended")
    data = simulate(base.system, max([*args.batches, args.batch]), seed=0, device=device)
    step_cases = {f"recommended, batch {b}": Case(base, b, forward_losses(None), device) for b in args.batches}
    seed_cfg = preset(args.seed_preset)
    step_cases[f"{args.seed_preset}, batch {args.batch}"] = Case(seed_cfg, args.batch, forward_losses(None), device)
    if args.amp:
        for b in args.batches:
            step_cases[f"recommended + amp, batch {b}"] = Case(base, b, forward_losses(None), device, amp=True)
    term_cases = {}
    for name in PRESETS:
        cfg = preset(name)
        term_cases[f"{name} | NMSE only"] = Case(cfg, args.batch, forward_losses(("nmse",)), device)
        term_cases[f"{name} | all terms"] = Case(cfg, args.batch, forward_losses(None), device)
    term_cases["recommended, eigen-terms on the full matrix | all terms"] = Case(base, args.batch, full_matrix_losses, device)
    term_cases["recommended, beta = 0.3 (low-rank beamscan R_samp blended) | all terms"] = Case(
        base.replace(**{"fixes.beta": 0.3}), args.batch, forward_losses(None), device)
    cache = rsamp_cache(data)
    t0 = time.perf_counter()
    for case in (*step_cases.values(), *term_cases.values()):  # R_samp and the prior factor: once, before any step
        cache.rsamp_of(case.cfg), cache.prior_of(case.cfg)
    setup_s = time.perf_counter() - t0
    for rep in range(args.repeats + 1):  # the first round warms up
        for case in (*step_cases.values(), *term_cases.values()):
            case.step(data, device, record=rep > 0)
    R_rec = cache.rsamp_of(base)[:args.batch]
    _sync(device)
    t0 = time.perf_counter()
    CovarianceNet.prior_factor(R_rec, base.system.K_max)
    _sync(device)
    prior_ms = 1000 * (time.perf_counter() - t0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device {device} ({name}), N = {base.system.N}, torch {torch.__version__}, {args.repeats} repeats, one run")
    print(f"R_samp and prior factors of {len(data)} scenes, computed once before the steps: {setup_s:.1f} s\n")
    print("| step (forward + backward + AdamW, all terms, cached prior) | best (ms) | median (ms) | scaler skipped |")
    print("|---|---:|---:|---:|")
    for label, c in step_cases.items():
        skipped = f"{c.skipped} of {len(c.times)}" if c.scaler.is_enabled() else "-"
        print(f"| {label} | {c.best_ms:.1f} | {1000 * statistics.median(c.times):.1f} | {skipped} |")

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(term_cases[a].times, term_cases[b].times))

    ref_name = "recommended | NMSE only"
    ref = term_cases[ref_name].best_ms
    print(f"\nbatch {args.batch}:\n")
    print("| preset | eigen-term path | NMSE only, best (ms) | all terms, best (ms) | ratio of best times | median paired ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for p in PRESETS:
        cfg = preset(p)
        path = "factored (K_max x K_max Gram)" if p == "recommended" else f"full matrix ({cfg.fixes.gap_backend} + {cfg.fixes.subspace_backend})"
        nm, al = term_cases[f"{p} | NMSE only"].best_ms, term_cases[f"{p} | all terms"].best_ms
        print(f"| {p} | {path} | {nm:.1f} | {al:.1f} | {al / nm:.2f}x | {paired(f'{p} | all terms', f'{p} | NMSE only'):.2f}x |")
    for label, c in term_cases.items():
        if label.startswith("recommended,"):
            short = label.split(" | ")[0]
            print(f"| {short} | {'full matrix (eigvalsh + safe)' if 'full' in short else 'factored (2 K_max)'} | {ref:.1f} | "
                  f"{c.best_ms:.1f} | {c.best_ms / ref:.2f}x | {paired(label, ref_name):.2f}x |")
    print(f"\nmodel.prior_factor of {args.batch} scenes (once per scene from the cache, in no step above): {prior_ms:.1f} ms")
    ratio = term_cases["recommended | all terms"].best_ms / ref
    print(f"goal (recommended: all terms at most 1.10x NMSE only): {'met' if ratio <= 1.10 else 'MISSED'} ({ratio:.2f}x best times, "
          f"{paired('recommended | all terms', ref_name):.2f}x median paired)")


if __name__ == "__main__":
    main()
