"""The timing helper of the benchmark scripts and the one way they write their results."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from workbench.io import atomic_write_json, atomic_write_text


def best_time(fn: Callable[[], object], repeats: int, warmup: bool = False) -> float:
    """Best wall time in seconds of ``repeats`` calls of ``fn`` (CUDA synchronised), after an optional warm-up call."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def write_results(stem: str, title: str, head: str, table: str, rows: list[dict]) -> str:
    """Write benchmarks/<stem>.md (title, head line, markdown table) and <stem>.json (the rows), each atomically;
    returns the markdown text."""
    here = Path(__file__).resolve().parent
    text = f"# {title}\n\n{head}\n\n{table}\n"
    atomic_write_text(here / f"{stem}.md", text)
    atomic_write_json(here / f"{stem}.json", rows)
    return text
