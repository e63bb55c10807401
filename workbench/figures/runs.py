"""Presentation of :mod:`workbench.runs`: two runs side by side as a markdown table (notebook 04's runs cell).

Owns: the markdown of a :func:`workbench.runs.diff_runs` result. Must not: find, read or compare runs (that is
:func:`workbench.runs.diff_runs`, the one implementation behind ``workbench runs diff`` and the notebook cell).
"""

from __future__ import annotations

from typing import Any

from . import markdown_table


def diff_markdown(diff: dict[str, Any], max_rows: int = 40) -> str:
    """``diff`` (:func:`workbench.runs.diff_runs`: {"a", "b", "rows": [(section, key, value in A, value in B)]}) as
    markdown: the two folders, then a table of section, key, A, B and "≠" where they differ; at most ``max_rows``
    rows (the rest are counted, and ``workbench runs diff A B`` lists them)."""
    rows = diff["rows"]
    table = [{"section": sec, "key": key, "A": _cell(a), "B": _cell(b), "": "≠" if a != b else ""} for sec, key, a, b in rows[:max_rows]]
    more = f"\n\n{len(rows) - max_rows} more rows: `workbench runs diff {diff['a']['path']} {diff['b']['path']}`" if len(rows) > max_rows else ""
    return f"A: `{diff['a']['path']}`  \nB: `{diff['b']['path']}`\n\n{markdown_table(table)}{more}"


def _cell(v: Any) -> Any:
    return v if v is None or isinstance(v, (int, float, str)) else str(v)
