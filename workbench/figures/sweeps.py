"""Figures of :mod:`workbench.studies.sweeps` (notebook 06): optimisation history, importances, knobs versus
outcome, outcome fractions per knob value; each as a static matplotlib figure and an interactive plotly one; what the
study says, as markdown bullets (:func:`sweep_conclusion`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import optuna
from matplotlib.figure import Figure

from ..studies.sweeps import OUTCOMES
from . import WIDTH_IN, fmt, legend_outside

OUTCOME_COLOURS = {"complete": "#2ca02c", "pruned": "#ff7f0e", "nonfinite": "#d62728", "failed": "#7f7f7f"}


def importances_plotly(study, params: Sequence[str]):
    """Parameter importances of ``params`` for val_nmse (plotly; the same evaluator as :func:`sweep_importances`)."""
    return optuna.visualization.plot_param_importances(study, params=list(params), target_name="val_nmse")


def _optuna_mpl(builder, *args, **kwargs) -> Figure:
    import warnings

    # Optuna's builders call plt.style.use("ggplot"): rc_context keeps that style out of every later figure
    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        ax = builder(*args, **kwargs)
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(WIDTH_IN, 3.6)
    for a in fig.axes:  # Optuna's own title ("Hyperparameter Importances", ...): ours replaces it, never overprints it
        for loc in ("center", "left", "right"):
            a.set_title("", loc=loc)
    fig.set_layout_engine("constrained")
    return fig


def history_figure(study) -> Figure:
    """Optimisation history (val_nmse per completed trial and best so far), Optuna's matplotlib builder."""
    from optuna.visualization import matplotlib as om

    fig = _optuna_mpl(om.plot_optimization_history, study, target_name="val_nmse")
    ax = fig.axes[0]
    ax.set_title("Validation NMSE of each completed trial, and the best so far", fontsize=10)
    ax.set_xlabel("trial number")
    ax.set_ylabel("validation NMSE of R_pred")
    return fig


def importances_figure(study, params: Sequence[str], note: str = "") -> Figure:
    """Parameter importances of ``params`` (see :func:`~workbench.studies.sweeps.sweep_importances` for when they
    exist); ``note`` (e.g. how many trials they rest on) goes into the title."""
    from optuna.visualization import matplotlib as om

    fig = _optuna_mpl(om.plot_param_importances, study, params=list(params), target_name="val_nmse")
    ax = fig.axes[0]
    ax.set_title("Importance of each knob for the validation NMSE" + (f"\n({note})" if note else ""), fontsize=9)
    ax.set_xlabel(ax.get_xlabel() or "importance")
    ax.set_ylabel(ax.get_ylabel() or "knob")
    ax.tick_params(labelsize=8)
    return fig


