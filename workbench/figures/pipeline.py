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
from . import COLOURS, WIDTH_IN, fmt, legend_outside, markdown_table

UNITS = "R_true, R_samp: trace-N units; R_pred, R_blend: the network's scale"


def norms_figure(rows: list[dict]) -> Figure:
    """Grouped bars, log scale: the median Frobenius norm of each matrix per preset, with rank(R_blend) above
    its bar."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.6), layout="constrained")
    width = 0.8 / len(SUMMARISED)
    for j, name in enumerate(SUMMARISED):
        xs = [i + (j - (len(SUMMARISED) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[name]["fro"] for r in rows], width, label=name.replace("R_samp_raw", "R_samp before Fix 1"), color=COLOURS[name])
    for i, r in enumerate(rows):
        ax.annotate(f"{r['R_blend']['rank']:.0f}", (i + 1.5 * width, r["R_blend"]["fro"]), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.set_xticks(range(len(rows)), [r["preset"] for r in rows], rotation=20 if len(rows) > 3 else 0, fontsize=8)
    ax.set_xlabel("preset")
    ax.set_ylabel("median ‖R‖_F (log scale)")
    ax.set_title("Size of each matrix of the pipeline, per preset (number: rank of R_blend)", fontsize=9)
    legend_outside(ax)
    return fig


def floor_of(ev: torch.Tensor) -> float:
    """The rounding floor of a spectrum: N eps lambda_max (eps of the eigenvalues' dtype, float32 for complex64
    matrices). Eigenvalues below it are rounding noise, not spectrum."""
    eps = torch.finfo(ev.dtype if ev.dtype.is_floating_point else torch.float32).eps
    return ev.shape[-1] * eps * float(ev.abs().max())


def _above_floor(ev: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Eigenvalues with those below :func:`floor_of` replaced by NaN, that floor, and how many were below it."""
    floor = floor_of(ev)
    keep = ev > floor
    return torch.where(keep, ev, torch.full_like(ev, math.nan)), floor, int((~keep).sum())


def spectrum_figure(spec: Spectra, scene: int = 0, matrices: Iterable[str] = MATRICES) -> Figure:
    """Sorted eigenvalues of one scene on a log axis, one line per matrix; K marked by a vertical line and the gap
    lambda_K - lambda_{K+1} of R_blend shaded. Eigenvalues below N eps lambda_max (:func:`floor_of`: float32 rounding
    noise, rank deficiency) are not spectrum: they are drawn as hollow triangles on that matrix's floor and counted in
    the legend."""
    K = int(spec.K[scene])
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.8), layout="constrained")
    idx = torch.arange(1, spec.eigvals["R_blend"].shape[-1] + 1)
    floors = []
    for name in matrices:
        ev, floor, n_low = _above_floor(spec.eigvals[name][scene])
        floors.append(floor)
        label = f"{name}: rank {int(spec.rank[name][scene])}, cond {fmt(float(spec.cond[name][scene]), show_nonfinite=True)}"
        ax.semilogy(idx, ev, ".-", ms=3, lw=1, color=COLOURS[name], label=label + (f", {n_low} at the floor" if n_low else ""))
        low = torch.isnan(ev)
        if n_low:
            ax.plot(idx[low], [floor] * n_low, "v", mfc="none", ms=4, color=COLOURS[name])
    ev = spec.eigvals["R_blend"][scene]
    gap = float(ev[K - 1] - ev[K])
    ax.axhspan(float(ev[K]), float(ev[K - 1]), color=COLOURS["R_blend"], alpha=0.15, label=f"R_blend gap λ_K − λ_K+1 = {fmt(gap)}")
    ax.axvline(K + 0.5, color="k", ls="--", lw=0.8, label=f"K = {K}")
    ax.plot([], [], "v", mfc="none", color="#555", label="at the floor N·eps·λ_max\n(rounding noise, not drawn as spectrum)")
    ax.set_ylim(bottom=min(floors) / 3)
    ax.set_xlabel("eigenvalue index (largest first)")
    ax.set_ylabel("eigenvalue (log)")
    ax.set_title(f"Eigenvalues of the pipeline's matrices, scene {scene} (K = {K})", fontsize=9)
    legend_outside(ax)
    fig.supxlabel(UNITS, fontsize=7, color="#555")
    return fig


def spectrum_plotly(spec: Spectra, scene: int = 0):
    """The same view as :func:`spectrum_figure`, interactive (hover shows index and value); eigenvalues below the
    rounding floor are left out (a gap in the line)."""
    import plotly.graph_objects as go

    K = int(spec.K[scene])
    fig = go.Figure()
    for name in MATRICES:
        ev, _, n_low = _above_floor(spec.eigvals[name][scene])
        fig.add_trace(go.Scatter(x=list(range(1, len(ev) + 1)), y=ev.tolist(), mode="lines+markers", marker={"size": 3},
                                 name=name + (f" ({n_low} at the floor)" if n_low else ""), line={"color": COLOURS[name]}, connectgaps=False))
    ev = spec.eigvals["R_blend"][scene]
    fig.add_hrect(y0=float(ev[K]), y1=float(ev[K - 1]), fillcolor=COLOURS["R_blend"], opacity=0.15, line_width=0)
    fig.add_vline(x=K + 0.5, line_dash="dash")
    fig.update_yaxes(type="log", title="eigenvalue (log)")
    fig.update_xaxes(title=f"eigenvalue index (largest first); {UNITS}")
    fig.update_layout(title=f"Eigenvalues, scene {scene} (K = {K}); below N·eps·λ_max (rounding) not drawn", height=420)
    return fig


def loading_figure(rows: list[dict]) -> Figure:
    """Against C_EPS (log-log): the smallest and largest of R_blend's lower eigenvalues lambda_{K+1..N} and the gap
    lambda_K - lambda_{K+1} (medians over scenes); and below, the condition number."""
    c = [r["c_eps"] for r in rows]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(WIDTH_IN, 5.2), layout="constrained", sharex=True)
    a1.loglog(c, [r["lower_min"] for r in rows], "o-", label="smallest λ_K+1..N")
    a1.loglog(c, [r["lower_max"] for r in rows], "s--", label="largest λ_K+1..N")
    a1.loglog(c, [r["gap"] for r in rows], "^-", label="gap λ_K − λ_K+1")
    a1.set_xlabel("diagonal loading C_EPS (trace-N units)")
    a1.set_ylabel("eigenvalue, median")
    a1.set_title("Loading lifts the floor and keeps the gap", fontsize=9)
    legend_outside(a1)
    a2.loglog(c, [r["cond"] if math.isfinite(r["cond"]) else float("nan") for r in rows], "o-")
    a2.set_xlabel("diagonal loading C_EPS (trace-N units)")
    a2.set_ylabel("cond(R_blend)")
    a2.set_title("Condition number of R_blend = λ_max / λ_min", fontsize=9)
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
