"""The search space of a sweep: which knobs may be searched, their ranges as Optuna distributions, and the base
config every trial starts from. Validated here, against the config, before any study exists; never runs a trial
(that is :mod:`workbench.sweep`).

Search-space file (JSON, or YAML when PyYAML is installed)::

    {"preset": "recommended",                       # optional, the base config
     "fixed": {"train.batch_size": 32},             # optional, dotted overrides not searched
     "params": {"fixes.c_eps": {"type": "float", "low": 1e-3, "high": 1.0, "log": true},
                "fixes.gap_backend": ["eigh", "exact"],       # a list is a categorical
                "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": true}}}

A mapping without ``params`` is taken as the params themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from .config import ConfigError, ExperimentConfig, FixConfig, LossWeights, preset
from .estimators import ESTIMATORS
from .spectral import GAP_BACKENDS, SUBSPACE_BACKENDS

# Knobs a space may search: every fix knob, every loss weight and the optimiser's hyperparameters.
TRAIN_KNOBS = ("lr", "weight_decay", "grad_clip", "batch_size", "schedule")
SEARCHABLE = tuple(
    [f"fixes.{f.name}" for f in dataclasses.fields(FixConfig)]
    + [f"loss.{f.name}" for f in dataclasses.fields(LossWeights)]
    + [f"train.{k}" for k in TRAIN_KNOBS]
)

DEFAULT_SPACE: dict[str, Any] = {
    "fixes.rsamp_normalise": [True, False],
    "fixes.rblend_trace_normalise": [True, False],
    "fixes.c_eps": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
    "fixes.lam_gap": {"type": "float", "low": 0.0, "high": 0.05},
    # the stochastic backend (finite_diff) is left out of the default: its backward costs two eigen-solves per direction
    "fixes.gap_backend": [name for name, b in GAP_BACKENDS.items() if not b.stochastic],
    "fixes.subspace_backend": list(SUBSPACE_BACKENDS),
    # the unstructured estimators only: the grid-scanning ones (beamscan, beamscan_est) cost seconds per batch of scenes
    "fixes.rsamp_estimator": [name for name, e in ESTIMATORS.items() if e.steering_model is None],
    "fixes.beta": {"type": "float", "low": 0.0, "high": 0.6},
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True},
    "loss.subspace": {"type": "float", "low": 0.0, "high": 0.3},
}


@dataclass(frozen=True)
class SearchSpace:
    """Validated search space: Optuna distributions per dotted config key, plus the base config.

    ``params``: {"fixes.c_eps": FloatDistribution, ...}; ``base``: the ExperimentConfig every trial starts
    from (preset + fixed overrides + command-line overrides)."""

    params: dict[str, BaseDistribution]
    base: ExperimentConfig

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Draw every parameter from ``trial``; returns {dotted key: value}."""
        out = {}
        for name, d in self.params.items():
            if isinstance(d, FloatDistribution):
                out[name] = trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
            elif isinstance(d, IntDistribution):
                out[name] = trial.suggest_int(name, d.low, d.high, log=d.log, step=d.step)
            else:
                out[name] = trial.suggest_categorical(name, d.choices)
        return out

    def config(self, values: dict[str, Any]) -> ExperimentConfig:
        """The base config with the trial's values applied (validated)."""
        return self.base.replace(**values)

    def check_point(self, values: dict[str, Any], where: str = "point") -> None:
        """ConfigError unless every knob of ``values`` is searched and its value lies inside its distribution,
        and the config accepts them all (e.g. a configuration to enqueue)."""
        for k, v in values.items():
            d = self.params.get(k)
            if d is None:
                raise ConfigError(f"{where}: knob {k!r} is not searched; searched: {', '.join(self.params)}")
            inside = v in d.choices if isinstance(d, CategoricalDistribution) else (
                isinstance(v, (int, float)) and not isinstance(v, bool) and d.low <= v <= d.high)
            if not inside:
                raise ConfigError(f"{where}: {k} = {v!r} is outside the search space ({d})")
        self.config(values)

    def to_dict(self) -> dict:
        """JSON-able form: {"params": {key: distribution JSON}, "base": config dict}."""
        return {"params": {k: json.loads(optuna.distributions.distribution_to_json(d)) for k, d in self.params.items()},
                "base": self.base.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        params = {k: optuna.distributions.json_to_distribution(json.dumps(v)) for k, v in data["params"].items()}
        return cls(params=params, base=ExperimentConfig.from_dict(data["base"]))


def read_space_file(path: str | os.PathLike) -> dict:
    """Parse a JSON (or YAML) search-space file into a plain dict; ConfigError on a missing or bad file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"space = {str(p)!r}: no such file")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ConfigError(f"space = {str(p)!r}: YAML needs PyYAML (pip install pyyaml), or write the space as JSON") from e
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"space = {str(p)!r}: cannot parse ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"space = {str(p)!r}: expected a mapping of knobs, got {type(data).__name__}")
    return data


def _distribution(key: str, spec: Any, base: ExperimentConfig) -> BaseDistribution:
    where = f"search space {key}"
    if isinstance(spec, (list, tuple)):
        spec = {"type": "categorical", "choices": list(spec)}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} = {spec!r}: expected a list of choices or a mapping with type/low/high")
    kind = spec.get("type", "categorical" if "choices" in spec else "float")
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
    if kind not in allowed:
        raise ConfigError(f"{where}: type = {kind!r} is not allowed: choose one of 'float', 'int', 'categorical'")
    extra = sorted(set(spec) - allowed[kind])
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} for type {kind!r}; allowed: {', '.join(sorted(allowed[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices = {choices!r}: expected a non-empty list")
        for c in choices:  # every value must be a valid config value
            _check_value(key, c, base)
        return CategoricalDistribution(choices)
    for k in ("low", "high"):
        if k not in spec:
            raise ConfigError(f"{where}: {kind} range needs '{k}'")
        v = spec[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}: {k} = {v!r}: expected a finite number")
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    if low > high:
        raise ConfigError(f"{where}: low = {low!r} > high = {high!r}: the range is empty")
    if log and low <= 0:
        raise ConfigError(f"{where}: low = {low!r} with log = true: a log range needs low > 0")
    if log and step is not None:
        raise ConfigError(f"{where}: step and log = true cannot be combined")
    _check_value(key, low, base)
    _check_value(key, high, base)
    if kind == "int":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: int range [{low}, {high}] needs integer bounds")
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def _check_value(key: str, value: Any, base: ExperimentConfig) -> None:
    try:
        base.replace(**{key: value})
    except ConfigError as e:
        raise ConfigError(f"search space {key}: value {value!r} is not a valid config value ({e})") from e


def load_space(space: str | os.PathLike | dict | None = None, preset_name: str = "recommended",
               overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Build and validate a :class:`SearchSpace` from a file, a dict or ``None`` (the default space).

    ``overrides`` (dotted keys) are applied to the base config after the space's ``fixed`` section. Fails
    with ConfigError on an unknown knob, a bad range, a value the config rejects or an empty space."""
    if space is None:
        data: dict = {"params": copy.deepcopy(DEFAULT_SPACE)}
    elif isinstance(space, dict):
        data = copy.deepcopy(space)
    else:
        data = read_space_file(space)
    if "params" not in data:
        data = {"params": data}
    unknown_sections = sorted(set(data) - {"preset", "fixed", "params"})
    if unknown_sections:
        raise ConfigError(f"search space: unknown section(s) {', '.join(unknown_sections)}; allowed: preset, fixed, params")
    params = data["params"]
    if not isinstance(params, dict):
        raise ConfigError(f"search space params = {params!r}: expected a mapping of knob -> range")
    if not params:
        raise ConfigError("search space is empty: give at least one knob to search, e.g. {\"fixes.c_eps\": [0.01, 1.0]}; "
                          f"searchable: {', '.join(SEARCHABLE)}")
    unknown = sorted(set(params) - set(SEARCHABLE))
    if unknown:
        raise ConfigError(f"search space: unknown knob(s) {', '.join(map(repr, unknown))}; searchable: {', '.join(SEARCHABLE)}")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"search space fixed = {fixed!r}: expected a mapping of dotted keys")
    base = preset(data.get("preset", preset_name))
    try:
        base = base.replace(**{**fixed, **(overrides or {})})  # the overrides win over the space's fixed values
    except ConfigError as e:
        raise ConfigError(f"search space base config: {e}") from e
    return SearchSpace(params={k: _distribution(k, v, base) for k, v in params.items()}, base=base)
