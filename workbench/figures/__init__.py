"""Figure builders: rows in, figure out (matplotlib for the static PNG files, plotly where interaction helps).

Each module mirrors a study in :mod:`workbench.studies` and draws what it returns. Figures never compute a
measurement (they format, scale and lay out), never simulate and never write anything but the figure file
they are asked to save. Conventions every builder follows: a title that says in words what is shown, every
axis labelled with its quantity and unit, legends outside the data (:func:`legend_outside`), at most about
eight legend entries per axis (facet instead), exact zeros and non-finite values marked as such rather than
drawn at an arbitrary floor. :func:`save_figure` writes the PNG and records its title and axis labels in
``figures.json`` beside it, in the order the figures were saved (the report index and the tests read it).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..io import atomic_write, atomic_write_text

COLOURS = {"R_true": "#1b9e77", "R_samp": "#d95f02", "R_pred": "#7570b3", "R_blend": "#e7298a", "R_samp_raw": "#a6761d"}
DPI = 144  # sharp in JupyterLab on high-density screens
MANIFEST = "figures.json"


def legend_outside(ax, **kwargs) -> None:
    """The axis's legend to the right of the data, without a frame."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, fontsize=8, **kwargs)


def plain_log_ticks(ax, axis: str = "y") -> None:
    """Tick labels of a log axis as plain numbers (3 significant digits) instead of 1.5x10^0-style labels, which
    matplotlib falls back to when the axis spans less than a decade."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(fmt)
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < 10:  # under a decade: label the minor ticks too, or the axis has no number at all
        target.set_minor_formatter(fmt)


def describe(fig: Figure) -> dict:
    """{"title", "axes": [{"title", "xlabel", "ylabel"}]} of a matplotlib figure (colour bars left out)."""
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>" and a.get_visible()]
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    return {"title": suptitle or (axes[0].get_title() if axes else ""),
            "axes": [{"title": a.get_title(), "xlabel": a.get_xlabel(), "ylabel": a.get_ylabel()} for a in axes]}


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> str:
    """Write a matplotlib figure as PNG atomically, record its title and labels in ``figures.json`` beside it
    (replacing an entry of the same file name, else appending: the notebook's order), and close it."""
    path = Path(path)
    meta = {"file": path.name, **describe(fig)}
    data = png_bytes(fig, dpi)
    atomic_write(path, lambda f: f.write(data))
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
    """A list of flat dicts as a markdown table (numbers to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
