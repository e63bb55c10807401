"""The README's result tables are the committed result files, and the files are what the code makes of their numbers.

Every ``results/NAME.json`` is the summary `workbench compare --results results/NAME` wrote; ``results/NAME.md`` must
equal the markdown the formatter makes from it now, and the README must show that markdown between
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` with the command that made it beside it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from workbench.figures.results import markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = sorted((ROOT / "results").glob("*.json"))


def _block(readme: str, name: str) -> str:
    m = re.search(rf"<!-- results:{re.escape(name)} -->\n(.*?)<!-- /results:{re.escape(name)} -->", readme, re.S)
    assert m, f"README.md has no block <!-- results:{name} --> ... <!-- /results:{name} -->"
    return m.group(1)


def test_the_readme_quotes_result_files():
    assert RESULTS, "results/ holds no result file: the README's tables must come from one"
    readme = (ROOT / "README.md").read_text()
    quoted = set(re.findall(r"<!-- results:([\w.-]+) -->", readme))
    assert quoted == {p.stem for p in RESULTS}, (quoted, [p.stem for p in RESULTS])


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_a_result_file_regenerates_its_tables_and_the_readme_shows_them(path):
    summary = json.loads(path.read_text())
    md = markdown(summary)
    assert path.with_suffix(".md").read_text() == md
    readme = (ROOT / "README.md").read_text()
    block = _block(readme, path.stem)
    assert block.strip() == md.strip()
    assert summary["command"] in readme  # the command that made it is printed beside it
    if summary["kind"] == "compare":
        assert summary["localisation"]["split"] == "test"  # headline numbers are on the held-out split
