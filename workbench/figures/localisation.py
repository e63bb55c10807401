"""Figures of :mod:`workbench.studies.localisation` (notebook 05), each at notebook width and faceted by kind of
covariance source: RMSE against SNR beside sqrt(CRB) (:func:`localisation_figure`), the per-source error over the
bound with 95 % intervals (:func:`normalised_error_figure`), detection and counting (:func:`detection_figure`);
the MUSIC spectrum of one scene as an interactive plotly figure; what the result says at the highest SNR, as markdown
bullets (:func:`localisation_conclusion`)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import WIDTH_IN, fmt, legend_outside

_QUANTITIES = (("rmse_phi_deg", "phi_deg", "RMSE φ (deg)", "φ"), ("rmse_theta_deg", "theta_deg", "RMSE θ (deg)", "θ"),
               ("rmse_r_m", "r_m", "RMSE r (m)", "r"))
_NERR = (("nerr_phi", "φ"), ("nerr_theta", "θ"), ("nerr_r", "r"))
REFERENCES = ("R_true",)  # noise-free references: drawn so that they do not set the axis (see _reference_line)


def source_groups(names: list[str]) -> dict[str, list[str]]:
    """The covariance sources in facets of at most a few lines: references and estimators, then the trained
    networks' R_pred, then their R_blend (empty groups left out)."""
    groups = {"references, estimators": [n for n in names if ":" not in n],
              "networks: R_pred": [n for n in names if n.endswith(":R_pred")],
              "networks: R_blend": [n for n in names if n.endswith(":R_blend")]}
    return {k: v for k, v in groups.items() if v}


def _values(ys: list) -> list[float]:
    return [y if y is not None and math.isfinite(y) and y > 0 else math.nan for y in ys]


def _log_limits(values: list[float]) -> tuple[float, float] | None:
    """y limits of a log axis over ``values`` (finite, positive ones), with some room; None when there are none."""
    v = [y for y in values if math.isfinite(y) and y > 0]
    return (min(v) / 2, max(v) * 2) if v else None


def _reference_line(ax, x: list[float], ys: list[float], lo: float, **style) -> None:
    """A reference curve (R_true) on an axis whose limits the other curves set: values below ``lo`` are drawn as
    hollow down-triangles on the axis's foot (below the axis), so an exact reference at 1e-6 does not flatten the rest."""
    clipped = [max(y, lo * 1.05) if math.isfinite(y) else math.nan for y in ys]
    ax.plot(x, clipped, ls=":", lw=1.2, **style)
    below = [(xi, c) for xi, y, c in zip(x, ys, clipped) if math.isfinite(y) and y < lo]
    if below:
        ax.plot([b[0] for b in below], [b[1] for b in below], "v", ms=6, mfc="none", mec=style.get("color", "k"))


def _facets(n_rows: int, n_cols: int, height: float = 2.1):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(WIDTH_IN, height * n_rows + 0.7), layout="constrained", squeeze=False, sharex=True)
    return fig, axes


def _snr_axis(ax, snr: list[float]) -> None:
    ax.set_xticks(snr, [f"{s:g}" for s in snr], fontsize=8)
    ax.tick_params(axis="y", labelsize=8)


