"""Figures of training runs (notebook 04, :mod:`workbench.studies.compare`): every preset's curves on shared axes,
gradient norms per parameter group, and each preset's loss terms in a panel of its own."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from . import legend_outside, plain_log_ticks


def _finite_positive(ys: list) -> list[float]:
    """Values for a log axis: None, non-finite and non-positive values become gaps (NaN)."""
    return [y if y is not None and math.isfinite(y) and y > 0 else math.nan for y in ys]


def training_figure(histories: dict[str, list[dict]]) -> Figure:
    """Top row, every run on shared axes (one colour per run): training loss, validation NMSE of R_pred, the
    parameter change per epoch and the mean gradient norm of each parameter group; an epoch with steps skipped
    for a non-finite gradient is marked red. Bottom row: the loss terms of each run in a panel of its own (shared
    y), so no axis carries more than a few entries."""
    names = list(histories)
    groups = list(next((h[0]["grad_norm"] for h in histories.values() if h), {}))
    terms = list(next((h[0]["terms"] for h in histories.values() if h), {}))
    ncol = max(3 + len(groups), len(names))
    fig = plt.figure(figsize=(3.4 * ncol + 1.8, 6.8))
    grid = fig.add_gridspec(2, ncol)
    top = [fig.add_subplot(grid[0, j]) for j in range(3)]
    mid = [fig.add_subplot(grid[0, 3 + j]) for j in range(len(groups))]
    low0 = fig.add_subplot(grid[1, 0]) if names else None
    low = [low0] + [fig.add_subplot(grid[1, j], sharey=low0) for j in range(1, len(names))] if names else []
    for i, (name, hist) in enumerate(histories.items()):
        ep = [h["epoch"] + 1 for h in hist]
        colour = f"C{i}"
        for ax, key in zip(top, ("train_loss", "val_nmse", "param_change")):
            ys = _finite_positive([h[key] for h in hist])
            ax.plot(ep, ys, "o-", color=colour, ms=3, label=name)
            for e, y, h in zip(ep, ys, hist):
                if not h["skipped_nonfinite"]:
                    continue
                if math.isfinite(y):
                    ax.plot(e, y, "o", ms=9, mfc="none", mec="red", mew=1.5)
                else:  # nothing finite to ring (every step skipped): a red cross at the foot of the axis
                    ax.plot(e, 0.03, "x", color="red", ms=8, mew=2, transform=ax.get_xaxis_transform())
        for ax, g in zip(mid, groups):
            ax.plot(ep, _finite_positive([h["grad_norm"].get(g) for h in hist]), "o-", color=colour, ms=3, label=name)
        ax = low[i]
        for j, term in enumerate(terms):
            ys = [abs(h["terms"][term]) if h["terms"][term] is not None else None for h in hist]
            if any(y for y in ys if y is not None and math.isfinite(y)):
                ax.plot(ep, _finite_positive(ys), "o-", color=f"C{j}", ms=3, label=term)
        ax.set_yscale("log")
        ax.set_title(f"{name}: loss terms", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("|term| (epoch mean, log)" if i == 0 else "|term| (log)")
    for ax, title, ylabel in zip(top, ("Training loss (weighted total)", "Validation NMSE of R_pred", "Weight change per epoch"),
                                 ("loss (log)", "NMSE vs trace-normalised R_true (log)", "‖Δθ‖₂ over the epoch (log)")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel, yscale="log")
    for ax, g in zip(mid, groups):
        ax.set(title=f"Gradient norm: {g}", xlabel="epoch", ylabel="mean ‖∇‖ over applied steps (log)", yscale="log")
    for ax in (*top, *mid, *low):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (*top, *mid):
        plain_log_ticks(ax)
    if names:
        legend_outside((top + mid)[-1], title="run (red: steps skipped)")
        legend_outside(low[-1], title="term (absent: exactly 0)",
                       handles=[Line2D([], [], color=f"C{j}", marker="o", ms=3, label=t) for j, t in enumerate(terms)])
    fig.suptitle("Training under each preset: the same scenes, the same budget")
    fig.tight_layout()
    return fig
