"""Notebook 03: which eigen backends keep gradients finite, measured four ways.

* :func:`degeneracy_check`: R = trace-normalised R_true + C_EPS I (N - K exactly equal eigenvalues) through
  every gap and subspace backend, gradient with respect to R;
* :func:`fd_check`: float64 finite differences of the eigengap hinge on the real R_blend (and the SVD flip);
* :func:`backend_reports`: one real forward and backward of the network per backend, with NaN provenance;
* :func:`gradient_conclusions`: what the three say, as data (in words: :func:`workbench.figures.gradients.gradient_verdict`).
"""

from __future__ import annotations

import inspect
import math

import torch

from .. import spectral
from ..config import GAP_BACKENDS, SUBSPACE_BACKENDS, ExperimentConfig
from ..covariance import diagonal_load, spectrum_stats, trace_normalise
from ..diagnostics import gradient_report
from ..physics import SceneBatch, steering
from . import median
from .pipeline import pipeline_matrices

FD_DIRS = inspect.signature(spectral.eigengap_hinge).parameters["fd_dirs"].default  # directions of the finite_diff backward


def backend_reports(cfg: ExperimentConfig, batch: SceneBatch, model: torch.nn.Module, seed: int = 0) -> list[dict]:
    """One :func:`workbench.diagnostics.gradient_report` per gap backend (the other knobs as in ``cfg``) and
    per subspace backend. Rows: {"kind": "gap"|"subspace", "backend", "term", "term_value", "term_finite"
    (the term's own gradient is finite in every group), "term_grad_norm" {group}, "ok" (the total's), "grad_norm",
    "provenance", "hinge_active" (gap rows: the hinge is non-zero in some scene; when it is not, its gradient is
    exactly zero whatever the backend, which says nothing about degeneracy)}."""

    rows = []
    for kind, backends in (("gap", GAP_BACKENDS), ("subspace", SUBSPACE_BACKENDS)):
        for b in backends:
            rep = gradient_report(cfg.replace(**{f"fixes.{kind}_backend": b}), batch, model, seed=seed)
            tg = rep["term_grad_norm"][kind]
            rows.append({"kind": kind, "backend": b, "term": kind, "term_value": rep["terms"][kind],
                         "term_finite": all(math.isfinite(v) for v in tg.values()), "term_grad_norm": tg, "ok": rep["ok"],
                         "loss": rep["loss"], "grad_norm": rep["grad_norm"], "provenance": rep["provenance"],
                         "hinge_active": rep["terms"]["gap"] > 0 if kind == "gap" else None})
    return rows


