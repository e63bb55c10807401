"""The measurements behind the notebooks and the README tables: data in, rows out.

Owns: what is measured and how (simulating, training, evaluating), returned as plain rows (dicts of floats,
lists, strings) or small dataclasses of tensors. Must not: draw, write markdown or prose, format a number for
display, write files or hold widgets. Everything that turns rows into a figure, a markdown table or a sentence
lives in :mod:`workbench.figures`, in the module of the same name (:mod:`workbench.figures.compare` for
:mod:`.compare`, :mod:`workbench.figures.seed_note` for :mod:`.seed_note`, ...), and numbers are written by its
one formatter :func:`workbench.figures.fmt`. Studies call the package's one implementation of each formula and fix.

* :mod:`.pipeline`: the pipeline's matrices, norms, spectra and loading (notebooks 01, 02), the R_samp
  estimator table;
* :mod:`.seed_note`: the seed note's Progress table, measured (notebook 01, ``workbench seed-table``);
* :mod:`.gradients`: eigen backends under degeneracy, finite differences, per-backend reports (notebook 03);
* :mod:`.compare`: every preset trained on the same scenes, against the baselines (:mod:`.baselines`) and the
  Cramer-Rao bound (notebooks 04, 05, ``workbench compare``, the README's results table);
* :mod:`.localisation`: localisation versus SNR with the Cramer-Rao bound (notebook 05);
* :mod:`.sweeps`: what an Optuna study says (notebook 06).
"""

from __future__ import annotations

import torch


def quartiles(x: torch.Tensor) -> dict[str, float]:
    """{"median", "q25", "q75"} of the values of ``x`` with linear interpolation (as numpy's default), inf-safe:
    two equal neighbours (inf, inf included) give that value instead of torch.quantile's nan."""
    v = x.detach().double().flatten().sort().values.cpu()
    n = v.numel()
    out = {}
    for name, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):
        pos = q * (n - 1)
        lo, hi = int(pos), min(int(pos) + 1, n - 1)
        a, b = float(v[lo]), float(v[hi])
        out[name] = a if a == b or pos == lo else a + (b - a) * (pos - lo)
    return out


def median(x: torch.Tensor) -> float:
    """The interpolated median of :func:`quartiles`."""
    return quartiles(x)["median"]
