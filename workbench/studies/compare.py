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
from ..config import ConfigError, ExperimentConfig, resolve_device
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
from ..forward import TrainingData, rsamp_cache, split_seed
from ..physics import SceneBatch, simulate
from ..train import checks as train_checks
from .baselines import BASELINES, ORACLE, baseline_rows, beats_every_baseline, network_nmse, network_row
from .localisation import localisation_sources, localisation_vs_snr, run_oracle

DEFAULT_SNRS = (0.0, 10.0, 20.0)


def default_n_per_snr(device) -> int:
    """Localisation scenes per SNR by default: 64 on a CPU, 256 on a GPU (where the ML fit is cheap)."""
    return 256 if resolve_device(device).type == "cuda" else 64


def test_scenes(cfg: ExperimentConfig, test_seed: int | None = None, device=None) -> SceneBatch:
    """The held-out test scenes the NMSE rows are scored on: ``cfg.train.n_val`` scenes (random SNR over the system's
    range, as in training) of the "test" stream of ``test_seed`` (default ``cfg.train.seed``;
    :func:`workbench.forward.split_seed`), disjoint from the training, validation and dev scenes."""
    seed = cfg.train.seed if test_seed is None else test_seed
    dev = resolve_device(cfg.train.device if device is None else device)
    return simulate(cfg.system, cfg.train.n_val, seed=split_seed(seed, "test", 0), device=dev)


def _cached_sources(cfgs: dict[str, ExperimentConfig], data: TrainingData, test: SceneBatch, max_fit_scenes: int | None) -> dict:
    """The beamscan baselines' matrices from the scenes' R_samp caches when an entry trained on the Fix-1 beamscan
    R_samp (the same matrices as :func:`.baselines.rsamp_source`), so they are not estimated twice."""
    for cfg in cfgs.values():
        if cfg.fixes.rsamp_estimator == "beamscan" and cfg.fixes.rsamp_normalise:
            pair = (data.rsamp("train", cfg)[:max_fit_scenes], rsamp_cache(test).rsamp_of(cfg))
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
            snrs_db: Sequence[float] = DEFAULT_SNRS, n_per_snr: int | None = None, method: str = "music", blend: bool = False,
            baselines: Sequence[str] = BASELINES, max_fit_scenes: int | None = 512, reuse: bool = True, progress: bool = True,
            data: TrainingData | None = None, test_seed: int | None = None, n_boot: int = 1000) -> dict:
    """Train ``entries`` with ``overrides`` (e.g. :func:`budget_overrides`) on one set of scenes and evaluate them on the
    held-out test split.

    Training and validation scenes come from ``train.seed``; every reported number comes from the "test" stream of
    ``test_seed`` (default ``train.seed``; :func:`workbench.forward.split_seed`), which no default, preset or sweep
    touches: the NMSE rows on :func:`test_scenes` (baselines' constants fitted on the training split), the
    localisation on ``n_per_snr`` scenes per SNR (default :func:`default_n_per_snr`), per source against the CRB with
    95 % bootstrap intervals (:func:`.localisation.localisation_vs_snr`). A second ``test_seed`` re-scores the same
    trained networks on fresh scenes.

    Returns a JSON-ready dict: {"entries", "overrides", "scenes" (digest, sizes, seeds), "configs" {entry: config},
    "runs" {entry: :func:`history_summary` + "history"}, "nmse": baseline and network rows (:mod:`.baselines`, test
    split), "localisation": the localisation result, "table": :func:`results_rows`, "seconds"}."""
    overrides = dict(overrides or {})
    cfgs = entry_configs(entries, overrides)
    first = next(iter(cfgs.values()))
    system = first.system
    t0 = time.perf_counter()
    data = TrainingData.simulate(first) if data is None else data
    if data.key != TrainingData.key_of(first):
        raise ConfigError("data: the given TrainingData was simulated for another system, size or seed than the entries")
    test_seed = first.train.seed if test_seed is None else test_seed
    n_per_snr = default_n_per_snr(first.train.device) if n_per_snr is None else n_per_snr
    runs = train_entries(cfgs, data, None if out is None else Path(out), reuse, progress)
    test = test_scenes(first, test_seed, data.device)
    rows = baseline_rows(data.train, test, system, names=baselines, max_fit_scenes=max_fit_scenes,
                         sources=_cached_sources(cfgs, data, test, max_fit_scenes))
    cache = rsamp_cache(test)
    for name, run in runs.items():
        values = network_nmse(run.model, test, cache.rsamp_of(run.config), run.config, prior=cache.prior_of(run.config))
        rows.append(network_row(name, values, test.snr_db))
    sources = localisation_sources(first, ["beamscan"], physics_k="true", runs=runs, blend=blend)
    loc = localisation_vs_snr(system, list(snrs_db), n_per_snr, sources, method=method, seed=test_seed, split="test",
                              use_true_k=True, device=first.train.device, n_boot=n_boot)
    result = {
        "entries": list(cfgs), "overrides": overrides,
        "scenes": {"digest": scenes_digest(data), "n_train": len(data.train), "n_val": len(data.val), "n_test": len(test),
                   "seed": first.train.seed, "test_seed": test_seed, "split": "test", "n_per_snr": n_per_snr},
        "configs": {n: c.to_dict() for n, c in cfgs.items()},
        "runs": {n: {**history_summary(r), "history": r.history} for n, r in runs.items()},
        "nmse": rows, "localisation": loc, "seconds": time.perf_counter() - t0,
    }
    base_rows = [r for r in rows if r["predictor"] in baselines]
    result["verdicts"] = {n: beats_every_baseline([*base_rows, next(r for r in rows if r["predictor"] == n)], n) for n in runs}
    result["table"] = results_rows(result)
    return result


