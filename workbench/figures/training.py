"""Figures of training runs (notebook 04, the training panel, :mod:`workbench.studies.compare`), one per question, each
readable at notebook width (:data:`workbench.figures.WIDTH_IN`):

* :func:`training_figure`: does training work? Training loss, validation NMSE, weight change and skipped steps per
  epoch, every run on shared axes (one colour and marker per run);
* :func:`step_figure`: the training loss of every optimiser step (the history's ``step_loss``);
* :func:`gradient_norm_figure`: the mean gradient norm of each parameter group per epoch;
* :func:`terms_figure`: each run's loss terms, one panel per run (at most 3 a row, shared y).

A run none of whose steps was applied (every step skipped for a non-finite gradient) has no curve to draw: it is
named in a "no step applied" line instead, and a figure of such runs alone is that message."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from . import WIDTH_IN, legend_outside, plain_log_ticks

MARKERS = "osD^vP*Xh<>"
PER_ROW = 3  # facets per row at notebook width


def _finite_positive(ys: list) -> list[float]:
    """Values for a log axis: None, non-finite and non-positive values become gaps (NaN)."""
    return [y if y is not None and math.isfinite(y) and y > 0 else math.nan for y in ys]


def _style(i: int) -> dict:
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "ms": 4}


def no_step_applied(hist: list[dict]) -> bool:
    """True when the run took steps and none of them was applied (each skipped for a non-finite gradient or by the scaler)."""
    steps = sum(h.get("steps", 0) for h in hist)
    return steps > 0 and sum(h["skipped_nonfinite"] + h.get("skipped_scaler", 0) for h in hist) >= steps


def _dead_note(histories: dict[str, list[dict]]) -> str:
    dead = [f"{n} ({sum(h['steps'] for h in hist)} steps skipped)" for n, hist in histories.items() if no_step_applied(hist)]
    return ("no step applied, nothing to draw: " + ", ".join(dead)) if dead else ""


def _message_figure(title: str, text: str) -> Figure:
    """A figure that says why there is nothing to draw (an all-skipped run), rather than empty or broken axes."""
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 2.2), layout="constrained")
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, color="#b00", transform=ax.transAxes)
    fig.suptitle(title)
    return fig


def _legend(fig: Figure, names: list[str], title: str = "run") -> None:
    """One legend of the runs, right of the top-right panel (outside the data, below the title)."""
    handles = [Line2D([], [], ls="-", label=n, **_style(i)) for i, n in enumerate(names)]
    legend_outside(_top_right(fig), handles=handles, title=title, title_fontsize=8)


def _top_right(fig: Figure):
    axes = [a for a in fig.axes if a.get_visible()]
    return max(axes, key=lambda a: (round(a.get_position().y1, 3), a.get_position().x1))


def training_figure(histories: dict[str, list[dict]]) -> Figure:
    """Per epoch, every run on shared axes: training loss, validation NMSE of R_pred, the weight change over the epoch
    (log) and the steps skipped for a non-finite gradient. An epoch with skipped steps is ringed red. Runs with no
    step applied are listed under the title instead of drawn."""
    names = list(histories)
    note = _dead_note(histories)
    live = {n: h for n, h in histories.items() if h and not no_step_applied(h)}
    if not live:
        return _message_figure("Training: " + ", ".join(names), note or "no epoch recorded")
    fig, axes = plt.subplots(2, 2, figsize=(WIDTH_IN, 5.4), layout="constrained", sharex=True)
    (a_loss, a_val), (a_chg, a_skip) = axes
    width = 0.8 / max(len(histories), 1)
    for i, (name, hist) in enumerate(histories.items()):
        ep = [h["epoch"] + 1 for h in hist]
        st = _style(i)
        if name in live:
            for ax, key in ((a_loss, "train_loss"), (a_val, "val_nmse"), (a_chg, "param_change")):
                ys = _finite_positive([h[key] for h in hist])
                ax.plot(ep, ys, "-", lw=1.2, **st)
                for e, y, h in zip(ep, ys, hist):
                    if h["skipped_nonfinite"] and math.isfinite(y):
                        ax.plot(e, y, "o", ms=9, mfc="none", mec="red", mew=1.2)
        a_skip.bar([e + (i - (len(histories) - 1) / 2) * width for e in ep], [h["skipped_nonfinite"] for h in hist], width, color=st["color"])
    for ax, title, ylabel in ((a_loss, "Training loss", "weighted total (log)"), (a_val, "Validation NMSE of R_pred", "NMSE (log)"),
                              (a_chg, "Weight change per epoch", "‖Δθ‖₂ (log)")):
        ax.set(title=title, ylabel=ylabel, yscale="log")
        plain_log_ticks(ax)
    a_skip.set(title="Steps skipped (non-finite gradient)", ylabel="steps")
    a_skip.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat:
        ax.title.set_fontsize(9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    _legend(fig, names, "run (red ring: steps skipped)")
    fig.suptitle("Training under each preset: the same scenes, the same budget" + (f"\n{note}" if note else ""), fontsize=10)
    return fig


def step_figure(histories: dict[str, list[dict]]) -> Figure:
    """The training loss of every optimiser step (``step_loss`` of the history records; None: a step not applied),
    every run on one log axis against the step number; epoch boundaries dotted."""
    names = list(histories)
    note = _dead_note(histories)
    recorded = {n: h for n, h in histories.items() if h and all("step_loss" in r for r in h)}
    if not any(v is not None for h in recorded.values() for r in h for v in r["step_loss"]):
        why = note or ("these runs' histories hold no per-step losses (recorded since step_loss was added)" if len(recorded) < len(histories)
                       else "no step applied")
        return _message_figure("Training loss per step: " + ", ".join(names), why)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.4), layout="constrained")
    bounds = set()
    for i, name in enumerate(names):
        hist = recorded.get(name, [])
        ys = [v for r in hist for v in r["step_loss"]]
        xs = list(range(1, len(ys) + 1))
        ax.plot(xs, _finite_positive(ys), "-", lw=1.0, **{**_style(i), "ms": 2.5})
        n = 0
        for r in hist[:-1]:
            n += len(r["step_loss"])
            bounds.add(n + 0.5)
    for b in sorted(bounds):
        ax.axvline(b, color="#bbb", ls=":", lw=0.8)
    ax.set(yscale="log", xlabel="optimiser step", ylabel="training loss of the step (log)")
    plain_log_ticks(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, names, "run (gap: step skipped)")
    fig.suptitle("Training loss per step (dotted: epoch boundaries)" + (f"\n{note}" if note else ""), fontsize=10)
    return fig


def gradient_norm_figure(histories: dict[str, list[dict]]) -> Figure:
    """Per parameter group (one panel each, at most 3 a row), the mean gradient norm over the epoch's applied steps."""
    names = list(histories)
    groups = list(next((h[0]["grad_norm"] for h in histories.values() if h), {}))
    note = _dead_note(histories)
    if not groups or all(no_step_applied(h) or not h for h in histories.values()):
        return _message_figure("Gradient norm per parameter group: " + ", ".join(names), note or "no epoch recorded")
    cols = min(PER_ROW, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_IN, 2.6 * rows + 0.6), layout="constrained", squeeze=False, sharey=True)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, g in zip(axes.flat, groups):
        for i, hist in enumerate(histories.values()):
            ax.plot([h["epoch"] + 1 for h in hist], _finite_positive([h["grad_norm"].get(g) for h in hist]), "-", lw=1.2, **_style(i))
        ax.set(yscale="log", title=g, xlabel="epoch", ylabel="mean ‖∇‖ (log)")
        ax.title.set_fontsize(9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, names)
    fig.suptitle("Gradient norm per parameter group (mean over applied steps)" + (f"\n{note}" if note else ""), fontsize=10)
    return fig


