"""Figures of :mod:`workbench.studies.gradients` (notebook 03): the gradient norm of each eigen backend's term."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def gradient_figure(rows: list[dict]) -> Figure:
    """Per backend, the gradient norm of its own term per parameter group (log bars); a red x marks NaN/inf."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 3.8))
    for ax, kind in zip(axes, ("gap", "subspace")):
        sub = [r for r in rows if r["kind"] == kind]
        groups = list(sub[0]["term_grad_norm"]) if sub else []
        w = 0.8 / max(len(groups), 1)
        nan_labelled = False
        for j, g in enumerate(groups):
            for i, r in enumerate(sub):
                v = r["term_grad_norm"][g]
                x = i + (j - (len(groups) - 1) / 2) * w
                if v == 0.0:  # no bar on a log axis: say it
                    ax.annotate("0", (x, 1e-12), ha="center", va="bottom", fontsize=8, color=f"C{j}")
                    ax.bar(x, 1e-12, w, color=f"C{j}", label=g if i == 0 else None)
                elif math.isfinite(v):
                    ax.bar(x, v, w, color=f"C{j}", label=g if i == 0 else None)
                else:
                    ax.plot(x, 1.0, "x", color="red", ms=10, mew=2, label=None if nan_labelled else "NaN/inf")
                    nan_labelled = True
        ax.set_yscale("log")
        ax.set_xticks(range(len(sub)), [r["backend"] for r in sub], rotation=20)
        ax.set_title(f"∇ of the {kind} term, per backend (0: exactly zero)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
