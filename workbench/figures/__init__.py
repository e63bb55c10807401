"""Figure builders: rows in, figure out (matplotlib for the static PNG files, plotly where interaction helps).

Each module mirrors a study in :mod:`workbench.studies` and draws what it returns. Figures never compute a
measurement (they format, scale and lay out), never simulate and never write anything but the figure file
they are asked to save. Titles say in words what is shown; every axis carries its quantity and unit.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..io import atomic_write, atomic_write_text

COLOURS = {"R_true": "#1b9e77", "R_samp": "#d95f02", "R_pred": "#7570b3", "R_blend": "#e7298a", "R_samp_raw": "#a6761d"}
DPI = 110


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = DPI) -> str:
    """Write a matplotlib figure as PNG atomically and close it. Returns the path as a string."""
    data = png_bytes(fig, dpi)
    atomic_write(path, lambda f: f.write(data))
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