def terms_figure(histories: dict[str, list[dict]]) -> Figure:
    """Each run's loss terms (|epoch mean|, log), one panel per run, at most 3 a row, shared y. A term that is exactly
    0 throughout (weight 0, an inactive hinge) is not drawn."""
    names = list(histories)
    terms = list(next((h[0]["terms"] for h in histories.values() if h), {}))
    if not names or not terms:
        return _message_figure("Loss terms", "no epoch recorded")
    cols = min(PER_ROW, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_IN, 2.4 * rows + 0.6), layout="constrained", squeeze=False, sharey=True)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, (name, hist) in zip(axes.flat, histories.items()):
        ep = [h["epoch"] + 1 for h in hist]
        drawn = False
        for j, term in enumerate(terms):
            ys = _finite_positive([abs(h["terms"][term]) if h["terms"][term] is not None else None for h in hist])
            if any(math.isfinite(y) for y in ys):
                ax.plot(ep, ys, "-", color=f"C{j}", marker=MARKERS[j], ms=3, lw=1.0)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no step applied" if no_step_applied(hist) else "no finite term", ha="center", va="center",
                    color="#b00", fontsize=8, transform=ax.transAxes)
        ax.set(yscale="log", title=name, xlabel="epoch", ylabel="|term| (log)")
        ax.title.set_fontsize(9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=f"C{j}", marker=MARKERS[j], ms=3, label=t) for j, t in enumerate(terms)]
    legend_outside(_top_right(fig), handles=handles, title="term\n(absent: exactly 0)", title_fontsize=8)
    fig.suptitle("Loss terms of each run (epoch means)", fontsize=10)
    return fig
