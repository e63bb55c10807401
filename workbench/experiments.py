"""Training several configurations on the same scenes: the entries (presets and their :data:`VARIANTS`), the budgets,
and :func:`train_entries`, which trains (or reuses) one run folder per entry. Notebooks 04 and 05, ``workbench compare``
(:mod:`workbench.studies.compare`) and the benchmarks train their networks through it.

Owns: what an entry and a budget are, that the entries of one comparison see the same scenes (:func:`entry_configs`),
when a saved run may be reused (:func:`_finished_run`) and what a row needs from a run's history (:func:`history_summary`).
Must not: evaluate or score the runs (:mod:`workbench.studies.compare` does), write anything but the run folders
(:func:`workbench.train.fit` writes them), or draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .checkpoints import RunFolder, TrainResult, load_checkpoint
from .config import PRESETS, ConfigError, ExperimentConfig, check_choice, preset
from .forward import TrainingData
from .train import fit

# preset variants: a measurements-only network whose head builds R_pred from the physics baseline's source fits
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "physics_head": ("recommended", {"model.head": "physics", "model.rsamp_input": False, "fixes.rsamp_estimator": "seed"}),
    # the learned localiser (workbench/detector.py): a heatmap over the search grid trained with the detection loss alone,
    # refined by a few likelihood steps; R_samp ("seed": no oracle) only feeds the pipeline's reported terms
    "localiser": ("recommended", {"model.head": "detector", "model.rsamp_input": False, "fixes.rsamp_estimator": "seed",
                                  "loss.detect": 1.0, "loss.nmse": 0.0, "loss.k_ce": 0.0, "loss.aux": 0.0, "loss.subspace": 0.0,
                                  "fixes.lam_gap": 0.0, "model.width": 32, "model.layers": 4,
                                  # decoding, chosen on the dev split (README, "The learned localiser")
                                  "model.detector_threshold": 0.25, "model.detector_min_snr_db": 6.0, "model.detector_rounds": 3,
                                  "model.detector_count": "mdl", "model.detector_relax": 1,
                                  "model.detector_round_picks": "network+likelihood"}),
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


def history_summary(run: TrainResult) -> dict:
    """What a row needs from a run's history: steps, skipped steps, training seconds, the last epoch's numbers."""
    h = run.history
    return {"reused": bool(run.extra.get("reused")), "epochs": len(h), "steps": sum(r["steps"] for r in h),
            "skipped_nonfinite": sum(r["skipped_nonfinite"] for r in h),
            "train_seconds": sum(r["seconds"] for r in h), "final_val_nmse": h[-1]["val_nmse"] if h else None,
            "grad_norm": h[-1]["grad_norm"] if h else {}, "provenance": sorted({f"{p['term']}:{p['op']}" for p in run.provenance})}
