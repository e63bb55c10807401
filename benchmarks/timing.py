"""The one timing helper of the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


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
