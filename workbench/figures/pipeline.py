"""Figures of :mod:`workbench.studies.pipeline` (notebooks 01, 02): norms per preset, eigenvalue spectra, loading."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ..studies.pipeline import MATRICES, Spectra
from . import COLOURS, markdown_table


def norms_figure(rows: list[dict]) -> Figure:
    """Grouped bars, log scale: median ||R||_F of each matrix per preset, with rank(R_blend) written on top."""
    names = ("R_samp_raw", "R_samp", "R_pred", "R_blend")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 3.8))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [max(r[name]["fro"], 1e-30) for r in rows], width, label=name, color=COLOURS[name])
    for i, r in enumerate(rows):
        ax.annotate(f"rank {r['R_blend']['rank']:.0f}", (i + 1.5 * width, r["R_blend"]["fro"]), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["preset"] for r in rows], rotation=15)
    ax.set_ylabel("median Frobenius norm")
    ax.set_title("Fix 1 / Fix 2: norms of the pipeline's matrices")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def _floor(ev: torch.Tensor) -> torch.Tensor:
    """Eigenvalues clipped below at 1e-12 of the largest, so a log axis can show zeros and rounding noise."""
    return ev.clamp_min(1e-12 * float(ev.abs().max()))


def spectrum_figure(spec: Spectra, scene: int = 0, matrices: Iterable[str] = MATRICES) -> Figure:
    """Sorted eigenvalues of one scene on a log axis, one line per matrix; K marked by a vertical line and
    the gap lambda_K - lambda_{K+1} of R_blend shaded. Values below 1e-12 lambda_max are drawn at that floor."""
    K = int(spec.K[scene])
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    idx = torch.arange(1, spec.eigvals["R_blend"].shape[-1] + 1)
    for name in matrices:
        ev = spec.eigvals[name][scene]
        ax.semilogy(idx, _floor(ev), ".-", ms=3, lw=1, color=COLOURS[name],
                    label=f"{name}: rank {int(spec.rank[name][scene])}, cond {float(spec.cond[name][scene]):.3g}")
    ev = spec.eigvals["R_blend"][scene]
    ax.axhspan(float(ev[K]), float(ev[K - 1]), color=COLOURS["R_blend"], alpha=0.15, label=f"R_blend gap λ_K-λ_K+1 = {float(ev[K-1]-ev[K]):.3g}")
    ax.axvline(K + 0.5, color="k", ls="--", lw=0.8, label=f"K = {K}")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue (trace-N units)")
    ax.set_title(f"Eigenvalue spectra, scene {scene}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def spectrum_plotly(spec: Spectra, scene: int = 0):
    """The same view as :func:`spectrum_figure`, interactive (hover shows index and value)."""
    import plotly.graph_objects as go

    K = int(spec.K[scene])
    fig = go.Figure()
    for name in MATRICES:
        ev = _floor(spec.eigvals[name][scene]).tolist()
        fig.add_trace(go.Scatter(x=list(range(1, len(ev) + 1)), y=ev, mode="lines+markers", name=name, marker={"size": 3},
                                 line={"color": COLOURS[name]}))
    ev = spec.eigvals["R_blend"][scene]
    fig.add_hrect(y0=float(ev[K]), y1=float(ev[K - 1]), fillcolor=COLOURS["R_blend"], opacity=0.15, line_width=0)
    fig.add_vline(x=K + 0.5, line_dash="dash")
    fig.update_yaxes(type="log", title="eigenvalue")
    fig.update_xaxes(title="index (descending)")
    fig.update_layout(title=f"Eigenvalue spectra, scene {scene} (K = {K})", height=420)
    return fig


def loading_figure(rows: list[dict]) -> Figure:
    """Lower eigenvalues, gap, and condition number of R_blend against C_EPS (log-log)."""
    c = [max(r["c_eps"], 1e-12) for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    a1.loglog(c, [max(r["lower_min"], 1e-16) for r in rows], "o-", label="min λ_{K+1..N}")
    a1.loglog(c, [max(r["lower_max"], 1e-16) for r in rows], "s-", label="max λ_{K+1..N}")
    a1.loglog(c, [max(r["gap"], 1e-16) for r in rows], "^-", label="gap λ_K-λ_{K+1}")
    a1.set_xlabel("C_EPS")
    a1.set_ylabel("median over scenes")
    a1.legend(fontsize=8)
    a1.set_title("loading lifts the floor, keeps the gap")
    a2.loglog(c, [r["cond"] if math.isfinite(r["cond"]) else float("nan") for r in rows], "o-")
    a2.set_xlabel("C_EPS")
    a2.set_ylabel("cond(R_blend)")
    a2.set_title("condition number")
    fig.tight_layout()
    return fig


def summary_markdown(rows: list[dict], matrices: Sequence[str] = ("R_samp_raw", "R_samp", "R_pred", "R_blend")) -> str:
    """:func:`normalisation_rows` as one markdown table: preset, matrix, ||.||_F, trace, rank, cond (medians)."""
    flat = [{"preset": r["preset"], "matrix": m, **{k: r[m][k] for k in ("fro", "trace", "rank", "cond")}} for r in rows for m in matrices]
    return markdown_table(flat)
