"""The seed note's Progress table, measured (notebook 01 and ``workbench seed-table``).

The note quoted ||R_samp||_F 0.000285 -> 41.03 (Fix 1), ||R_blend||_F 3.46e12 -> 22.96 (Fix 2), loss
1.7e25 -> 2695.97, rank(R_blend) 144 and NaN gradients throughout. :func:`seed_table` measures each of these
per preset on simulated scenes; :data:`SEED_NOTE_ROWS` keeps the note's own figures for side-by-side display. The
markdown table and the prose are in :mod:`workbench.figures.seed_note`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import SEED_PRESETS, preset
from ..covariance import oracle_nmse, spectrum_stats
from ..diagnostics import gradient_report
from ..forward import forward, rsamp_cache
from ..model import build_model
from . import quartiles
from .pipeline import scene_batch

SEED_NOTE_ROWS = {  # the seed note's own figures
    "seed_before": {"R_samp_fro": 0.000285, "R_blend_fro": 3.46e12, "loss": 1.7e25, "grad": "NaN"},
    "seed_fix2": {"R_samp_fro": 41.03, "R_blend_fro": 22.96, "loss": 2695.97, "grad": "NaN", "rank": 144},
}


def seed_table(n_scenes: int = 64, presets: Iterable[str] = (*SEED_PRESETS, "recommended"), seed: int = 0,
               n_grad: int = 16, overrides: dict | None = None, data=None) -> list[dict]:
    """The seed note's Progress table, measured: for each preset, over the same ``n_scenes`` scenes and
    the same untrained model, ||R_samp||_F (raw and as used), ||R_blend||_F, rank(R_blend) and the NMSE of
    an exact prediction (quartiles), then the loss, the gradient norm per group and ``ok`` from
    :func:`~workbench.diagnostics.gradient_report` on the first ``n_grad`` scenes. ``overrides`` (dotted keys,
    e.g. {"system.N_H": 6}) apply to every preset. ``data``: a dataset folder whose first ``n_scenes`` scenes are used
    instead of simulated ones (:func:`workbench.studies.pipeline.scene_batch`; ``overrides`` must then carry its system)."""
    rows = []
    for name in presets:
        cfg = preset(name, **(overrides or {}))
        batch = scene_batch(cfg, n_scenes, seed, data)
        model = build_model(cfg.system, cfg.model, seed=seed)
        cache = rsamp_cache(batch)
        with torch.no_grad():
            raw = cache.raw(cfg.fixes.rsamp_estimator, cfg.system)
            R_samp = cache.rsamp_of(cfg)
            cov = forward(model, batch, R_samp, cfg, prior=cache.prior_of(cfg), terms=("nmse",)).cov
            stats = spectrum_stats(cov.R_blend)
        report = gradient_report(cfg, batch[:n_grad], model, seed=seed)
        rows.append(
            {
                "preset": name,
                "R_samp_raw_fro": quartiles(torch.linalg.matrix_norm(raw)),
                "R_samp_fro": quartiles(torch.linalg.matrix_norm(R_samp)),
                "R_blend_fro": quartiles(stats["fro"]),
                "R_blend_rank": quartiles(stats["rank"]),
                "oracle_nmse": quartiles(oracle_nmse(batch.R_true, R_samp, cfg.fixes)),
                "loss": report["loss"],
                "terms": report["terms"],
                "grad_norm": report["grad_norm"],
                "ok": report["ok"],
                "provenance": report["provenance"],
            }
        )
    return rows


def seed_comparison(seed_rows: list[dict]) -> list[dict]:
    """The seed note's Progress table beside the measured one: one row per (metric, preset) the note
    quotes, {"metric", "preset", "seed_note", "measured"} (measured = median over scenes)."""
    by_preset = {r["preset"]: r for r in seed_rows}
    out = []
    for name, quoted in SEED_NOTE_ROWS.items():
        r = by_preset.get(name)
        if r is None:
            continue
        measured = {
            "R_samp_fro": r["R_samp_fro"]["median"],
            "R_blend_fro": r["R_blend_fro"]["median"],
            "loss": r["loss"],
            "grad": "finite" if r["ok"] else "NaN",
            "rank": r["R_blend_rank"]["median"],
        }
        for metric, value in quoted.items():
            out.append({"metric": metric, "preset": name, "seed_note": value, "measured": measured[metric]})
    return out


