"""Figures of :mod:`workbench.studies.gradients` (notebook 03): the gradient norm of each eigen backend's term."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import legend_outside


def gradient_figure(rows: list[dict]) -> Figure:
    """Per backend, the gradient norm of its own term per parameter group (log bars). An exact zero is written
    a bold "0" at the foot of the axis (no bar), a non-finite gradient is a red cross; a gap term whose hinge is
    inactive in these scenes (gap above the margin: gradient exactly zero) is labelled so."""
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.0))
    for ax, kind in zip(axes, ("gap", "subspace")):
        sub = [r for r in rows if r["kind"] == kind]
        groups = list(sub[0]["term_grad_norm"]) if sub else []
        w = 0.8 / max(len(groups), 1)
        finite = [v for r in sub for v in r["term_grad_norm"].values() if math.isfinite(v) and v > 0]
        top = max(finite, default=1.0)
        foot = min(finite, default=1.0) / 30
        for j, g in enumerate(groups):
            for i, r in enumerate(sub):
                v = r["term_grad_norm"][g]
                x = i + (j - (len(groups) - 1) / 2) * w
                if v == 0.0:
                    ax.text(x, foot, "0", ha="center", va="bottom", fontsize=9, fontweight="bold", color=f"C{j}")
                elif math.isfinite(v):
                    ax.bar(x, v, w, color=f"C{j}")
                else:
                    ax.plot(x, top, "x", color="red", ms=10, mew=2)
        handles = [Patch(color=f"C{j}", label=g) for j, g in enumerate(groups)]
        if any(not math.isfinite(v) for r in sub for v in r["term_grad_norm"].values()):
            handles.append(Line2D([], [], color="red", marker="x", ls="", mew=2, label="NaN / inf"))
        labels = [r["backend"] + ("\n(hinge inactive)" if r.get("hinge_active") is False else "") for r in sub]
        ax.set_yscale("log")
        ax.set_ylim(foot / 2, top * 10)
        ax.set_xticks(range(len(sub)), labels, rotation=20, fontsize=8)
        ax.set_xlabel(f"{kind} backend")
        ax.set_ylabel("‖∇ term‖ per parameter group (log; 0 = exactly zero)")
        ax.set_title(f"Gradient of the {kind} term through the network")
        legend_outside(ax, handles=handles, title="parameter group")
    fig.tight_layout()
    return fig
