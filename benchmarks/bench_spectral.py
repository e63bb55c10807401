"""Eigengap hinge + subspace term, forward and backward: the original pipeline's way vs batched full matrix vs factored.

Usage: python benchmarks/bench_spectral.py [--device cpu|cuda|auto] [--quick] [--batch 64] [--n 144] [--repeats 7]

The input has the structure of the pipeline's R_blend: R = F F^H + C_EPS I, trace N, C_EPS = 0.01, with
F = A [B,N,K_max] (the network's factor, `recommended`: beta = 0) or F = [sqrt(0.7) A, sqrt(0.3) F_samp]
(a blend with a rank-K_max R_samp, beta = 0.3).

(a) original: full torch.linalg.svd with vectors, then a per-scene Python loop with .item() to pick
    lambda_K, lambda_{K+1} and the top-K vectors;
(b) batched full matrix: eigengap_hinge(backend="eigvalsh") + subspace_energy(backend="safe") on R;
(c) factored: eigengap_hinge(backend="exact") + subspace_energy(backend="safe") on the Factored R: an r x r
    Gram matrix (r = K_max, or 2 K_max with the blend) instead of an N x N eigendecomposition.
The inputs are drawn on the CPU (the same on every device) and moved to ``--device``; on CUDA every call is
synchronised. Prints the device, then a markdown table: the best ms per call (forward + backward) over the repeats of one run (on a shared machine
noise only adds time), the ratios against (a), and how far (b) and (c) are from a complex128 reference (values and gradients w.r.t. R's factor).
"""

from __future__ import annotations

import argparse
import time

import torch

from workbench import spectral as sp
from workbench.config import resolve_device
from workbench.covariance import Factored

C_EPS = 0.01


def make_inputs(B: int, N: int, kmax: int = 5, blend: bool = False, seed: int = 0, dtype=torch.complex64):
    """(F [B,N,r], K [B], a [B,kmax,N], mask [B,kmax]): F F^H of trace N with decaying column powers."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, N, kmax, dtype=torch.complex128, generator=g) * torch.logspace(0, -2, kmax, dtype=torch.float64)
    F = A
    if blend:
        F_samp = torch.randn(B, N, kmax, dtype=torch.complex128, generator=g)
        F = torch.cat([0.7**0.5 * A, 0.3**0.5 * F_samp / F_samp.norm(dim=(1, 2), keepdim=True) * A.norm(dim=(1, 2), keepdim=True)], -1)
    F = F * (N / F.norm(dim=(1, 2), keepdim=True) ** 2).sqrt()
    K = torch.randint(1, kmax + 1, (B,), generator=g)
    a = torch.randn(B, kmax, N, dtype=torch.complex128, generator=g)
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    mask = torch.arange(kmax)[None, :] < K[:, None]
    return F.to(dtype), K, a.to(dtype), mask


def formed(F: torch.Tensor) -> torch.Tensor:
    return F @ F.mH + C_EPS * torch.eye(F.shape[1], dtype=F.dtype, device=F.device)


def original(F, K, a, mask, margin=0.03, eps_psd=1e-4):
    """The original pipeline's way: full SVD with vectors, then a per-scene loop with .item()."""
    Rl = formed(F) + eps_psd * torch.eye(F.shape[1], dtype=F.dtype, device=F.device)
    U, S, _ = torch.linalg.svd(Rl)
    hinge, energy = [], []
    for b in range(F.shape[0]):
        k = int(K[b].item())
        hinge.append(torch.relu(margin - (S[b, k - 1] - S[b, k])))
        proj = (a[b, :k].conj() @ U[b, :, :k]).abs().square().sum(-1)
        energy.append((1.0 - proj).sum() / k)
    return torch.stack(hinge), torch.stack(energy)


def full_matrix(F, K, a, mask, margin=0.03):
    R = formed(F)
    return sp.eigengap_hinge(R, K, margin, backend="eigvalsh", validate=False), sp.subspace_energy(R, a, mask, K, backend="safe", validate=False)


def factored(F, K, a, mask, margin=0.03):
    X = Factored(formed(F), F, C_EPS)  # R is formed here too, as the pipeline forms it for the NMSE
    return sp.eigengap_hinge(X, K, margin, backend="exact", validate=False), sp.subspace_energy(X, a, mask, K, backend="safe", validate=False)


def time_call(fn, F, K, a, mask, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        Fr = F.clone().requires_grad_()
        _sync(F.device)
        t0 = time.perf_counter()
        h, e = fn(Fr, K, a, mask)
        (h.sum() + e.sum()).backward()
        _sync(F.device)
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def errors(fn, F, K, a, mask, margin=50.0) -> tuple[float, float]:
    """Largest relative error of values and of gradients w.r.t. F against the complex128 full-matrix path
    (margin 50: the hinge is active, so its gradient is tested too)."""

    def run(fn, F, a):
        F = F.clone().requires_grad_()
        h, e = fn(F, K, a, mask, margin=margin)
        (g,) = torch.autograd.grad(h.sum() + e.sum(), F)
        return torch.cat([h, e]).detach().double(), g.to(torch.complex128)

    v_ref, g_ref = run(full_matrix, F.to(torch.complex128), a.to(torch.complex128))
    v, g = run(fn, F, a)
    return float((v - v_ref).abs().max() / v_ref.abs().max()), float((g - g_ref).abs().max() / g_ref.abs().max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (CUDA when present); cuda:N also works")
    ap.add_argument("--quick", action="store_true", help="batch 8, 2 repeats: a smoke run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=144)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.device.split(":")[0] not in ("cpu", "cuda", "auto"):
        ap.error(f"--device {args.device}: expected one of cpu, cuda, auto")
    device = resolve_device(args.device)
    if args.quick:
        args.batch, args.repeats = 8, 2
    torch.set_num_threads(args.threads)
    inputs = {"beta = 0 (r = K_max)": make_inputs(args.batch, args.n), "beta = 0.3 (r = 2 K_max)": make_inputs(args.batch, args.n, blend=True)}
    inputs = {label: tuple(t.to(device) for t in x) for label, x in inputs.items()}
    rows = [
        ("(a) original: svd + per-scene loop with .item()", original),
        ("(b) batched full matrix: eigvalsh + safe (N x N eigh)", full_matrix),
        ("(c) factored: exact + safe (r x r Gram matrix)", factored),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device {device} ({name}), batch {args.batch}, N = {args.n}, complex64, torch {torch.__version__}, best of {args.repeats}, one run")
    print("\n| input | method (hinge + subspace, forward + backward) | ms per call | speed-up vs (a) | value / gradient error vs complex128 |")
    print("|---|---|---:|---:|---|")
    for label, (F, K, a, mask) in inputs.items():
        ms = {name: time_call(fn, F, K, a, mask, args.repeats) for name, fn in rows}
        base = ms[rows[0][0]]
        for name, fn in rows:
            err = "-" if fn is original else "{:.1e} / {:.1e}".format(*errors(fn, F, K, a, mask))
            print(f"| {label} | {name} | {ms[name]:.2f} | {base / ms[name]:.1f}x | {err} |")


if __name__ == "__main__":
    main()