def localisation_figure(res: dict) -> Figure:
    """RMSE of φ, θ (degrees) and r (metres) against SNR (columns), one row per group of sources
    (:func:`source_groups`), sqrt(CRB) dashed; R_true (noise-free) dotted and, below the axis, a hollow triangle."""
    groups = source_groups(list(res["covariances"]))
    snr = res["snr_db"]
    fig, axes = _facets(len(groups), 3)
    for r, (row, (group, names)) in enumerate(zip(axes, groups.items())):
        for ax, (key, crb_key, ylabel, what) in zip(row, _QUANTITIES):
            crb = _values(res["sqrt_crb"][crb_key])
            others = [y for n in names if n not in REFERENCES for y in _values(res["covariances"][n][key])]
            lim = _log_limits(others + crb) or (1e-3, 1.0)
            for i, name in enumerate(names):
                ys = _values(res["covariances"][name][key])
                if name in REFERENCES:
                    _reference_line(ax, snr, ys, lim[0], color="#1b9e77", marker="")
                else:
                    ax.plot(snr, ys, "o-", color=f"C{i}", ms=3, lw=1.1)
            ax.plot(snr, crb, "k--", lw=1)
            ax.set(yscale="log", ylim=lim, ylabel=ylabel if ax is row[0] else "")
            ax.set_title(what if r == 0 else "", fontsize=9)
            _snr_axis(ax, snr)
        _group_legend(row[-1], names, extra=[Line2D([], [], color="k", ls="--", label="sqrt(CRB)")], title=group)
    for ax in axes[-1]:
        ax.set_xlabel("SNR (dB)")
    for row in axes:
        row[0].set_ylabel(row[0].get_ylabel() or "RMSE")
    _labels_everywhere(axes, "RMSE")
    k_note = "true K" if res.get("use_true_k", True) else "estimated K"
    fig.suptitle(f"RMSE by {res['method'].upper()} ({k_note}), {res['n_per_snr']} scenes per SNR, against sqrt(CRB)", fontsize=10)
    return fig


def _group_legend(ax, names: list[str], extra: list | None = None, title: str = "") -> None:
    handles = [Line2D([], [], color="#1b9e77", ls=":", marker="v", mfc="none", label=f"{n} (▽: below the axis)") if n in REFERENCES
               else Line2D([], [], color=f"C{i}", marker="o", ms=3, label=n) for i, n in enumerate(names)]
    legend_outside(ax, handles=handles + (extra or []), title=title, title_fontsize=8)


def _labels_everywhere(axes, ylabel: str) -> None:
    """Every visible axis gets an x and y label (the report's check); facets repeat them small."""
    for ax in axes.flat:
        if not ax.get_xlabel():
            ax.set_xlabel("SNR (dB)", fontsize=7)
        if not ax.get_ylabel():
            ax.set_ylabel(ylabel, fontsize=7)


def normalised_error_figure(res: dict) -> Figure:
    """The per-source normalised error err/sqrt(CRB_k) of φ, θ and r (columns; 1 = the bound) against SNR with the
    true K given, with 95 % bootstrap intervals (``res["per_source"]``), one row per group of sources. Sources are
    offset a little along SNR so their intervals do not hide each other; R_true as in :func:`localisation_figure`."""
    per = res.get("per_source", {})
    groups = source_groups([n for n in res["covariances"] if n in per])
    snr = res["snr_db"]
    step = (max(snr) - min(snr)) / max(len(snr) - 1, 1) if len(snr) > 1 else 1.0
    fig, axes = _facets(max(len(groups), 1), 3)
    if not groups:
        axes[0, 0].text(0.5, 0.5, "no per-source statistics in this result", ha="center", va="center", transform=axes[0, 0].transAxes)
    for r, (row, (group, names)) in enumerate(zip(axes, groups.items())):
        for ax, (key, what) in zip(row, _NERR):
            def stat(name, i, key=key):
                d = per[name]["true_k"][i].get(key) or {}
                return [d.get(k) if d.get(k) is not None else math.nan for k in ("value", "lo", "hi")]

            others = [v for n in names if n not in REFERENCES for i in range(len(snr)) for v in stat(n, i)]
            lim = _log_limits(others + [1.0]) or (0.1, 10.0)
            for j, name in enumerate(names):
                vals = [stat(name, i) for i in range(len(snr))]
                ys = [v[0] for v in vals]
                if name in REFERENCES:
                    _reference_line(ax, snr, _values(ys), lim[0], color="#1b9e77", marker="")
                    continue
                x = [s + (j - (len(names) - 1) / 2) * 0.06 * step for s in snr]
                lo = [max(v[0] - v[1], 0.0) if math.isfinite(v[0]) and math.isfinite(v[1]) else 0.0 for v in vals]
                hi = [max(v[2] - v[0], 0.0) if math.isfinite(v[0]) and math.isfinite(v[2]) else 0.0 for v in vals]
                ax.errorbar(x, _values(ys), yerr=[lo, hi], fmt="o-", color=f"C{j}", ms=3, lw=1.0, capsize=2, elinewidth=0.8)
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
            ax.set(yscale="log", ylim=lim, ylabel="err / √CRB_k" if ax is row[0] else "")
            ax.set_title(what if r == 0 else "", fontsize=9)
            _snr_axis(ax, snr)
        _group_legend(row[-1], names, extra=[Line2D([], [], color="k", ls="--", label="the bound (1)")], title=group)
    for ax in axes[-1]:
        ax.set_xlabel("SNR (dB)")
    _labels_everywhere(axes, "err / √CRB_k")
    fig.suptitle(f"Per-source error over the bound by {res['method'].upper()} (true K), with 95 % intervals", fontsize=10)
    return fig