def _parallel_axes(rows: list[dict]) -> list[dict]:
    """Axes of the parallel-coordinates view: each knob, val_nmse (missing values on a 'none' tick above the
    largest), the outcome. Each: {"label", "values" (float per row), "ticks" [(value, text)] or None}."""
    names = sorted({k for r in rows for k in r["params"]})
    axes = []
    for name in names:
        vals = [r["params"].get(name) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            axes.append({"label": name, "values": [float(v) for v in vals], "ticks": None})
        else:
            cats = sorted({str(v) for v in vals})
            axes.append({"label": name, "values": [float(cats.index(str(v))) for v in vals], "ticks": [(float(i), c) for i, c in enumerate(cats)]})
    finite = [r["value"] for r in rows if r["value"] is not None and math.isfinite(r["value"])]
    if finite:
        lo, hi = min(finite), max(finite)
        none = hi + 0.1 * (hi - lo or abs(hi) or 1.0)
        digits = next((d for d in range(4, 12) if f"{lo:.{d}g}" != f"{hi:.{d}g}"), 12)  # enough to tell lo from hi
        ticks = [(lo, f"{lo:.{digits}g}"), (hi, f"{hi:.{digits}g}")] if hi > lo else [(lo, f"{lo:.4g}")]
        axes.append({"label": "val_nmse", "values": [r["value"] if r["value"] is not None and math.isfinite(r["value"]) else none for r in rows],
                     "ticks": ticks + [(none, "none")]})
    axes.append({"label": "outcome", "values": [float(OUTCOMES.index(r["outcome"])) for r in rows],
                 "ticks": [(float(i), o) for i, o in enumerate(OUTCOMES)]})
    return axes


def parallel_plotly(rows: list[dict]):
    """Parallel coordinates of the knobs, val_nmse and the outcome of every finished trial (plotly),
    coloured by outcome: unlike Optuna's view it keeps the pruned and non-finite trials."""
    import plotly.graph_objects as go

    axes = _parallel_axes(rows)
    dims = []
    for a in axes:
        d = {"label": a["label"], "values": a["values"]}
        if a["ticks"]:
            d |= {"tickvals": [v for v, _ in a["ticks"]], "ticktext": [t for _, t in a["ticks"]]}
            lo, hi = min(v for v, _ in a["ticks"]), max(v for v, _ in a["ticks"])
            d["range"] = [lo, hi] if hi > lo else [lo - 0.5, hi + 0.5]
        dims.append(d)
    n = len(OUTCOMES) - 1
    scale = [[i / n, OUTCOME_COLOURS[o]] for i, o in enumerate(OUTCOMES)]
    line = {"color": [OUTCOMES.index(r["outcome"]) for r in rows], "colorscale": scale, "cmin": 0, "cmax": n}
    fig = go.Figure(go.Parcoords(dimensions=dims, line=line))
    fig.update_layout(title="Knobs versus outcome (every finished trial; colour: complete / pruned / non-finite / failed)", height=460,
                      margin={"l": 80, "r": 80, "t": 110, "b": 40})
    return fig


def _wrap_label(label: str) -> str:
    """A knob's dotted name on two lines ("fixes.\nsubspace_backend"), so neighbouring axis labels do not run together."""
    head, dot, tail = label.partition(".")
    return f"{head}.\n{tail}" if dot else label


def parallel_figure(rows: list[dict]) -> Figure:
    """The parallel-coordinates view of :func:`parallel_plotly` as a static matplotlib figure: each axis
    scaled to [0, 1] over its ticks or values, one line per trial coloured by outcome."""
    axes = _parallel_axes(rows)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.8), layout="constrained")
    scaled = []
    for a in axes:
        pts = a["values"] + [v for v, _ in a["ticks"] or []]
        lo, hi = min(pts, default=0.0), max(pts, default=1.0)
        span = hi - lo or 1.0
        scaled.append([(v - lo) / span for v in a["values"]])
        x = len(scaled) - 1
        ax.axvline(x, color="k", lw=0.8)
        for v, text in a["ticks"] or [(lo, fmt(lo)), (hi, fmt(hi))]:
            ax.text(x + 0.03, (v - lo) / span, text, fontsize=6.5, va="center")
    for i, r in enumerate(rows):
        ax.plot(range(len(axes)), [s[i] for s in scaled], color=OUTCOME_COLOURS[r["outcome"]], alpha=0.7, lw=1.2)
    for o in OUTCOMES:
        ax.plot([], [], color=OUTCOME_COLOURS[o], label=o)
    ax.set_xticks(range(len(axes)), [_wrap_label(a["label"]) for a in axes], fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("knob, validation NMSE, outcome")
    ax.set_ylabel("each axis scaled to its range")
    ax.set_xlim(-0.2, len(axes) - 0.4)
    ax.set_ylim(-0.05, 1.05)
    legend_outside(ax, title="outcome")
    ax.set_title("Knobs versus outcome of every finished trial", fontsize=9)
    return fig


def _short(label: str) -> str:
    """A float label to 3 significant digits (bin labels and other text unchanged)."""
    try:
        return fmt(float(label))
    except ValueError:
        return label


def outcomes_figure(rows: list[dict], param: str | None = None) -> Figure:
    """Stacked bars per knob value of :func:`workbench.studies.sweeps.outcome_fractions` rows: the fraction of
    trials complete / pruned / non-finite / failed, one panel per knob (at most 2 a row) or only ``param``. Each bar
    carries its number of trials; a bar with a caveat (few trials, or a knob value always paired with another knob's
    value) is hatched and marked with a number, its caveat listed under the figure."""
    import textwrap

    names = [param] if param else sorted({r["param"] for r in rows})
    cols = min(2, max(1, len(names)))
    nrows = math.ceil(max(1, len(names)) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(WIDTH_IN, 2.6 * nrows + 1.0), layout="constrained", squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    notes: list[str] = []
    for ax, name in zip(axes.flat, names):
        sub = [r for r in rows if r["param"] == name]
        x = list(range(len(sub)))
        bottom = [0.0] * len(sub)
        for o in OUTCOMES:
            ax.bar(x, [r[o] for r in sub], bottom=bottom, color=OUTCOME_COLOURS[o], label=o,
                   hatch=["//" if r["caveat"] else "" for r in sub], edgecolor="white")
            bottom = [b + r[o] for b, r in zip(bottom, sub)]
        labels = []
        for xi, r in zip(x, sub):
            ax.text(xi, 1.01, f"n={r['n']}", ha="center", va="bottom", fontsize=7)
            label = _short(r["value"]).replace(", ", ",\n")  # a bin "[lo, hi]" on two lines
            if r["caveat"]:
                notes.append(f"({len(notes) + 1}) {name} = {label}: {r['caveat']}")
                label += f" ({len(notes)})"
            labels.append(label)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(0, 1.12)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("fraction of trials", fontsize=8)
        ax.set_xlabel("value", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=OUTCOME_COLOURS[o]) for o in OUTCOMES]
    legend_outside(axes.flat[cols - 1 if len(names) >= cols else 0], handles=handles, labels=list(OUTCOMES), title="outcome", title_fontsize=8)
    if notes:
        fig.supxlabel("\n".join(textwrap.fill(n, 110) for n in notes), fontsize=6.5, color="#555", ha="left", x=0.01)
    fig.suptitle("Outcome of the trials per knob value (hatched, numbered: read with care)", fontsize=10)
    return fig


def history_plotly(study: optuna.Study):
    """Optimisation history (plotly): val_nmse per trial and the best so far."""
    return optuna.visualization.plot_optimization_history(study, target_name="val_nmse")


def outcomes_plotly(rows: list[dict]):
    """Stacked bars per knob value: fraction complete / pruned / non-finite / failed (plotly, one panel per knob)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = sorted({r["param"] for r in rows}) or ["(no trials)"]
    cols = min(3, len(names))
    fig = make_subplots(rows=math.ceil(len(names) / cols), cols=cols, subplot_titles=names)
    for i, name in enumerate(names):
        sub = [r for r in rows if r["param"] == name]
        for kind in OUTCOMES:
            fig.add_trace(go.Bar(x=[r["value"] for r in sub], y=[r[kind] for r in sub], name=kind, marker_color=OUTCOME_COLOURS[kind],
                                 legendgroup=kind, showlegend=i == 0, customdata=[r["n"] for r in sub],
                                 hovertemplate="%{x}: %{y:.0%} of %{customdata} trials<extra>" + kind + "</extra>"),
                          row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(barmode="stack", title="Trial outcome by knob value", height=300 * math.ceil(len(names) / cols))
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    return fig


def sweep_conclusion(metrics: dict) -> str:
    """Markdown bullets from :func:`workbench.studies.sweeps.sweep_metrics` (+ importances): counts, the best trial, and which knob values
    went non-finite, with their caveats."""
    c, best = metrics["progress"], metrics["best"]
    lines = [f"- {c['done']} finished trials: {c['complete']} complete, {c['pruned']} pruned ({len(metrics['nonfinite'])} for a "
             f"non-finite step), {c['failed']} failed."]
    if best:
        knobs = ", ".join(f"{k}={fmt(v)}" for k, v in best["params"].items())
        lines.append(f"- Best: trial {best['number']}, validation NMSE {fmt(best['value'], 4)} ({knobs}).")
    for r in metrics["outcome_fractions"]:
        if r["nonfinite"] > 0:
            lines.append(f"- {r['param']} = {r['value']}: {r['nonfinite']:.0%} of {r['n']} trial(s) non-finite"
                         + (f" (caveat: {r['caveat']})" if r["caveat"] else "") + ".")
    ops = sorted({op for r in metrics["nonfinite"] for op in r["ops"]})
    if ops:
        lines.append(f"- Non-finite steps came from {', '.join(ops)}.")
    if metrics.get("importances"):
        top = max(metrics["importances"], key=metrics["importances"].get)
        lines.append(f"- Most important knob for the validation NMSE: {top} ({metrics['importances_note']}).")
    elif metrics.get("importances_note"):
        lines.append(f"- No importances: {metrics['importances_note']}.")
    return "\n".join(lines)
