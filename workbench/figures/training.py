"""Figures of training runs (notebook 04): loss terms, gradient norms per group and parameter change per epoch."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def training_figure(histories: dict[str, list[dict]]) -> Figure:
    """Three panels per preset (one line style per preset): loss terms per epoch (log), gradient norm per
    group per epoch (log), parameter change per epoch."""
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13.0, 3.8))
    styles = ["-", "--", ":", "-."]
    for i, (name, hist) in enumerate(histories.items()):
        ls = styles[i % len(styles)]
        ep = [h["epoch"] for h in hist]
        for j, term in enumerate(["total", *hist[0]["terms"]] if hist else []):
            ys = [h["train_loss"] if term == "total" else h["terms"][term] for h in hist]
            ys = [abs(y) if math.isfinite(y) and y != 0 else float("nan") for y in ys]
            a1.plot(ep, ys, ls, color=f"C{j}", marker="o", ms=3, label=f"{name}: {term}")
        for j, g in enumerate(hist[0]["grad_norm"] if hist else []):
            a2.plot(ep, [h["grad_norm"][g] for h in hist], ls, color=f"C{j}", marker="o", ms=3, label=f"{name}: {g}")
        a3.plot(ep, [h["param_change"] for h in hist], ls, marker="o", ms=3, label=name)
    a1.set_yscale("log")
    a1.set_title("loss terms (train)")
    a2.set_yscale("log")
    a2.set_title("gradient norm per group")
    a3.set_title("parameter change per epoch")
    for a in (a1, a2, a3):
        a.set_xlabel("epoch")
        a.legend(fontsize=6)
    fig.tight_layout()
    return fig