def summary(result: dict) -> dict:
    """The part of a :func:`compare` result that the README's tables are made from, small enough to commit under
    ``results/``: {"device", "scenes", "entries", "overrides", "seconds", "localisation": {"gate", "snr_db", "split",
    "seed", "n_per_snr"}, "table": :func:`results_rows`}."""
    loc = result["localisation"]
    return {"device": str(resolve_device(next(iter(result["configs"].values()))["train"]["device"])),
            "scenes": result["scenes"], "entries": result["entries"], "overrides": result["overrides"], "seconds": result["seconds"],
            "localisation": {k: loc[k] for k in ("gate", "snr_db", "split", "seed", "n_per_snr")}, "table": result["table"]}


# ---------------------------------------------------------------------------------------------
# The results table
_REFERENCE_ROWS = (  # (row, localisation source, NMSE row, kind)
    ("R_true (exact, noise-free)", "R_true", None, "reference"),
    ("scaled identity", None, "identity", "baseline"),
    ("beamscan R_samp (a B + c I)", "R_samp[beamscan]", "beamscan_affine", "baseline"),
    ("physics baseline: ML from snapshots (a X + c I)", "physics[ML]", "physics_affine", "baseline"),
)
def results_rows(result: dict) -> list[dict]:
    """One row per reference, baseline and trained entry, every number on the test split:
    {"row", "kind", "oracle" (what the row knows beyond y, H, the codes and, in the true-K columns, K),
    "nmse": {"value", "lo", "hi"} (mean over the test scenes, 95 % bootstrap interval; None where it does not apply),
    "localisation": {snr: {"true_k": {statistic: {"value", "lo", "hi"}}, "own_k": {...}}} at every SNR that was run
    (the statistics of :data:`workbench.metrics.STATISTICS`; None for rows without a covariance to localise from),
    "skipped", "train_seconds"}; the physics baseline's row also "penalty_scale" (the MDL penalty its NMSE counts at,
    fitted on the training scenes: :func:`.baselines.baseline_rows`)."""
    loc, nmse_rows = result["localisation"], {r["predictor"]: r for r in result["nmse"]}

    def loc_part(source: str | None) -> dict | None:
        if source is None or source not in loc["per_source"]:
            return None
        per = loc["per_source"][source]
        return {f"{s:g}": {"true_k": per["true_k"][i], "own_k": per["own_k"][i]} for i, s in enumerate(loc["snr_db"])}

    def nmse_of(name: str | None) -> dict | None:
        n = nmse_rows.get(name) if name else None
        return n.get("nmse_ci") if n else None

    rows = []
    for row, source, nmse_name, kind in _REFERENCE_ROWS:
        if source is not None and source not in loc["per_source"] and (nmse_name is None or nmse_name not in nmse_rows):
            continue
        oracle = loc["oracle"].get(source) if source in loc.get("oracle", {}) else ORACLE.get(nmse_name, "")
        rows.append({"row": row, "kind": kind, "nmse": {"value": 0.0, "lo": 0.0, "hi": 0.0} if source == "R_true" else nmse_of(nmse_name),
                     "oracle": oracle, "localisation": loc_part(source), "skipped": None, "train_seconds": None,
                     **({"penalty_scale": nmse_rows[nmse_name]["penalty_scale"]}
                        if nmse_name in nmse_rows and "penalty_scale" in nmse_rows[nmse_name] else {})})
    for name, run in result["runs"].items():
        rows.append({"row": f"{name}: R_pred", "kind": "trained", "nmse": nmse_of(name), "oracle": _entry_oracle(result["configs"][name]),
                     "localisation": loc_part(f"{name}:R_pred"), "skipped": run["skipped_nonfinite"], "train_seconds": run["train_seconds"]})
    return rows


def _entry_oracle(cfg: dict) -> str:
    """What a trained entry knows beyond its scene's measurements, H and codes (through its R_samp input)."""
    knows = run_oracle(ExperimentConfig.from_dict(cfg))
    return f"{knows} ({cfg['fixes']['rsamp_estimator']} R_samp)" if knows != "none" else "none"

