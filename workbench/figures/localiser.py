"""Figures and tables of :mod:`workbench.studies.localiser` (notebook 05, README "The learned localiser"): the learned
localiser against the ML fit per SNR (:func:`localiser_table`), and one scene's matched-filter spectrum and heatmap
with the localiser's detections, the ML fit's sources and the truth (:func:`localiser_scene_figure`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import WIDTH_IN, fmt, legend_outside

TABLE_STATS = (("miss_rate", "miss"), ("false_alarm_rate", "false alarm"), ("k_accuracy", "K acc."), ("nerr_phi", "nerr φ"),
               ("nerr_theta", "nerr θ"), ("nerr_r", "nerr r"))


def _ci(d: dict) -> str:
    return f"{fmt(d['value'])} [{fmt(d['lo'])}, {fmt(d['hi'])}]"


def localiser_table(res: dict) -> list[dict]:
    """Rows for :func:`workbench.figures.markdown_table` of a :func:`workbench.studies.localiser.localiser_vs_ml` result:
    per SNR and estimator the detection, count and per-source normalised errors (sqrt(mean err^2 / CRB_k) over the
    matched sources) with 95 % intervals, the NMSE of the covariance and the seconds per scene."""
    return [{"SNR dB": fmt(r["snr_db"]), "estimator": r["estimator"], **{label: _ci(r["stats"][k]) for k, label in TABLE_STATS},
             "NMSE": _ci(r["nmse"]), "s / scene": fmt(r["seconds_per_scene"])} for r in res["rows"]]


def localiser_scene_figure(view: dict) -> Figure:
    """Two panels over (phi, theta), each the maximum over range: the matched-filter spectrum the network reads (dB) and
    its heatmap (probability), with the true sources (white x), the localiser's (red o) and the ML fit's (cyan +)."""
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH_IN, 2.6), layout="constrained")
    ext = (view["phi_deg"][0], view["phi_deg"][-1], view["theta_deg"][0], view["theta_deg"][-1])
    for ax, key, title, kw in ((axes[0], "spectrum_db", "matched filter (dB, max over r)", {"vmin": -20, "vmax": 0}),
                               (axes[1], "heat", "localiser heatmap (max over r)", {"vmin": 0, "vmax": 1})):
        im = ax.imshow(view[key], origin="lower", extent=ext, aspect="auto", cmap="viridis", **kw)
        fig.colorbar(im, ax=ax, shrink=0.8)
        for pts, style in ((view["true"], dict(marker="x", color="white", ms=8, mew=2)),
                           (view["localiser"], dict(marker="o", mfc="none", mec="red", ms=9, mew=1.5)),
                           (view["ml"], dict(marker="+", color="cyan", ms=9, mew=1.5))):
            ax.plot([p["phi_deg"] for p in pts], [p["theta_deg"] for p in pts], ls="none", **style)
        ax.set_title(title, fontsize=9)
        ax.set(xlabel="φ (deg)", ylabel="θ (deg)")
    legend_outside(axes[1], handles=[Line2D([], [], ls="none", marker="x", color="k", label=f"true (K = {view['K']})"),
                                     Line2D([], [], ls="none", marker="o", mfc="none", mec="red", label=f"localiser (K = {view['K_localiser']})"),
                                     Line2D([], [], ls="none", marker="+", color="c", label=f"ML fit (K = {view['K_ml']})")], fontsize=7)
    fig.suptitle(f"One scene at {fmt(view['snr_db'])} dB", fontsize=10)
    return fig