def detection_figure(res: dict) -> Figure:
    """F1 of the detections (true K) and the accuracy of each source's own count of K, against SNR (columns), one row
    per group of sources."""
    groups = source_groups(list(res["covariances"]))
    snr = res["snr_db"]
    fig, axes = _facets(len(groups), 2)
    for r, (row, (group, names)) in enumerate(zip(axes, groups.items())):
        for ax, key, what in ((row[0], "f1", "F1 of the detections"), (row[1], "k_accuracy", "accuracy of the count of K")):
            for i, name in enumerate(names):
                ax.plot(snr, [v if v is not None else math.nan for v in res["covariances"][name][key]], "o-", color=f"C{i}", ms=3, lw=1.1)
            ax.set(ylim=(-0.05, 1.05), ylabel=key.replace("k_accuracy", "K accuracy").replace("f1", "F1"))
            ax.set_title(what if r == 0 else "", fontsize=9)
            _snr_axis(ax, snr)
        legend_outside(row[-1], handles=[Line2D([], [], color=f"C{i}", marker="o", ms=3, label=n) for i, n in enumerate(names)],
                       title=group, title_fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("SNR (dB)")
    _labels_everywhere(axes, "fraction")
    fig.suptitle(f"Detection and count by {res['method'].upper()}, {res['n_per_snr']} scenes per SNR", fontsize=10)
    return fig


def spectrum_plotly(view: dict):
    """The spectrum of one scene (:func:`workbench.studies.localisation.scene_spectrum`) as an interactive plotly
    figure: the phi-theta map at the strongest estimate's range (dB; its colour bar between the two panels), and the
    range cut through it, with the true sources (cyan crosses, black outline) and the estimates (red circles) marked.
    Width: the notebook's (autosized)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    at = view["at"]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.58, 0.42], horizontal_spacing=0.2,
                        subplot_titles=(f"φ-θ map at r = {at['r_m']:.2f} m", f"range cut at φ = {at['phi_deg']:.1f}°, θ = {at['theta_deg']:.1f}°"))
    map_end = fig.layout.xaxis.domain[1]
    fig.add_trace(go.Heatmap(x=view["phi_deg"], y=view["theta_deg"], z=view["map_db"], colorscale="Viridis", zmin=-30, zmax=0,
                             colorbar={"title": {"text": "dB"}, "x": map_end + 0.01, "xanchor": "left", "thickness": 12, "len": 0.9},
                             hovertemplate="φ %{x:.1f}°<br>θ %{y:.1f}°<br>%{z:.1f} dB<extra></extra>"),
                  row=1, col=1)
    true_marker = {"symbol": "x", "size": 12, "color": "#00e5ff", "line": {"width": 1.5, "color": "black"}}  # cyan: seen on the whole colour scale
    est_marker = {"symbol": "circle-open", "size": 12, "color": "red", "line": {"width": 2, "color": "red"}}
    for pts, name, marker in ((view["true"], "true sources", true_marker), (view["estimated"], "estimates", est_marker)):
        fig.add_trace(go.Scatter(x=[p["phi_deg"] for p in pts], y=[p["theta_deg"] for p in pts], mode="markers", name=name, marker=marker,
                                 text=[f"r = {p['r_m']:.2f} m" for p in pts],
                                 hovertemplate="φ %{x:.1f}°, θ %{y:.1f}°, %{text}<extra>" + name + "</extra>"),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=view["r_m"], y=view["cut_db"], mode="lines", name="spectrum (range cut)", line={"color": "#444"}), row=1, col=2)
    near = lambda p: abs(p["phi_deg"] - at["phi_deg"]) < 3 and abs(p["theta_deg"] - at["theta_deg"]) < 3  # noqa: E731
    for pts, colour in ((view["true"], "#1b9e77"), (view["estimated"], "red")):  # true range green, estimated red
        for p in filter(near, pts):
            fig.add_vline(x=p["r_m"], line={"color": colour, "dash": "dash"}, row=1, col=2)
    fig.update_xaxes(title_text="azimuth φ (deg)", row=1, col=1)
    fig.update_yaxes(title_text="elevation θ (deg)", row=1, col=1)
    fig.update_xaxes(title_text="range r (m)", type="log", row=1, col=2)
    fig.update_yaxes(title_text="spectrum (dB re max)", row=1, col=2)
    fig.update_layout(title={"text": f"{view['method'].upper()} spectrum of {view['name']}, scene {view['scene']} at {view['snr_db']:g} dB "
                                     f"(K = {view['K']}, localised with K = {view['K_used']})", "font": {"size": 13}},
                      height=440, autosize=True, legend={"orientation": "h", "y": -0.2}, margin={"l": 60, "r": 20})
    return fig


def localisation_conclusion(res: dict) -> str:
    """Markdown bullets from a :func:`workbench.studies.localisation.localisation_vs_snr` result: at the highest SNR, each source's phi and theta
    RMSE as a multiple of sqrt(CRB) and its F1, the best estimator (R_true aside), and the count accuracy."""
    i = max(range(len(res["snr_db"])), key=lambda j: res["snr_db"][j])
    snr, crb = res["snr_db"][i], res["sqrt_crb"]

    def ratio(v, b):
        return math.inf if v is None or b is None or b <= 0 else v / b

    scored = {n: (ratio(m["rmse_phi_deg"][i], crb["phi_deg"][i]), ratio(m["rmse_theta_deg"][i], crb["theta_deg"][i]), m["f1"][i])
              for n, m in res["covariances"].items()}
    lines = [f"- At {snr:g} dB, RMSE of φ / θ as a multiple of sqrt(CRB) (1 = the bound; {'true' if res['use_true_k'] else 'estimated'} K) "
             f"and F1: " + "; ".join(f"{n} {fmt(a)} / {fmt(b)}, F1 {fmt(f)}" for n, (a, b, f) in scored.items()) + "."]
    rivals = {n: v for n, v in scored.items() if n != "R_true"}
    if rivals:
        best = min(rivals, key=lambda n: max(rivals[n][0], rivals[n][1]))
        lines.append(f"- Closest to the bound at {snr:g} dB, R_true aside: {best} ({fmt(rivals[best][0])} x sqrt(CRB) in φ).")
    if "R_true" in scored:
        worst = max(v for v in res["covariances"]["R_true"]["rmse_phi_deg"] if v is not None)
        lines.append(f"- MUSIC on the exact R_true: largest φ RMSE over all SNRs {fmt(worst)} deg (R_true is noise-free, so the SNR "
                     "cannot matter; RAP-MUSIC separates sources that share one grid peak).")
    acc = {n: m["k_accuracy"][i] for n, m in res["covariances"].items() if m["k_accuracy"][i] is not None}
    if acc:
        lines.append(f"- Accuracy of each source's count of K at {snr:g} dB: " + ", ".join(f"{n} {fmt(a)}" for n, a in acc.items())
                     + " (networks: their K head; the physics baseline: MDL on its likelihood; the rest: MDL on eigenvalues).")
    return "\n".join(lines)
