"""Presentation: rows in, figures, tables and prose out (matplotlib for the static PNG files, plotly where
interaction helps, markdown for tables and conclusions).

Owns: every figure, every markdown table and every sentence of prose made from a study's rows, and the one
number formatter :func:`fmt` that all of them (and the panels of :mod:`workbench.ui`, the command line's text
and :func:`workbench.train.checks`' details) use. Must not: compute a measurement, simulate, or write anything
but the figure file it is asked to save.

Each module mirrors a study in :mod:`workbench.studies` and presents what it returns: its figures and, as
markdown, its tables and conclusions (e.g. :func:`.compare.format_table`, :func:`.localisation.localisation_conclusion`).
The studies compute the rows; everything that turns rows into text or pictures lives here. Figures format,
scale and lay out. Conventions every builder follows: a title that says in words what is shown, every
axis labelled with its quantity and unit, legends outside the data (:func:`legend_outside`), at most about
eight legend entries per axis (facet instead), exact zeros and non-finite values marked as such rather than
drawn at an arbitrary floor. :func:`save_figure` writes the PNG and records its title and axis labels in
``figures.json`` beside it, in the order the figures were saved (the report index and the tests read it).
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import atomic_write, atomic_write_text

if TYPE_CHECKING:  # matplotlib is imported where a figure is made: fmt alone (train, the command line) stays light
    from matplotlib.figure import Figure

COLOURS = {"R_true": "#1b9e77", "R_samp": "#d95f02", "R_pred": "#7570b3", "R_blend": "#e7298a", "R_samp_raw": "#a6761d"}
DPI = 144  # sharp in JupyterLab on high-density screens
WIDTH_IN = 6.5  # a figure's width in inches: 936 px at DPI, within a notebook's ~970 px (tests/test_figures.py checks <= 1000)
FORMATS = ("png", "svg", "pdf")  # what save_figure writes, by the path's suffix
MANIFEST = "figures.json"
MISSING = "-"  # what fmt writes for a missing value


def fmt(value: Any, digits: int = 3, *, show_nonfinite: bool = False) -> str:
    """The package's one number formatter, for tables, prose, panels and the command line.

    Floats (and other real numbers: numpy, Fraction) to ``digits`` significant digits (``f"{v:.{digits}g}"``);
    ints as ints; bools and strings as themselves (``str``); None, NaN and +-inf, a missing value, as
    :data:`MISSING` ("-"). ``show_nonfinite=True`` is for a measured quantity whose non-finiteness is the
    finding (a gradient norm, a loss): NaN and +-inf are written "nan", "inf", "-inf", and None (how strict JSON
    stores a non-finite number) "nan". Anything else is ``str(value)``."""
    if value is None:
        return "nan" if show_nonfinite else MISSING
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v) and not show_nonfinite:
            return MISSING
        return f"{v:.{digits}g}"
    return str(value)


def legend_outside(ax, **kwargs) -> None:
    """The axis's legend to the right of the data, without a frame."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, fontsize=8, **kwargs)


def plain_log_ticks(ax, axis: str = "y") -> None:
    """Tick labels of a log axis as plain numbers (3 significant digits) instead of 1.5x10^0-style labels, which
    matplotlib falls back to when the axis spans less than a decade."""
    from matplotlib.ticker import FuncFormatter

    ticks = FuncFormatter(lambda v, _: fmt(v))
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(ticks)
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < 10:  # under a decade: label the minor ticks too, or the axis has no number at all
        target.set_minor_formatter(ticks)


def describe(fig: Figure) -> dict:
    """{"title", "axes": [{"title", "xlabel", "ylabel"}]} of a matplotlib figure (colour bars and axes switched off,
    such as a message's, left out)."""
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>" and a.get_visible() and a.axison]
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    return {"title": suptitle or (axes[0].get_title() if axes else ""),
            "axes": [{"title": a.get_title(), "xlabel": a.get_xlabel(), "ylabel": a.get_ylabel()} for a in axes]}


def png_bytes(fig: Figure, dpi: int = DPI, fmt: str = "png", close: bool = True, tight: bool = True) -> bytes:
    """A matplotlib figure as PNG bytes (or ``fmt``: "svg", "pdf"); the figure is closed unless ``close=False``.
    ``tight=False`` skips the tight bounding box (one draw less: a panel's figure under constrained layout already
    fits its canvas)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    if close:
        plt.close(fig)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI, close: bool = True) -> str:
    """Write a matplotlib figure atomically as PNG, SVG or PDF (by the path's suffix, :data:`FORMATS`), record its
    title and labels in ``figures.json`` beside it for a PNG (replacing an entry of the same file name, else appending:
    the notebook's order; the report pages show the PNGs), and close it unless ``close=False``."""
    from ..config import check_choice

    path = Path(path)
    kind = path.suffix.lstrip(".").lower()
    check_choice("figure format", kind, FORMATS)
    meta = {"file": path.name, **describe(fig)}
    data = png_bytes(fig, dpi, kind, close)
    atomic_write(path, lambda f: f.write(data))
    if kind != "png":
        return str(path)
    manifest = path.parent / MANIFEST
    entries = json.loads(manifest.read_text()) if manifest.exists() else []
    entries = [e for e in entries if e.get("file") != path.name] + [meta]
    atomic_write_text(manifest, json.dumps(entries, indent=2) + "\n")
    return str(path)


def save_html(fig, path: str | os.PathLike) -> str:
    """Write a plotly figure as a standalone HTML page; plotly.js is written once beside it (offline)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    js = os.path.join(folder, "plotly.min.js")
    if not os.path.exists(js):
        from plotly.offline import get_plotlyjs

        atomic_write_text(js, get_plotlyjs())
    atomic_write_text(path, fig.to_html(include_plotlyjs="directory", full_html=True))
    return path


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A list of flat dicts as a markdown table: numbers to 4 significant digits (:func:`fmt`), a measured NaN or
    inf as "nan" / "inf" (in these tables it is a finding), None as "-"."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v) -> str:
        return MISSING if v is None else fmt(v, 4, show_nonfinite=True)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
