"""Figures of :mod:`workbench.studies.localisation` (notebook 05): RMSE against SNR beside sqrt(CRB), detection and
counting, faceted by kind of covariance source; the MUSIC spectrum of one scene as an interactive plotly figure; what
the result says at the highest SNR, as markdown bullets (:func:`localisation_conclusion`)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import fmt, legend_outside

_QUANTITIES = (("rmse_phi_deg", "phi_deg", "RMSE of φ (deg)", "Azimuth φ"), ("rmse_theta_deg", "theta_deg", "RMSE of θ (deg)", "Elevation θ"),
               ("rmse_r_m", "r_m", "RMSE of r (m)", "Range r"))


def source_groups(names: list[str]) -> dict[str, list[str]]:
    """The covariance sources in facets of at most a few lines: references and estimators, then the trained
    networks' R_pred, then their R_blend (empty groups left out)."""
    groups = {"R_true, R_samp estimators, physics baseline": [n for n in names if ":" not in n],
              "trained networks: R_pred": [n for n in names if n.endswith(":R_pred")],
              "trained networks: R_blend": [n for n in names if n.endswith(":R_blend")]}
    return {k: v for k, v in groups.items() if v}


def _values(ys: list) -> list[float]:
    return [y if y is not None and math.isfinite(y) and y > 0 else math.nan for y in ys]


def localisation_figure(res: dict) -> Figure:
    """One row per group of sources (:func:`source_groups`): RMSE of phi, theta (degrees) and r (metres) against
    SNR on log axes with sqrt(CRB) dashed, then F1 (solid) and the accuracy of the source's count of K (dotted)."""
    groups = source_groups(list(res["covariances"]))
    snr = res["snr_db"]
    fig, axes = plt.subplots(len(groups), 4, figsize=(16.5, 3.4 * len(groups)), squeeze=False)
    k_note = "true K" if res.get("use_true_k", True) else "estimated K"
    for row, (group, names) in zip(axes, groups.items()):
        for ax, (key, crb_key, ylabel, what) in zip(row, _QUANTITIES):
            for i, name in enumerate(names):
                ax.semilogy(snr, _values(res["covariances"][name][key]), "o-", color=f"C{i}", ms=4, label=name)
            ax.semilogy(snr, _values(res["sqrt_crb"][crb_key]), "k--", label="sqrt(CRB)")
            ax.set(xlabel="SNR (dB)", ylabel=ylabel, title=f"{what}: {group}" if key == "rmse_phi_deg" else what)
        ax = row[3]
        for i, name in enumerate(names):
            m = res["covariances"][name]
            ax.plot(snr, [v if v is not None else math.nan for v in m["f1"]], "o-", color=f"C{i}", ms=4, label=name)
            ax.plot(snr, [v if v is not None else math.nan for v in m["k_accuracy"]], "x:", color=f"C{i}", ms=5)
        ax.set(ylim=(-0.05, 1.05), xlabel="SNR (dB)", ylabel="F1 (solid), K accuracy (dotted)", title="Detection and count")
        handles, _ = ax.get_legend_handles_labels()
        legend_outside(ax, handles=[*handles, Line2D([], [], color="k", ls="--", label="sqrt(CRB) (RMSE panels)")])
    fig.suptitle(f"Localisation by {res['method'].upper()} ({k_note}), {res['n_per_snr']} scenes per SNR, against the Cramer-Rao bound")
    fig.tight_layout()
    return fig


def spectrum_plotly(view: dict):
    """The spectrum of one scene (:func:`workbench.studies.localisation.scene_spectrum`) as an interactive plotly
    figure: the phi-theta map at the strongest estimate's range (dB), and the range cut through it, with the true
    sources (white crosses) and the estimates (circles) marked."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    at = view["at"]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.12,
                        subplot_titles=(f"φ-θ map at r = {at['r_m']:.2f} m", f"range cut at φ = {at['phi_deg']:.1f}°, θ = {at['theta_deg']:.1f}°"))
    fig.add_trace(go.Heatmap(x=view["phi_deg"], y=view["theta_deg"], z=view["map_db"], colorscale="Viridis", zmin=-30, zmax=0,
                             colorbar={"title": "dB", "x": 0.56}, hovertemplate="φ %{x:.1f}°<br>θ %{y:.1f}°<br>%{z:.1f} dB<extra></extra>"),
                  row=1, col=1)
    for pts, name, symbol, colour in ((view["true"], "true sources", "x", "white"), (view["estimated"], "estimates", "circle-open", "red")):
        fig.add_trace(go.Scatter(x=[p["phi_deg"] for p in pts], y=[p["theta_deg"] for p in pts], mode="markers", name=name,
                                 marker={"symbol": symbol, "size": 11, "color": colour, "line": {"width": 2, "color": colour}},
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
    fig.update_layout(title=f"{view['method'].upper()} spectrum of {view['name']}, scene {view['scene']} at {view['snr_db']:g} dB "
                            f"(K = {view['K']}, localised with K = {view['K_used']})",
                      height=440, width=1050, legend={"orientation": "h", "y": -0.18})
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
