"""Did the fixes help the task? Every preset trained on the same scenes for the same budget, then held against
the honest baselines, the physics and the Cramer-Rao bound (notebooks 04 and 05, ``workbench compare``, the
README's results table).

One :class:`~workbench.train.TrainingData` is simulated for all entries (their system, scene counts and seed
must agree, or :func:`entry_configs` refuses), each entry is trained on it by :func:`workbench.train.fit` into
``out/<entry>/`` (a resumable run folder), and all are evaluated on the same held-out scenes:

* validation NMSE of R_pred on the validation split, beside the baselines of :mod:`.baselines` (constants
  fitted on the training split);
* steps skipped for a non-finite gradient, gradient norms per group per epoch, training time (the histories);
* localisation: MUSIC on each network's R_pred (and R_blend) with the true K, beside R_true, the beamscan R_samp
  and the physics baseline, at a few SNRs on scenes of their own (:func:`.localisation.localisation_vs_snr`),
  RMSE as a multiple of sqrt(CRB), F1 and the accuracy of each source's own count of K.

An entry is a preset name or a variant of one (:data:`VARIANTS`). A budget (:data:`BUDGETS`) is a set of dotted
overrides applied to every entry. Data in, rows out: the command line writes the files; nothing here draws.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..checkpoints import RunFolder, TrainResult, load_checkpoint
from ..config import PRESETS, ConfigError, ExperimentConfig, check_choice, preset
from ..train import TrainingData, fit
from ..train import checks as train_checks
from .baselines import BASELINES, ORACLE, baseline_rows, beats_every_baseline, network_nmse, network_row
from .localisation import localisation_sources, localisation_vs_snr

# preset variants: a measurements-only network whose head builds R_pred from the physics baseline's source fits
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "physics_head": ("recommended", {"model.head": "physics", "model.rsamp_input": False, "fixes.rsamp_estimator": "seed"}),
}
ENTRIES = (*PRESETS, *VARIANTS)
DEFAULT_ENTRIES = PRESETS
_SMALL_NET = {"model.width": 32, "model.heads": 4, "model.layers": 1}
BUDGETS: dict[str, dict[str, Any]] = {
    # a few seconds: tests and CI
    "tiny": {"system.N_H": 4, "system.N_V": 4, "system.M": 8, "system.L": 8, "system.K_max": 2, "train.n_train": 16,
             "train.n_val": 8, "train.epochs": 2, "train.batch_size": 8, "model.width": 16, "model.heads": 2, "model.layers": 1},
    # about a minute on 2 CPU cores for the five presets: notebook 04's default
    "quick": {"system.N_H": 8, "system.N_V": 8, "train.n_train": 128, "train.n_val": 64, "train.epochs": 3, "train.batch_size": 32,
              **_SMALL_NET},
    # the README's results table: the default system and network (tens of minutes on 2 CPU cores)
    "standard": {"train.n_train": 2048, "train.n_val": 256, "train.epochs": 4},
}
LOCALISATION_SEED_OFFSET = 2_000_003  # the localisation scenes' seeds, apart from the training and validation seeds
SCENE_KEYS = ("system", "n_train", "n_val", "seed")


def entry_config(name: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The config of one entry: a preset, or a :data:`VARIANTS` entry (its preset plus its overrides), then ``overrides``."""
    check_choice("entry", name, ENTRIES)
    base, extra = VARIANTS.get(name, (name, {}))
    return preset(base, **{**extra, **(overrides or {})})


def entry_configs(entries: Sequence[str], overrides: dict[str, Any] | None = None) -> dict[str, ExperimentConfig]:
    """{entry: config}; ConfigError unless every entry trains on the same scenes (system, n_train, n_val, seed)."""
    if not entries:
        raise ConfigError(f"entries: expected at least one of {', '.join(ENTRIES)}")
    dup = sorted({e for e in entries if list(entries).count(e) > 1})
    if dup:
        raise ConfigError(f"entries: {', '.join(dup)} given twice")
    cfgs = {e: entry_config(e, overrides) for e in entries}
    first, ref = next(iter(cfgs.items()))
    for name, cfg in cfgs.items():
        if TrainingData.key_of(cfg) != TrainingData.key_of(ref):
            raise ConfigError(f"entries {first} and {name} would train on different scenes (their system, train.n_train, train.n_val, "
                              "train.seed or train.device differ): a comparison needs the same scenes")
    return cfgs


