"""Writing a committed result file: ``PATH.json`` (the summary) and ``PATH.md`` (its markdown), the pair the README
quotes and ``tests/test_results.py`` ties to it.

Owns: the header every result carries (kind, the command, time, versions) and the atomic write of the pair.
Must not: measure or format (``workbench.figures.results.markdown`` makes the markdown).
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path

from ..figures.results import markdown
from ..io import atomic_write_json, atomic_write_text


def header(kind: str) -> dict:
    """{"kind", "command" (this process's workbench command line), "created" (UTC), "versions"}."""
    import numpy
    import torch

    from .. import __version__

    return {"kind": kind, "command": "workbench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"workbench": __version__, "torch": torch.__version__, "numpy": numpy.__version__}}


def write_results(path: str, summary: dict) -> Path:
    """Write ``summary`` to PATH.json and its markdown to PATH.md (each atomically); returns the .json path."""
    out = Path(path).with_suffix(".json")
    atomic_write_json(out, summary)
    atomic_write_text(out.with_suffix(".md"), markdown(summary))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return out
