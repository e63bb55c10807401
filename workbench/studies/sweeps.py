"""Notebook 06: what an Optuna study says, as plain rows (:mod:`workbench.figures.sweeps` draws them and puts them in words).

Every finished trial has one outcome (:data:`OUTCOMES`): it completed, was pruned by the pruner, was pruned
because a training step was non-finite (its NaN provenance is kept), or failed.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.trial import TrialState

from .. import sweep

OUTCOMES = ("complete", "pruned", "nonfinite", "failed")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def trial_outcome(t: optuna.trial.FrozenTrial) -> str:
    """One of :data:`OUTCOMES` for a finished trial."""
    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state == TrialState.FAIL:
        return "failed"
    return "nonfinite" if t.user_attrs.get("pruned_reason") == "nonfinite" else "pruned"


def sweep_metrics(study) -> dict:
    """What a finished sweep says, as plain JSON: {"study", "states": {TrialState name: count over every
    trial}, "progress": :func:`workbench.sweep.progress_counts`, "best": {"number", "value", "params"} or
    None (lowest val_nmse over COMPLETE trials), "nonfinite": one row per trial pruned for a non-finite step
    {"number", "params", "nonfinite_steps", "provenance_count", "ops": sorted "term:op" strings, "provenance"},
    "outcome_fractions": :func:`outcome_fractions`}."""
    trials = study.get_trials(deepcopy=False)
    nonfinite = []
    for t in trials:
        if t.user_attrs.get("pruned_reason") == "nonfinite":
            prov = t.user_attrs.get("provenance", [])
            nonfinite.append({"number": t.number, "params": dict(t.params), "nonfinite_steps": t.user_attrs.get("nonfinite_steps", 0),
                              "provenance_count": t.user_attrs.get("provenance_count", len(prov)),
                              "ops": sorted({f"{p.get('term')}:{p.get('op')}" for p in prov}), "provenance": prov})
    summary = sweep.summarize(study)
    return {"study": study.study_name, "states": {s.name: sum(t.state == s for t in trials) for s in TrialState},
            "progress": summary["counts"], "best": summary["best"], "nonfinite": nonfinite,
            "outcome_fractions": outcome_fractions(study)}


def varying_params(study) -> list[str]:
    """Knobs that take more than one value among the COMPLETE trials (the only ones an importance can rank)."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    names = sorted({k for t in done for k in t.params})
    return [n for n in names if len({repr(t.params.get(n)) for t in done}) > 1]


def sweep_importances(study) -> tuple[dict[str, float] | None, str]:
    """Importances of the varying knobs for val_nmse (Optuna's default evaluator, PED-ANOVA: deterministic,
    no scikit-learn), or (None, why not): it needs at least two
    COMPLETE trials and a knob that varies among them. Returns ({knob: importance in [0, 1]}, note)."""
    n = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    if n < 2:
        return None, f"parameter importances need at least 2 completed trials; this study has {n}: run more trials"
    names = varying_params(study)
    if not names:
        return None, f"no knob varies among the {n} completed trials: importances are undefined; run more trials"
    imp = optuna.importance.get_param_importances(study, params=names)
    return {k: float(v) for k, v in imp.items()}, f"PED-ANOVA over {n} completed trials, {len(names)} varying knob(s)"


def parallel_rows(study) -> list[dict]:
    """One row per finished trial (COMPLETE, PRUNED, FAIL): {"number", "outcome" (one of OUTCOMES), "value"
    (the final val_nmse, or the last one reported before it stopped; None when none was), "params"}."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in FINISHED:
            continue
        value = t.value if t.state == TrialState.COMPLETE else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"number": t.number, "outcome": trial_outcome(t), "value": value, "params": dict(t.params)})
    return rows


SMALL_N = 3  # groups with fewer trials than this get a caveat


def outcome_fractions(study: optuna.Study, bins: int = 3) -> list[dict]:
    """Per knob and value, the fraction of finished trials that completed, were pruned by the pruner, were
    non-finite, or failed. Numeric knobs are cut into ``bins`` quantile bins. Rows: {"param", "value", "n",
    "complete", "pruned", "nonfinite", "failed" (fractions in [0, 1]), "paired_with" (other categorical knobs
    that took one value in every trial of this group while taking several in the study: the group's outcome
    cannot be told apart from theirs), "caveat" (why the fractions should not be read alone, or "")}."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    names = sorted({k for t in finished for k in t.params})
    rows = []
    for name in names:
        ts = [t for t in finished if name in t.params]
        values = [t.params[name] for t in ts]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(set(values)) > bins
        if numeric:
            edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
            idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
            labels = [f"[{edges[i]:.3g}, {edges[i + 1]:.3g}]" for i in idx]
        else:
            labels = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in values]
        for label in sorted(set(labels), key=lambda x: (len(x), x)):
            group = [t for t, lab in zip(ts, labels) if lab == label]
            n = len(group)
            kind = [trial_outcome(t) for t in group]
            paired = _paired(name, group, finished)
            caveat = "; ".join(([f"only {n} trial{'s' * (n > 1)}"] if n < SMALL_N else [])
                               + ([f"always with {', '.join(paired)}"] if paired else []))
            rows.append({"param": name, "value": label, "n": n, **{k: kind.count(k) / n for k in OUTCOMES}, "paired_with": paired,
                         "caveat": caveat})
    return rows


def _paired(name: str, group: list, finished: list) -> list[str]:
    """Other categorical knobs constant over ``group`` but varying over ``finished``, as "knob=value"."""
    out = []
    for other in sorted({k for t in finished for k in t.params} - {name}):
        values = {repr(t.params.get(other)) for t in group}
        numeric = all(isinstance(t.params.get(other), (int, float)) and not isinstance(t.params.get(other), bool) for t in finished)
        if len(values) == 1 and not numeric and len({repr(t.params.get(other)) for t in finished}) > 1:
            out.append(f"{other}={group[0].params.get(other)}")
    return out
