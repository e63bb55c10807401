"""Localisation does not depend on the torch thread count: the same covariances give the same statistics (to 1e-6
relative) with one thread and with two. What does change with the thread count is training (reduction order in the
backward pass), so trained networks' R_pred differ at rounding level; docs/guarantees.md says why their localisation
figures can then differ by more (the statistics are discontinuous in R)."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.experiments import budget_overrides, entry_config
from workbench.studies.localisation import localisation_vs_snr, rsamp_source


def _flat(o, prefix=""):
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _flat(v, f"{prefix}.{k}")
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, o


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_localisation_statistics_agree_at_one_and_two_threads(restore_threads):
    system = entry_config("recommended", budget_overrides("tiny")).system
    sources = {"R_true": lambda b: b.R_true, "R_samp": rsamp_source(system, "ls_scatter")}
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = localisation_vs_snr(system, [10.0], 8, sources, seed=0, split="test", n_boot=20)
        results[threads] = dict(_flat({"per_source": out["per_source"], "covariances": out["covariances"]}))
    one, two = results[1], results[2]
    assert one.keys() == two.keys() and len(one) > 20
    for key, a in one.items():
        b = two[key]
        if isinstance(a, float) and isinstance(b, float) and math.isfinite(a):
            assert b == pytest.approx(a, rel=1e-6, abs=1e-12), key
        else:
            assert a == b, key