def _hermitian_direction(n: int, N: int, seed: int, dtype=torch.complex128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    E = torch.complex(torch.randn(n, N, N, generator=g, dtype=torch.float64), torch.randn(n, N, N, generator=g, dtype=torch.float64))
    E = 0.5 * (E + E.mH)
    return (E / torch.linalg.matrix_norm(E)[:, None, None]).to(dtype)


def degeneracy_check(cfg: ExperimentConfig, batch: SceneBatch, c_eps: float | None = None, dtype: torch.dtype = torch.complex64) -> list[dict]:
    """Heavy degeneracy, exactly: R = trace-normalised R_true + C_EPS I in ``dtype`` (complex64, the compute
    dtype of training, by default): a rank-K signal part, so N-K eigenvalues equal C_EPS to rounding.
    For every gap backend the eigengap hinge (margin 1e3,
    always active) and for every subspace backend the subspace energy at the true sources is
    back-propagated to R. Rows: {"term", "backend", "value", "grad_finite", "grad_norm", "error", "degenerate"
    (median count of eigenvalues within 8 eps(dtype) lambda_max of the smallest), "distinct" (median count of
    distinct values among those, i.e. exact ties leave 1)}."""

    c = cfg.fixes.c_eps if c_eps is None else c_eps
    R0 = diagonal_load(trace_normalise(batch.R_true.to(dtype)), c)
    ev = torch.linalg.eigvalsh(R0)
    close = (ev - ev[:, :1]).abs() <= 8 * torch.finfo(ev.dtype).eps * ev[:, -1:].abs()
    degenerate = median(close.sum(-1).double())
    distinct = median(torch.tensor([float(torch.unique(e[m]).numel()) for e, m in zip(ev, close)]))
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    a_true = steering(cfg.system, batch.phi.to(real), batch.theta.to(real), torch.where(batch.mask, batch.r, 1.0).to(real))
    rows = []
    for term, backends in (("gap", GAP_BACKENDS), ("subspace", SUBSPACE_BACKENDS)):
        for b in backends:
            R = R0.clone().requires_grad_(True)
            if term == "gap":
                value = spectral.eigengap_hinge(R, batch.K, 1e3, cfg.fixes.eps_psd, b).sum()
            else:
                value = spectral.subspace_energy(R, a_true, batch.mask, batch.K, b, cfg.fixes.lorentzian_eps).sum()
            try:
                (g,) = torch.autograd.grad(value, R, allow_unused=True)
                err = None
            except RuntimeError as e:  # e.g. a phase-dependent eigenvector loss: PyTorch refuses
                g, err = None, str(e).splitlines()[0]
            gn = float("nan") if g is None and err else 0.0 if g is None else float(torch.linalg.vector_norm(g))
            rows.append({"term": term, "backend": b, "value": float(value.detach()), "grad_finite": err is None and math.isfinite(gn),
                         "grad_norm": gn, "error": err, "degenerate": degenerate, "distinct": distinct})
    return rows


def fd_check(cfg: ExperimentConfig, batch: SceneBatch, step: float = 1e-6, margin: float = 1e3, seed: int = 0) -> list[dict]:
    """Float64 finite-difference check of the eigengap hinge per gap backend, on the batch's real R_blend
    (complex128). With ``margin`` large the hinge is active, hinge = margin - gap, so the backend's gap is
    read off its value. For a random unit Hermitian direction E per scene: autograd's Re<grad, E> against
    (f(R + hE) - f(R - hE)) / 2h. Rows: {"backend", "gap" (median), "gap_eigvalsh" (independent median
    lambda_K - lambda_{K+1} of R_blend + EPS_PSD I), "hinge" (at the config's margin, mean), "autograd", "fd",
    "rel_err", "grad_finite", "note"}. The ``finite_diff`` backend's backward is itself a stochastic estimate
    from ``n_dirs`` random directions: along one random direction its relative error is of order
    N / sqrt(n_dirs) (the standard error of a Monte-Carlo average, not a bug); its note says so."""

    mats = pipeline_matrices(cfg, batch, seed=seed)
    R0, K = mats.R_blend.to(torch.complex128), mats.K
    E = _hermitian_direction(R0.shape[0], R0.shape[-1], seed)
    ref_gap = spectrum_stats(diagonal_load(R0, cfg.fixes.eps_psd), K)["gap"]
    rows = []
    for b in GAP_BACKENDS:
        def f(R, m=margin, b=b):
            return spectral.eigengap_hinge(R, K, m, cfg.fixes.eps_psd, b)

        R = R0.clone().requires_grad_(True)
        h = f(R)
        (g,) = torch.autograd.grad(h.sum(), R, allow_unused=True)
        g = torch.zeros_like(R) if g is None else g
        auto = (g.conj() * E).real.sum((-2, -1))
        with torch.no_grad():
            fd = (f(R0 + step * E) - f(R0 - step * E)) / (2 * step)
            hinge = float(f(R0, cfg.fixes.gap_margin).mean())
        rel = ((auto - fd).abs() / fd.abs().clamp_min(1e-12)).double()
        note = ""
        if b == "finite_diff":
            note = f"stochastic backward: relative error ~ N/sqrt(n_dirs) = {R0.shape[-1] / math.sqrt(FD_DIRS):.3g} along one direction"
        elif b == "svd_flipped":
            note = "the flipped order measures the gap between the two smallest eigenvalues"
        rows.append({"backend": b, "gap": median(margin - h.detach()), "gap_eigvalsh": median(ref_gap), "hinge": hinge,
                     "autograd": median(auto), "fd": median(fd), "rel_err": float(rel.max()),
                     "grad_finite": bool(torch.isfinite(g).all()), "note": note})
    return rows


def gradient_conclusions(deg: list[dict], fd: list[dict], reports: list[dict], rtol: float = 1e-4) -> dict:
    """What 03 shows, as data computed from :func:`degeneracy_check`, :func:`fd_check` and :func:`backend_reports`."""
    gap_deg = {r["backend"]: r["grad_finite"] for r in deg if r["term"] == "gap"}
    sub_deg = {r["backend"]: r["grad_finite"] for r in deg if r["term"] == "subspace"}
    by_fd = {r["backend"]: r for r in fd}
    flip = {k: {"gap": by_fd[k]["gap"], "hinge": by_fd[k]["hinge"]} for k in ("eigh", "svd", "svd_flipped") if k in by_fd}
    return {
        "eigenvalue_only_gap_grad_finite_under_degeneracy": gap_deg,
        "subspace_grad_finite_under_degeneracy": sub_deg,
        "subspace_backends_finite_in_network": [r["backend"] for r in reports if r["kind"] == "subspace" and r["term_finite"]],
        "gap_backends_finite_in_network": [r["backend"] for r in reports if r["kind"] == "gap" and r["term_finite"]],
        "svd_flip": flip,
        "fd_agrees": [r["backend"] for r in fd if r["rel_err"] < rtol],
        "fd_disagrees": [r["backend"] for r in fd if not r["rel_err"] < rtol],
    }
