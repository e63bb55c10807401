"""Did the fixes help the task? Every preset trained on the same scenes for the same budget, then held against
the honest baselines, the physics and the Cramer-Rao bound (notebooks 04 and 05, ``workbench compare``, the
README's results table).

One :class:`~workbench.forward.TrainingData` is simulated for all entries (their system, scene counts and seed
must agree, or :func:`workbench.experiments.entry_configs` refuses), each entry is trained on it by
:func:`workbench.experiments.train_entries` into ``out/<entry>/`` (a resumable run folder), and all are evaluated on
the same held-out scenes, each network on its own device (:func:`workbench.forward.forward`):

* validation NMSE of R_pred on the validation split, beside the baselines of :mod:`.baselines` (constants
  fitted on the training split);
* steps skipped for a non-finite gradient, gradient norms per group per epoch, training time (the histories);
* localisation: MUSIC on each network's R_pred (and R_blend) with the true K, beside R_true, the beamscan R_samp
  and the physics baseline, at a few SNRs on scenes of their own (:func:`.localisation.localisation_vs_snr`),
  RMSE as a multiple of sqrt(CRB), F1 and the accuracy of each source's own count of K.

An entry is a preset name or a variant of one (:data:`workbench.experiments.VARIANTS`). A budget
(:data:`workbench.experiments.BUDGETS`) is a set of dotted overrides applied to every entry. Data in, rows out: the
command line writes the files; nothing here draws or writes prose (the results table as markdown and the conclusions
are in :mod:`workbench.figures.compare`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoints import TrainResult
from ..config import ConfigError, ExperimentConfig
from ..estimators import oracle_knowledge
from ..experiments import (  # noqa: F401  (re-exported for the command line and the callers of this study)
    BUDGETS,
    DEFAULT_ENTRIES,
    ENTRIES,
    VARIANTS,
    budget_overrides,
    entry_config,
    entry_configs,
    history_summary,
    scenes_digest,
    train_entries,
)
from ..forward import TrainingData
from ..train import checks as train_checks
from .baselines import BASELINES, ORACLE, baseline_rows, beats_every_baseline, network_nmse, network_row
from .localisation import localisation_sources, localisation_vs_snr

LOCALISATION_SEED_OFFSET = 2_000_003  # the localisation scenes' seeds, apart from the training and validation seeds


def _cached_sources(cfgs: dict[str, ExperimentConfig], data: TrainingData, max_fit_scenes: int | None) -> dict:
    """The beamscan baselines' matrices from ``data``'s R_samp cache when an entry trained on the Fix-1 beamscan
    R_samp (the same matrices as :func:`.baselines.rsamp_source`), so they are not estimated twice."""
    for cfg in cfgs.values():
        if cfg.fixes.rsamp_estimator == "beamscan" and cfg.fixes.rsamp_normalise:
            pair = (data.rsamp("train", cfg)[:max_fit_scenes], data.rsamp("val", cfg))
            return {"beamscan_scaled": pair, "beamscan_affine": pair}
    return {}


def training_rows(runs: dict[str, TrainResult]) -> list[dict]:
    """One row per run (notebook 04's table): the seed note's four checks (:func:`workbench.train.checks`), steps
    skipped, final training loss and validation NMSE, last-epoch gradient norm per group, training seconds."""
    rows = []
    for name, run in runs.items():
        checks = train_checks(run.history, run.provenance)
        s = history_summary(run)
        last = run.history[-1] if run.history else {}
        rows.append({"preset": name, **{c["name"]: c["passed"] for c in checks}, "skipped steps": s["skipped_nonfinite"],
                     "final train loss": last.get("train_loss"), "final val NMSE": last.get("val_nmse"),
                     **{f"‖∇ {g}‖": v for g, v in s["grad_norm"].items()}, "train s": s["train_seconds"],
                     "NaN source": ", ".join(s["provenance"]) or "-"})
    return rows


def compare(entries: Sequence[str] = DEFAULT_ENTRIES, overrides: dict[str, Any] | None = None, out: str | Path | None = None,
            snrs_db: Sequence[float] = (0.0, 10.0, 20.0), n_per_snr: int = 16, method: str = "music", blend: bool = True,
            baselines: Sequence[str] = BASELINES, max_fit_scenes: int | None = 512, reuse: bool = True, progress: bool = True,
            data: TrainingData | None = None) -> dict:
    """Train ``entries`` with ``overrides`` (e.g. :func:`budget_overrides`) on one set of scenes and evaluate them.

    Returns a JSON-ready dict: {"entries", "overrides", "scenes" (digest, sizes), "configs" {entry: config},
    "runs" {entry: :func:`history_summary` + "history"}, "nmse": baseline and network rows (:mod:`.baselines`,
    validation split), "localisation": :func:`.localisation.localisation_vs_snr` result, "table": :func:`results_rows`}."""
    overrides = dict(overrides or {})
    cfgs = entry_configs(entries, overrides)
    first = next(iter(cfgs.values()))
    system = first.system
    t0 = time.perf_counter()
    data = TrainingData.simulate(first) if data is None else data
    if data.key != TrainingData.key_of(first):
        raise ConfigError("data: the given TrainingData was simulated for another system, size or seed than the entries")
    runs = train_entries(cfgs, data, None if out is None else Path(out), reuse, progress)
    rows = baseline_rows(data.train, data.val, system, names=baselines, max_fit_scenes=max_fit_scenes,
                         sources=_cached_sources(cfgs, data, max_fit_scenes))
    for name, run in runs.items():
        values = network_nmse(run.model, data.val, data.rsamp("val", run.config), run.config, prior=data.prior("val", run.config))
        rows.append(network_row(name, values, data.val.snr_db))
    sources = localisation_sources(first, ["beamscan"], physics_k="true", runs=runs, blend=blend)
    loc = localisation_vs_snr(system, list(snrs_db), n_per_snr, sources, method=method,
                              seed=first.train.seed + LOCALISATION_SEED_OFFSET, use_true_k=True, device=first.train.device)
    result = {
        "entries": list(cfgs), "overrides": overrides,
        "scenes": {"digest": scenes_digest(data), "n_train": len(data.train), "n_val": len(data.val), "seed": first.train.seed},
        "configs": {n: c.to_dict() for n, c in cfgs.items()},
        "runs": {n: {**history_summary(r), "history": r.history} for n, r in runs.items()},
        "nmse": rows, "localisation": loc, "seconds": time.perf_counter() - t0,
    }
    base_rows = [r for r in rows if r["predictor"] in baselines]
    result["verdicts"] = {n: beats_every_baseline([*base_rows, next(r for r in rows if r["predictor"] == n)], n) for n in runs}
    result["table"] = results_rows(result)
    return result


# ---------------------------------------------------------------------------------------------
# The results table
TABLE_SNRS = (0.0, 10.0, 20.0)
_REFERENCE_ROWS = (  # (row, localisation source, NMSE row, kind)
    ("R_true (exact, noise-free)", "R_true", None, "reference"),
    ("scaled identity", None, "identity", "baseline"),
    ("beamscan R_samp (a B + c I)", "R_samp[beamscan]", "beamscan_affine", "baseline"),
    ("physics baseline: ML from snapshots (a X + c I)", "physics[ML]", "physics_affine", "baseline"),
)


def _ratio(value, bound):
    return None if value is None or bound is None or not bound > 0 else value / bound


def results_rows(result: dict) -> list[dict]:
    """One row per reference, baseline and trained entry: {"row", "kind", "nmse" (validation, mean), "oracle",
    "rmse_over_crb": {snr: {"phi", "theta", "r"}} at the SNRs of :data:`TABLE_SNRS` that were run (every matched
    pair), "detected_over_crb" (the same over the detected sources only), "f1" and
    "k_accuracy" (means over those SNRs), "skipped", "train_seconds"}; None where a value does not apply."""
    loc, nmse_rows = result["localisation"], {r["predictor"]: r for r in result["nmse"]}
    snrs = [s for s in loc["snr_db"] if s in TABLE_SNRS] or loc["snr_db"]
    crb = loc["sqrt_crb"]

    def loc_part(source: str | None) -> dict:
        if source is None or source not in loc["covariances"]:
            return {"rmse_over_crb": None, "detected_over_crb": None, "f1": None, "k_accuracy": None}
        m = loc["covariances"][source]
        idx = [loc["snr_db"].index(s) for s in snrs]

        def ratios(prefix: str) -> dict:
            return {f"{loc['snr_db'][i]:g}": {"phi": _ratio(m[f"{prefix}phi_deg"][i], crb["phi_deg"][i]),
                                              "theta": _ratio(m[f"{prefix}theta_deg"][i], crb["theta_deg"][i]),
                                              "r": _ratio(m[f"{prefix}r_m"][i], crb["r_m"][i])} for i in idx}

        mean = lambda key: sum(m[key][i] for i in idx) / len(idx) if all(m[key][i] is not None for i in idx) else None  # noqa: E731
        return {"rmse_over_crb": ratios("rmse_"), "detected_over_crb": ratios("rmse_detected_"), "f1": mean("f1"),
                "k_accuracy": mean("k_accuracy")}

    rows = []
    for row, source, nmse_name, kind in _REFERENCE_ROWS:
        if source is not None and source not in loc["covariances"] and (nmse_name is None or nmse_name not in nmse_rows):
            continue
        n = nmse_rows.get(nmse_name) if nmse_name else None
        rows.append({"row": row, "kind": kind, "nmse": 0.0 if source == "R_true" else (n["nmse"] if n else None),
                     "oracle": "R_true itself" if source == "R_true" else ORACLE.get(nmse_name, ""), **loc_part(source),
                     "skipped": None, "train_seconds": None})
    for name, run in result["runs"].items():
        n = nmse_rows.get(name)
        rows.append({"row": f"{name}: R_pred", "kind": "trained", "nmse": n["nmse"] if n else None, "oracle": _entry_oracle(result["configs"][name]),
                     **loc_part(f"{name}:R_pred"), "skipped": run["skipped_nonfinite"], "train_seconds": run["train_seconds"]})
    return rows


def _entry_oracle(cfg: dict) -> str:
    """What a trained entry knows beyond its scene's measurements (through its R_samp input)."""
    uses_rsamp = cfg["model"]["rsamp_input"] or cfg["fixes"]["beta"] > 0
    est = cfg["fixes"]["rsamp_estimator"]
    knows = oracle_knowledge(est)
    return f"{knows} ({est} R_samp)" if uses_rsamp and knows != "none" else "none"

