"""Figures and prose of :mod:`workbench.studies.pipeline` (notebooks 01, 02): norms per preset, eigenvalue spectra, loading;
what the normalisation rows and the spectra say, as markdown bullets."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ..studies import median
from ..studies.pipeline import MATRICES, SUMMARISED, Spectra
from . import COLOURS, fmt, legend_outside, markdown_table

ZERO_REL = 1e-9  # eigenvalues below this fraction of lambda_max are numerically zero (float32 rounding is ~1e-7)


def norms_figure(rows: list[dict]) -> Figure:
    """Grouped bars, log scale: the median Frobenius norm of each matrix per preset, with rank(R_blend) above
    its bar."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(rows)) + 1.6, 3.8))
    width = 0.8 / len(SUMMARISED)
    for j, name in enumerate(SUMMARISED):
        xs = [i + (j - (len(SUMMARISED) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[name]["fro"] for r in rows], width, label=name.replace("R_samp_raw", "R_samp before Fix 1"), color=COLOURS[name])
    for i, r in enumerate(rows):
        ax.annotate(f"rank\n{r['R_blend']['rank']:.0f}", (i + 1.5 * width, r["R_blend"]["fro"]), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.set_xticks(range(len(rows)), [r["preset"] for r in rows], rotation=15)
    ax.set_xlabel("preset")
    ax.set_ylabel("median ‖R‖_F (log scale)")
    ax.set_title("Size of each matrix of the pipeline, per preset")
    legend_outside(ax)
    fig.tight_layout()
    return fig


def _nonzero(ev: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Eigenvalues with the numerically zero ones (below ZERO_REL lambda_max) replaced by NaN, and that floor."""
    floor = ZERO_REL * float(ev.abs().max())
    return torch.where(ev > floor, ev, torch.full_like(ev, math.nan)), floor


def spectrum_figure(spec: Spectra, scene: int = 0, matrices: Iterable[str] = MATRICES) -> Figure:
    """Sorted eigenvalues of one scene on a log axis, one line per matrix; K marked by a vertical line and the
    gap lambda_K - lambda_{K+1} of R_blend shaded. Eigenvalues below 1e-9 lambda_max (numerically zero:
    rank deficiency and float32 rounding) are not drawn; the grey band says where they would be."""
    K = int(spec.K[scene])
    fig, ax = plt.subplots(figsize=(8.6, 4.0))
    idx = torch.arange(1, spec.eigvals["R_blend"].shape[-1] + 1)
    floors = []
    for name in matrices:
        ev, floor = _nonzero(spec.eigvals[name][scene])
        floors.append(floor)
        ax.semilogy(idx, ev, ".-", ms=3, lw=1, color=COLOURS[name],
                    label=f"{name}: rank {int(spec.rank[name][scene])}, cond {fmt(float(spec.cond[name][scene]), show_nonfinite=True)}")
    ev = spec.eigvals["R_blend"][scene]
    gap = float(ev[K - 1] - ev[K])
    ax.axhspan(float(ev[K]), float(ev[K - 1]), color=COLOURS["R_blend"], alpha=0.15, label=f"R_blend gap λ_K − λ_K+1 = {fmt(gap)}")
    ax.axvline(K + 0.5, color="k", ls="--", lw=0.8, label=f"K = {K}")
    ax.set_ylim(bottom=max(floors))
    ax.text(0.99, 0.02, "not drawn: eigenvalues below 1e-9 λ_max (numerically zero)", transform=ax.transAxes, ha="right",
            fontsize=7, color="#555")
    ax.set_xlabel("eigenvalue index (largest first)")
    ax.set_ylabel("eigenvalue (trace-N units, log scale)")
    ax.set_title(f"Eigenvalues of the pipeline's matrices, scene {scene} (K = {K})")
    legend_outside(ax)
    fig.tight_layout()
    return fig


def spectrum_plotly(spec: Spectra, scene: int = 0):
    """The same view as :func:`spectrum_figure`, interactive (hover shows index and value)."""
    import plotly.graph_objects as go

    K = int(spec.K[scene])
    fig = go.Figure()
    for name in MATRICES:
        ev = _nonzero(spec.eigvals[name][scene])[0].tolist()
        fig.add_trace(go.Scatter(x=list(range(1, len(ev) + 1)), y=ev, mode="lines+markers", name=name, marker={"size": 3},
                                 line={"color": COLOURS[name]}, connectgaps=False))
    ev = spec.eigvals["R_blend"][scene]
    fig.add_hrect(y0=float(ev[K]), y1=float(ev[K - 1]), fillcolor=COLOURS["R_blend"], opacity=0.15, line_width=0)
    fig.add_vline(x=K + 0.5, line_dash="dash")
    fig.update_yaxes(type="log", title="eigenvalue (trace-N units)")
    fig.update_xaxes(title="eigenvalue index (largest first)")
    fig.update_layout(title=f"Eigenvalues of the pipeline's matrices, scene {scene} (K = {K}); numerically zero ones not drawn", height=420)
    return fig


def loading_figure(rows: list[dict]) -> Figure:
    """Against C_EPS (log-log): the smallest and largest of R_blend's lower eigenvalues lambda_{K+1..N} and the gap
    lambda_K - lambda_{K+1} (medians over scenes); and the condition number."""
    c = [r["c_eps"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 3.6))
    a1.loglog(c, [r["lower_min"] for r in rows], "o-", label="smallest λ_K+1..N")
    a1.loglog(c, [r["lower_max"] for r in rows], "s--", label="largest λ_K+1..N")
    a1.loglog(c, [r["gap"] for r in rows], "^-", label="gap λ_K − λ_K+1")
    a1.set_xlabel("diagonal loading C_EPS (trace-N units)")
    a1.set_ylabel("eigenvalue, median over scenes")
    a1.set_title("Loading lifts the floor and keeps the gap")
    legend_outside(a1)
    a2.loglog(c, [r["cond"] if math.isfinite(r["cond"]) else float("nan") for r in rows], "o-")
    a2.set_xlabel("diagonal loading C_EPS (trace-N units)")
    a2.set_ylabel("cond(R_blend) = λ_max / λ_min")
    a2.set_title("Condition number of R_blend")
    fig.tight_layout()
    return fig


def summary_markdown(rows: list[dict], matrices: Sequence[str] = SUMMARISED) -> str:
    """Normalisation rows as one markdown table: preset, matrix, ||.||_F, trace, rank, cond (medians)."""
    flat = [{"preset": r["preset"], "matrix": m, **{k: r[m][k] for k in ("fro", "trace", "rank", "cond")}} for r in rows for m in matrices]
    return markdown_table(flat, ["preset", "matrix", "fro", "trace", "rank", "cond"])


# ---------------------------------------------------------------------------------------------
# What the numbers say, in markdown (from this run's rows, so it stays true under other parameters)
def _fix_changes(a: dict, b: dict) -> list[str]:
    return [f"{k} {a['config'][k]} → {b['config'][k]}" for k in a["config"] if a["config"][k] != b["config"][k]]


def normalisation_conclusion(rows: list[dict]) -> str:
    """Markdown bullets: for each pair of consecutive presets, the knobs that changed and what happened to the
    median ‖R_samp‖_F and ‖R_blend‖_F; then the rank of R_blend across presets."""
    lines = []
    for a, b in zip(rows, rows[1:]):
        changed = _fix_changes(a, b)
        if not changed:
            continue
        lines.append(f"- **{a['preset']} → {b['preset']}** ({', '.join(changed)}): ‖R_samp‖_F {fmt(a['R_samp']['fro'])} → "
                     f"{fmt(b['R_samp']['fro'])}, ‖R_blend‖_F {fmt(a['R_blend']['fro'])} → {fmt(b['R_blend']['fro'])}.")
    ranks = sorted({int(r["R_blend"]["rank"]) for r in rows})
    loaded = [r["preset"] for r in rows if r["config"]["c_eps"] > 0]
    if ranks and loaded:
        lines.append(f"- R_blend has median rank {', '.join(map(str, ranks))} in these presets: loading by C_EPS > 0 "
                     f"({', '.join(loaded)}) makes it full rank whatever R_pred's rank (the seed's \"rank 144\").")
    raw = [r["R_samp_raw"]["fro"] for r in rows]
    lines.append(f"- Before Fix 1 the estimator's R_samp has ‖·‖_F between {fmt(min(raw))} and {fmt(max(raw))} (raw units).")
    return "\n".join(lines)


def spectrum_conclusion(spec: Spectra, loading: list[dict], scene: int) -> str:
    """Markdown bullets on the ranks, the lower eigenvalues of R_blend and what loading did to the floor and the gap."""
    N = spec.eigvals["R_blend"].shape[-1]
    K = spec.K
    true_rank_is_K = bool((spec.rank["R_true"] == K).all())
    ev = spec.eigvals["R_blend"][scene]
    k = int(K[scene])
    lower = ev[k:]
    lines = [
        f"- R_true has rank K in {'every' if true_rank_is_K else 'not every'} scene (K = {K.tolist()}); R_blend has median rank "
        f"{median(spec.rank['R_blend']):.0f} of N = {N}.",
        f"- In scene {scene} (K = {k}) the {N - k} lower eigenvalues of R_blend lie in [{fmt(float(lower.min()), 4)}, {fmt(float(lower.max()), 4)}]: "
        f"a near-degenerate cluster of {N - k}, separated by the gap λ_K − λ_K+1 = {fmt(float(ev[k - 1] - ev[k]))}.",
    ]
    if len(loading) >= 2:
        a, b = loading[0], loading[-1]
        lines.append(f"- Raising C_EPS from {a['c_eps']:g} to {b['c_eps']:g} moved the lower eigenvalues by "
                     f"{fmt(b['lower_min'] - a['lower_min'], 4)} (C_EPS changed by {fmt(b['c_eps'] - a['c_eps'], 4)}) and the gap from "
                     f"{fmt(a['gap'], 4)} to {fmt(b['gap'], 4)}: loading shifts "
                     "every eigenvalue and leaves every gap, so it cannot cure a 1/(λ_i − λ_j) blow-up.")
    return "\n".join(lines)
