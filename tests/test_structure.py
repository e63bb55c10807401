"""The package's layout rules, checked on its source: studies return rows (no markdown, no prose), presentation
lives in workbench/figures/, and numbers for display are written by one formatter, :func:`workbench.figures.fmt`."""

from __future__ import annotations

import ast
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from workbench.figures import MISSING, fmt

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "workbench" / "studies"
FORMATTER_HOME = ROOT / "workbench" / "figures" / "__init__.py"
FORMATTER_NAMES = {"fmt", "_fmt", "_f"}
MARKDOWN_STARTS = ("- ", "| ", "|---")


def _docstrings(tree: ast.AST) -> set[int]:
    """id() of every docstring node (module, class, function): docstrings may hold bullets and ``**kwargs``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def markdown_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal (f-string parts included, docstrings excluded) that is markdown: a
    bullet or table row at its start or after a newline ("- ", "| "), or bold ("**")."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            lines = text.split("\n")
            if "**" in text or any(line.lstrip(" ").startswith(MARKDOWN_STARTS) for line in lines):
                found.append((node.lineno, text))
    return found


def formatter_definitions(source: str) -> list[tuple[int, str]]:
    """(line, name) of every function named fmt / _fmt / _f, defined with def or as a lambda assigned to the name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in FORMATTER_NAMES:
            found.append((node.lineno, node.name))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Lambda):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [(node.lineno, t.id) for t in targets if isinstance(t, ast.Name) and t.id in FORMATTER_NAMES]
    return found


def _package_sources() -> list[Path]:
    return sorted(p for folder in ("workbench", "benchmarks", "notebooks", "tests") for p in (ROOT / folder).rglob("*.py"))


# ---------------------------------------------------------------------------------------------
def test_the_checks_catch_what_they_look_for():
    """The two source checks below would fail on the code they forbid (they are not vacuous)."""
    prose = 'def conclusion(rows):\n    """Markdown bullets."""\n    return "\\n".join([f"- **{rows[0]}** is best", "| a | b |"])\n'
    assert sorted(text for _, text in markdown_literals(prose)) == ["** is best", "- **", "| a | b |"]
    assert markdown_literals('def f(**kw):\n    """{name: preset(name, **overrides)}\n\n    - a bullet in a docstring"""\n    return "-"\n') == []
    formatters = "def _f(v):\n    return str(v)\n\nfmt = lambda x: f'{x:.3g}'\n\nclass A:\n    def _fmt(self):\n        pass\n"
    assert formatter_definitions(formatters) == [(1, "_f"), (4, "fmt"), (7, "_fmt")]


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.py")), ids=lambda p: p.name)
def test_studies_return_rows_not_markdown(path):
    """Studies compute rows; markdown tables and prose are made in workbench/figures/ (the module of the same name)."""
    found = markdown_literals(path.read_text())
    assert not found, f"{path.relative_to(ROOT)} writes markdown (move it to workbench/figures/{path.name}): {found}"


def test_one_number_formatter():
    """Only workbench/figures/__init__.py defines fmt; no module keeps a private number formatter of its own."""
    found = {str(p.relative_to(ROOT)): defs for p in _package_sources() if p != FORMATTER_HOME and (defs := formatter_definitions(p.read_text()))}
    assert not found, f"number formatters outside workbench/figures/__init__.py (use workbench.figures.fmt): {found}"
    assert [name for _, name in formatter_definitions(FORMATTER_HOME.read_text())] == ["fmt"]


# ---------------------------------------------------------------------------------------------
# fmt's contract
@pytest.mark.parametrize("value, digits, text", [
    (0.123456, 3, "0.123"), (1234.5, 3, "1.23e+03"), (2695.97, 4, "2696"), (1e-7, 3, "1e-07"), (-0.5, 2, "-0.5"),
    (np.float32(0.25), 3, "0.25"), (np.float64(1 / 3), 2, "0.33"), (Fraction(1, 4), 3, "0.25"),
    (7, 3, "7"), (123456, 3, "123456"), (np.int64(12), 3, "12"),
    (True, 3, "True"), (False, 3, "False"), ("seed_fix2", 3, "seed_fix2"),
])
def test_fmt_numbers_ints_bools_and_text(value, digits, text):
    assert fmt(value, digits) == text


@pytest.mark.parametrize("value", [None, math.nan, math.inf, -math.inf, np.float32("nan")])
def test_fmt_missing_values_are_a_dash(value):
    assert fmt(value) == MISSING == "-"


@pytest.mark.parametrize("value, text", [(None, "nan"), (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (0.5, "0.5"), (3, "3")])
def test_fmt_keeps_a_measured_nonfinite_value(value, text):
    """show_nonfinite=True: a gradient norm or loss that is NaN is the finding (None: strict JSON's NaN)."""
    assert fmt(value, show_nonfinite=True) == text


def test_fmt_agrees_with_the_format_spec_it_replaced():
    for v in (0.000285, 41.03, 3.46e12, 1.7e25, 22.96, 0.1 + 0.2, -1e-300):
        for d in (2, 3, 4, 6):
            assert fmt(v, d) == f"{v:.{d}g}"