def budget_overrides(budget: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dotted overrides of a named budget with ``extra`` on top."""
    check_choice("budget", budget, tuple(BUDGETS))
    return {**BUDGETS[budget], **(extra or {})}


def scenes_digest(data: TrainingData) -> str:
    """A short digest of the training and validation scenes' measurements (what every entry trained on)."""
    h = hashlib.blake2b(digest_size=8)
    for b in (data.train, data.val):
        for t in (b.y, b.H, b.codes):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
def _finished_run(folder: Path, cfg: ExperimentConfig) -> TrainResult | None:
    """The run saved in ``folder`` when it is a complete run of exactly ``cfg``, else None."""
    if not (folder / "checkpoint.pt").exists():
        return None
    try:
        saved = RunFolder(folder).config()
    except ConfigError:
        return None
    run = load_checkpoint(folder / "checkpoint.pt") if saved.to_dict() == cfg.to_dict() else None
    return run if run is not None and len(run.history) == cfg.train.epochs else None


def train_entries(cfgs: dict[str, ExperimentConfig], data: TrainingData, out: Path | None = None, reuse: bool = True,
                  progress: bool = True, on_entry=None) -> dict[str, TrainResult]:
    """Train every entry on ``data`` (one after the other, each from its own seeded initialisation), into
    ``out/<entry>/`` when ``out`` is given. ``reuse``: an entry whose folder already holds a complete run of
    exactly its config is loaded instead of trained (notebook 05 reuses notebook 04's runs this way).
    ``on_entry(name, index, total)`` is called before each entry (progress in panels)."""
    runs = {}
    for i, (name, cfg) in enumerate(cfgs.items()):
        if on_entry is not None:
            on_entry(name, i, len(cfgs))
        folder = None if out is None else Path(out) / name
        run = _finished_run(folder, cfg) if folder is not None and reuse else None
        reused = run is not None
        if run is None:
            if progress:
                tqdm.write(f"training {name} ({i + 1}/{len(cfgs)})")
            run = fit(cfg, data=data, progress=progress, run_dir=folder)
        run.extra["reused"] = reused
        runs[name] = run
    return runs


def _cached_sources(cfgs: dict[str, ExperimentConfig], data: TrainingData, max_fit_scenes: int | None) -> dict:
    """The beamscan baselines' matrices from ``data``'s R_samp cache when an entry trained on the Fix-1 beamscan
    R_samp (the same matrices as :func:`.baselines.beamscan_source`), so they are not estimated twice."""
    for cfg in cfgs.values():
        if cfg.fixes.rsamp_estimator == "beamscan" and cfg.fixes.rsamp_normalise:
            pair = (data.rsamp("train", cfg)[:max_fit_scenes], data.rsamp("val", cfg))
            return {"beamscan_scaled": pair, "beamscan_affine": pair}
    return {}


def history_summary(run: TrainResult) -> dict:
    """What a row needs from a run's history: steps, skipped steps, training seconds, the last epoch's numbers."""
    h = run.history
    return {"reused": bool(run.extra.get("reused")), "epochs": len(h), "steps": sum(r["steps"] for r in h),
            "skipped_nonfinite": sum(r["skipped_nonfinite"] for r in h),
            "train_seconds": sum(r["seconds"] for r in h), "final_val_nmse": h[-1]["val_nmse"] if h else None,
            "grad_norm": h[-1]["grad_norm"] if h else {}, "provenance": sorted({f"{p['term']}:{p['op']}" for p in run.provenance})}


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


def training_conclusion(rows: list[dict]) -> str:
    """Markdown bullets from :func:`training_rows`: who passed all four checks, who skipped steps (and where the
    NaN came from), and the ranking by validation NMSE."""
    checks = ("loss finite and in range", "gradients finite", "training loss decreasing", "weights changing")
    passed = [r["preset"] for r in rows if all(r[c] for c in checks)]
    failed = {r["preset"]: [c for c in checks if not r[c]] for r in rows if r["preset"] not in passed}
    lines = [f"- All four checks of the seed note passed: {', '.join(passed) if passed else 'no run'}."]
    lines += [f"- {name} failed: {', '.join(cs)}." for name, cs in failed.items()]
    for r in rows:
        if r["skipped steps"]:
            lines.append(f"- {r['preset']}: {r['skipped steps']} steps skipped for a non-finite gradient (from {r['NaN source']}).")
    ranked = sorted((r for r in rows if r["final val NMSE"] is not None), key=lambda r: r["final val NMSE"])
    if ranked:
        lines.append("- Validation NMSE after training, best first: " + ", ".join(f"{r['preset']} {_f(r['final val NMSE'])}" for r in ranked)
                     + " (1 is what R_pred = 0 scores; a scaled identity scores about 1 - N/‖R_true‖² in trace-N units).")
    return "\n".join(lines)


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
        values = network_nmse(run.model, data.val, data.rsamp("val", run.config), run.config)
        rows.append(network_row(name, values, data.val.snr_db))
    sources = localisation_sources(first, ["beamscan"], physics_k="true", runs=runs, blend=blend)
    loc = localisation_vs_snr(system, list(snrs_db), n_per_snr, sources, method=method,
                              seed=first.train.seed + LOCALISATION_SEED_OFFSET, use_true_k=True)
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
    if uses_rsamp and est in ("beamscan", "covariance_matching"):
        return f"true noise variance ({est} R_samp)"
    return "none"


def _f(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def format_table(rows: list[dict]) -> str:
    """The results rows as a markdown table (RMSE / sqrt(CRB) as phi / theta / r per SNR)."""
    snrs = next((list(r["rmse_over_crb"]) for r in rows if r["rmse_over_crb"]), [])
    head = ["predictor", "val NMSE", *[f"RMSE/√CRB φ/θ/r @ {s} dB" for s in snrs], "F1", "K acc.", "skipped", "train s", "oracle knowledge"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        loc = [("/".join(_f(r["rmse_over_crb"][s][c], 2) for c in ("phi", "theta", "r")) if r["rmse_over_crb"] else "-") for s in snrs]
        lines.append("| " + " | ".join([r["row"], _f(r["nmse"]), *loc, _f(r["f1"], 2), _f(r["k_accuracy"], 2), _f(r["skipped"]),
                                        _f(r["train_seconds"], 3), r["oracle"]]) + " |")
    return "\n".join(lines)


def conclusion(result: dict) -> str:
    """Markdown bullets from this run's numbers: which entries skipped steps, the best trained NMSE against the best
    baseline, and how far MUSIC on each R_pred is from the bound at the highest SNR run."""
    rows = result["table"]
    trained = [r for r in rows if r["kind"] == "trained"]
    base = [r for r in rows if r["kind"] == "baseline" and r["nmse"] is not None]
    lines = []
    skipped = [f"{r['row'].split(':')[0]} ({r['skipped']} steps)" for r in trained if r["skipped"]]
    lines.append(f"- Steps skipped for a non-finite gradient: {', '.join(skipped) if skipped else 'none, under every entry'}.")
    if trained and base:
        best_t = min(trained, key=lambda r: r["nmse"] if r["nmse"] is not None else math.inf)
        best_b = min(base, key=lambda r: r["nmse"])
        verdict = "beats" if best_t["nmse"] is not None and best_t["nmse"] < best_b["nmse"] else "does not beat"
        lines.append(f"- Best trained validation NMSE: {best_t['row']} {_f(best_t['nmse'])}; best baseline: {best_b['row']} "
                     f"{_f(best_b['nmse'])} (constants fitted on the training scenes). The network {verdict} it.")
        for name, v in result.get("verdicts", {}).items():
            bands = [b for b in v["by_snr"] if b is not None]
            if bands:
                lines.append(f"- {name}: below every baseline in {sum(bands)} of {len(bands)} SNR bands "
                             f"(smallest margin {_f(v['margin'])} NMSE).")
    snrs = next((list(r["rmse_over_crb"]) for r in rows if r["rmse_over_crb"]), [])
    if snrs:
        s = snrs[-1]
        parts = [f"{r['row']} {_f(r['rmse_over_crb'][s]['phi'], 2)}" for r in rows if r["rmse_over_crb"]]
        lines.append(f"- MUSIC φ RMSE over sqrt(CRB) at {s} dB (1 = the bound; true K): " + "; ".join(parts) + ".")
        found = [f"{r['row']} {_f(r['detected_over_crb'][s]['phi'], 2)} / {_f(r['detected_over_crb'][s]['theta'], 2)}"
                 for r in rows if r["detected_over_crb"] and r["kind"] != "reference"]
        if found:
            lines.append("- The same over the detected sources only (φ / θ, the spread of the sources found): " + "; ".join(found) + ".")
    return "\n".join(lines)
