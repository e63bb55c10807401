"""Spectra per second over the full default grid (CPU, 2 threads): batched versus per-scene, separable versus a
full steering table, and the grid memory at the default resolution. Prints a markdown table.

    .venv/bin/python benchmarks/bench_localisation.py [--quick] [--device cpu|cuda|auto] [--threads 2]

On an oversubscribed machine (more busy threads than cores) multi-threaded LAPACK calls such as the eigh of
each spectrum can stall for seconds; the best of several repeats is reported, and --threads 1 is steadier.
"""

from __future__ import annotations

import argparse

import torch
from timing import best_time  # noqa: E402

from workbench import localisation as E
from workbench.config import SystemConfig, resolve_device
from workbench.grid import Grid
from workbench.physics import simulate


def _full_table_spectrum(R: torch.Tensor, K: torch.Tensor, table: torch.Tensor, method: str) -> torch.Tensor:
    """Reference: the same spectrum with the full [G,N] steering table (no separability)."""
    F = E._projector_factor(R, method, K, 1e-3).to(R.dtype)
    q = torch.view_as_real(F.mH @ table.T).square().sum((-1, -3))  # [B,G]
    return 1 / (1 - q).clamp_min(1e-7) if method == "music" else 1 / q


def _measure(method: str, system, grid, R, K, table, repeats: int) -> tuple:
    B = R.shape[0]
    kw = {"K": K} if method == "music" else {}
    t_batch = best_time(lambda: E.spectrum(R, system, grid, method, **kw), repeats, warmup=True)
    def per_scene():
        return [E.spectrum(R[i : i + 1], system, grid, method, **({"K": K[i : i + 1]} if kw else {})) for i in range(B)]

    t_scene = best_time(per_scene, repeats, warmup=True)
    t_full = best_time(lambda: _full_table_spectrum(R, K, table, method), repeats, warmup=True)
    t_loc = best_time(lambda: E.localise(R, system, grid, method, K=K), repeats, warmup=True)
    ref = _full_table_spectrum(R, K, table, method).reshape(B, *grid.shape)
    new = E.spectrum(R, system, grid, method, **kw)
    agree = ((new - ref).abs() / ref.abs()).max().item()
    return (method, B / t_batch, B / t_scene, B / t_full, B / t_loc, agree)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer scenes and repeats")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 by default; on a shared, oversubscribed machine 1 is steadier)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    system = SystemConfig()
    grid = Grid.default(system)
    B, repeats = (4, 1) if args.quick else (16, 3)
    batch = simulate(system, B, seed=0, device=dev)
    R, K = batch.R_true, batch.K
    grid.factors(system, device=dev)  # build the cached tables outside the timings
    table = grid.steering_table(system, device=dev).reshape(-1, system.N)

    rows = [_measure(method, system, grid, R, K, table, repeats) for method in ("music", "mvdr")]

    mem = grid.memory_bytes(system)
    P, T, Q = grid.shape
    print(f"device: {dev}, threads: {torch.get_num_threads()}, scenes: {B}, repeats: {repeats} (best of)")
    print(f"default grid: {P} phi x {T} theta x {Q} r = {grid.size:,} points (N = {system.N})\n")
    print(
        "| method | batched spectra/s | per-scene spectra/s | batched / per-scene | full-table spectra/s | separable / full "
        "| localise scenes/s | max rel. diff vs full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m, sb, ss, sf, sl, agree in rows:
        print(f"| {m} | {sb:.1f} | {ss:.1f} | {sb / ss:.2f} | {sf:.1f} | {sb / sf:.2f} | {sl:.1f} | {agree:.1e} |")
    print("\n| grid memory (complex64) | MB |\n|---|---|")
    print(f"| separable tables a_x [P,T,Q,N_H] + a_z [T,Q,N_V] | {mem['separable'] / 1e6:.2f} |")
    print(f"| full steering table [P,T,Q,N] | {mem['full'] / 1e6:.2f} |")
    print(f"| one float32 spectrum per scene | {mem['spectrum_per_scene'] / 1e6:.3f} |")


if __name__ == "__main__":
    main()
