"""Notebook parameters: one validated dataclass per notebook, mirroring the notebook's ``parameters`` cell.

Owns: the names, types, defaults and CI values of every notebook's parameters and how they become an
:class:`~workbench.config.ExperimentConfig`. Must not: hold widgets (that is :mod:`workbench.ui`), compute or
draw. :mod:`workbench.report` imports this module and never ipywidgets.

The rule for a notebook's fields:

* a **config knob** (C_EPS, beta, a backend, a loss weight, ...) is an optional override of the chosen preset:
  its default ``None`` means "the preset's value". :data:`CONFIG_KEYS` maps it to its dotted config key and
  :mod:`workbench.config` validates it, so no range is declared twice;
* a **size** (RIS side, network width, scenes, epochs) always applies, so that notebooks run in seconds;
* everything else (the preset, a scene index, a seed, ``out_dir``) is the notebook's own;
* ``data`` (every notebook): None, or a dataset folder made by ``workbench data generate`` / ``workbench data import``
  (relative paths are under :func:`project_root`). Given, the notebook's scenes come from it (through
  :func:`workbench.data.load_dataset` / :meth:`workbench.forward.TrainingData.from_dataset`) and its system (N_H,
  N_V, L, M, K_max, ...) replaces the notebook's sizes (``N_side`` is then ignored). It is validated before
  anything else: a missing folder, or one that is not a dataset, fails naming ``<notebook>.data``.

The config cell of a notebook is ``params = wp.from_cell("<name>", globals())``: it reads the parameters cell's
variables by the dataclass's field names, so each parameter is written twice (the cell and the field), and
``tests/test_params.py`` checks that the two agree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .config import PRESETS, SAMPLE_ESTIMATORS, ConfigBase, ConfigError, ExperimentConfig, check_choice, preset

# notebook field -> dotted config key(s); knobs (default None) and sizes (always applied)
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "c_eps": ("fixes.c_eps",),
    "beta": ("fixes.beta",),
    "estimator": ("fixes.rsamp_estimator",),
    "lam_gap": ("fixes.lam_gap",),
    "gap_backend": ("fixes.gap_backend",),
    "subspace_backend": ("fixes.subspace_backend",),
    "subspace_weight": ("loss.subspace",),
    "lr": ("train.lr",),
    "epochs": ("train.epochs",),
    "n_train": ("train.n_train",),
    "n_val": ("train.n_val",),
    "batch_size": ("train.batch_size",),
    "width": ("model.width",),
    "N_side": ("system.N_H", "system.N_V"),
    "seed": ("train.seed",),
}


def project_root() -> Path:
    """The folder that relative ``out_dir`` values are taken from: the checkout holding the ``notebooks/`` and
    ``runs/`` folders (so a notebook run from JupyterLab, whose working folder is ``notebooks/``, writes under
    the checkout's ``runs/``), else the current working folder (an installed package). ``WORKBENCH_ROOT``
    overrides both."""
    if os.environ.get("WORKBENCH_ROOT"):
        return Path(os.environ["WORKBENCH_ROOT"]).resolve()
    here = Path(__file__).resolve().parent.parent
    return here if (here / "notebooks").is_dir() and (here / "pyproject.toml").is_file() else Path.cwd()


def _rng(lo=None, hi=None) -> dict:
    return {"range": (lo, hi)}


def heads_for(width: int) -> int:
    """Attention heads for a notebook's small network: 4 when ``width`` allows it, else 1."""
    return 4 if width % 4 == 0 else 1


def _names(where: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in allowed for n in names):
        raise ConfigError(f"{where} = {text!r}: expected comma-separated names from {', '.join(allowed)}")
    return names


def _floats(where: str, text: str, lo: float, hi: float) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or any(not lo <= v <= hi for v in values):
        raise ConfigError(f"{where} = {text!r}: expected comma-separated numbers within [{lo:g}, {hi:g}], e.g. '1e-4,1e-2,1'")
    return values


# ---------------------------------------------------------------------------------------------
@dataclass
class NotebookParams(ConfigBase):
    """Base: the config a notebook's parameters describe. Subclasses declare the fields of their parameters
    cell; ``ci`` holds the small values CI and the tests use; ``fixed`` holds config values the notebook always
    sets (e.g. a one-layer network)."""

    _section: ClassVar[str] = "notebook"
    ci: ClassVar[dict[str, Any]] = {}
    fixed: ClassVar[dict[str, Any]] = {}

    def _check_relations(self) -> None:
        self.data_system  # noqa: B018 - validates ``data`` first (exists, is a dataset, has the truth)
        for name in self.preset_names:
            self.experiment(name)  # every knob and size, validated by the config itself

    @property
    def data_path(self) -> Path | None:
        """``data`` as an absolute folder (relative values are under :func:`project_root`), or None."""
        if self.data is None or self.data == "":
            return None
        return Path(self.data) if os.path.isabs(self.data) else project_root() / self.data

    @property
    def data_system(self):
        """The :class:`~workbench.config.SystemConfig` of the dataset ``data`` (None without one). A folder that does
        not exist, is not a dataset, is altered, or has no truth fails with a ConfigError naming ``<notebook>.data``
        (every notebook measures against R_true, the truth's covariance)."""
        path = self.data_path
        if path is None:
            return None
        from .data import dataset_system
        from .scenes_io import dataset_truth

        where = f"{self._section}.data = {self.data!r}"
        try:
            system = dataset_system(path)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}; expected None or a dataset folder made by `workbench data generate` or "
                              "`workbench data import`") from None
        if not dataset_truth(path):
            raise ConfigError(f"{where}: the dataset has no truth (K, phi, theta, r, power, noise_var); this notebook measures "
                              "against R_true, which needs it")
        return system

    @property
    def out_path(self) -> Path:
        """``out_dir`` as an absolute folder (relative values are under :func:`project_root`), created."""
        path = Path(self.out_dir) if os.path.isabs(self.out_dir) else project_root() / self.out_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def preset_names(self) -> list[str]:
        """The presets this notebook runs: ``presets`` (a comma-separated list) or ``preset``."""
        if hasattr(self, "presets"):
            return _names(f"{self._section}.presets", self.presets, PRESETS)
        return [getattr(self, "preset", "recommended")]

    def overrides(self) -> dict[str, tuple[str, ...] | Any]:
        """{notebook field: value} of every field that sets the config (knobs that are not None, and sizes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in CONFIG_KEYS and getattr(self, f.name) is not None}

    def _changes(self) -> dict[str, dict[str, Any]]:
        """{notebook field: {dotted config key: value}} for every field that sets the config."""
        out = {}
        for fname, value in self.overrides().items():
            out[fname] = dict.fromkeys(CONFIG_KEYS[fname], value)
            if fname == "width":
                out[fname]["model.heads"] = heads_for(value)
        system = self.data_system
        if system is not None:  # the dataset's system replaces the notebook's sizes (applied last)
            out["data"] = {f"system.{k}": v for k, v in system.to_dict().items()}
        return out

    def dotted_overrides(self) -> dict[str, Any]:
        """Everything this notebook sets on top of a preset, as dotted config keys (``fixed`` included)."""
        out = dict(self.fixed)
        for changes in self._changes().values():
            out.update(changes)
        return out

    def experiment(self, name: str | None = None) -> ExperimentConfig:
        """The preset ``name`` (default: the first of :attr:`preset_names`) with this notebook's fixed values,
        sizes and knob overrides. A value the config refuses fails naming the notebook field."""
        name = name or self.preset_names[0]
        check_choice(f"{self._section}.preset", name, PRESETS)
        cfg = preset(name, **self.fixed)
        for fname, changes in self._changes().items():
            try:
                cfg = cfg.replace(**changes)
            except ConfigError as e:
                raise ConfigError(f"{self._section}.{fname}: {e}") from None
        return cfg


@dataclass
class NormalisationParams(NotebookParams):
    _section: ClassVar[str] = "01_covariance_normalisation"
    ci: ClassVar[dict[str, Any]] = {"n_scenes": 8, "n_grad": 4, "width": 16, "presets": "seed_before,seed_fix1,seed_fix2"}

    presets: str = "seed_before,seed_fix1,seed_fix2,seed_fix3,recommended"
    n_scenes: int = field(default=32, metadata=_rng(1, 100_000))
    n_grad: int = field(default=8, metadata=_rng(1, 100_000))
    width: int = field(default=64, metadata=_rng(8, 8192))
    N_side: int = field(default=12, metadata=_rng(3, 64))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    data: str | None = None
    out_dir: str = "runs/01_covariance_normalisation"


@dataclass
class SpectrumParams(NotebookParams):
    _section: ClassVar[str] = "02_eigen_spectrum"
    ci: ClassVar[dict[str, Any]] = {"n_scenes": 4, "width": 16, "c_eps_sweep": "0.0001,0.01,1"}

    preset: str = "seed_fix2"
    c_eps: float | None = None
    beta: float | None = None
    estimator: str | None = None
    n_scenes: int = field(default=16, metadata=_rng(1, 100_000))
    scene: int = field(default=0, metadata=_rng(0, None))
    c_eps_sweep: str = "0.0001,0.001,0.01,0.1,1,10"
    width: int = field(default=64, metadata=_rng(8, 8192))
    N_side: int = field(default=12, metadata=_rng(3, 64))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    data: str | None = None
    out_dir: str = "runs/02_eigen_spectrum"

    def _check_relations(self) -> None:
        if self.scene >= self.n_scenes:
            raise ConfigError(f"{self._section}.scene = {self.scene} must be < n_scenes = {self.n_scenes}")
        self.c_eps_values  # noqa: B018 - validates
        super()._check_relations()

    @property
    def c_eps_values(self) -> list[float]:
        return _floats(f"{self._section}.c_eps_sweep", self.c_eps_sweep, 0.0, 1e6)


@dataclass
class GradientParams(NotebookParams):
    _section: ClassVar[str] = "03_nan_gradients"
    ci: ClassVar[dict[str, Any]] = {"n_scenes": 2, "width": 16, "N_side": 6}
    fixed: ClassVar[dict[str, Any]] = {"model.layers": 1}

    preset: str = "seed_fix2"
    lam_gap: float | None = None
    subspace_weight: float | None = 0.1
    c_eps: float | None = None
    gap_backend: str | None = None
    subspace_backend: str | None = None
    n_scenes: int = field(default=8, metadata=_rng(1, 100_000))
    N_side: int = field(default=12, metadata=_rng(3, 64))
    width: int = field(default=64, metadata=_rng(8, 8192))
    fd_step: float = field(default=1e-6, metadata=_rng(1e-12, 1e-2))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    data: str | None = None
    out_dir: str = "runs/03_nan_gradients"


@dataclass
class TrainingParams(NotebookParams):
    """04: every preset trained on the same scenes for the same budget (:func:`workbench.experiments.train_entries`).
    The defaults equal ``workbench compare --budget quick``; the run folders land in ``out_dir/<preset>/``."""

    _section: ClassVar[str] = "04_training"
    ci: ClassVar[dict[str, Any]] = {"presets": "seed_fix2,recommended", "epochs": 2, "n_train": 16, "n_val": 8, "batch_size": 8,
                                    "width": 16, "N_side": 6}
    fixed: ClassVar[dict[str, Any]] = {"model.layers": 1, "train.device": "auto"}

    presets: str = "seed_before,seed_fix1,seed_fix2,seed_fix3,recommended"
    epochs: int = field(default=3, metadata=_rng(1, 100_000))
    n_train: int = field(default=128, metadata=_rng(1, 10_000_000))
    n_val: int = field(default=64, metadata=_rng(1, 10_000_000))
    batch_size: int = field(default=32, metadata=_rng(1, 65_536))
    lr: float | None = None
    subspace_weight: float | None = None
    width: int = field(default=32, metadata=_rng(8, 8192))
    N_side: int = field(default=8, metadata=_rng(3, 64))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    data: str | None = None
    out_dir: str = "runs/04_training"


@dataclass
class LocalisationParams(NotebookParams):
    """05: localisation from R_true, the R_samp estimators, the physics baseline, every preset's trained network and the
    learned localiser (``localiser``: trained here with the same sizes as the networks, or loaded from ``localiser_run``,
    a run folder of the ``localiser`` entry trained with a bigger budget). The networks are trained as in notebook 04
    (same fields and defaults, but three of its five presets by default) into ``models_dir``, or reused from it when a
    complete run of exactly that config is there (:func:`workbench.experiments.train_entries`). With ``data`` the
    networks train on the dataset's scenes (never reused: a saved run records its config, not its scenes) into
    ``out_dir/models`` unless ``models_dir`` names a folder; the localisation scenes are simulated with the dataset's
    system (the SNR sweep needs scenes at each SNR)."""

    _section: ClassVar[str] = "05_localisation"
    ci: ClassVar[dict[str, Any]] = {"n_per_snr": 2, "snrs_db": "0,20", "estimators": "beamscan", "presets": "seed_fix2,recommended",
                                    "epochs": 2, "n_train": 16, "n_val": 8, "batch_size": 8, "width": 16, "N_side": 6}
    fixed: ClassVar[dict[str, Any]] = {"model.layers": 1, "train.device": "auto"}

    method: str = field(default="music", metadata={"choices": ("music", "mvdr")})
    snrs_db: str = "0,10,20"
    n_per_snr: int = field(default=8, metadata=_rng(1, 100_000))
    estimators: str = "seed,beamscan"
    physics_baseline: bool = True
    use_true_k: bool = True
    presets: str = "seed_before,seed_fix3,recommended"  # three of 04's five: before any fix, all seed fixes, the recommendation
    localiser: bool = True
    localiser_run: str = ""
    blend: bool = False
    spectrum_of: str = ""
    scene: int = field(default=0, metadata=_rng(0, None))
    models_dir: str = ""
    epochs: int = field(default=3, metadata=_rng(1, 100_000))
    n_train: int = field(default=128, metadata=_rng(1, 10_000_000))
    n_val: int = field(default=64, metadata=_rng(1, 10_000_000))
    batch_size: int = field(default=32, metadata=_rng(1, 65_536))
    width: int = field(default=32, metadata=_rng(8, 8192))
    N_side: int = field(default=8, metadata=_rng(3, 64))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    data: str | None = None
    out_dir: str = "runs/05_localisation"

    def _check_relations(self) -> None:
        self.snr_values  # noqa: B018 - validates
        self.estimator_names  # noqa: B018
        if self.scene >= self.n_per_snr:
            raise ConfigError(f"{self._section}.scene = {self.scene} must be < n_per_snr = {self.n_per_snr}")
        if self.localiser_path is not None and not (self.localiser_path / "checkpoint.pt").is_file():
            raise ConfigError(f"{self._section}.localiser_run = {self.localiser_run!r}: no checkpoint.pt there; give a run folder "
                              "of the localiser entry (workbench compare --presets localiser --out DIR writes DIR/localiser) or ''")
        if self.spectrum_of and self.spectrum_of not in self.source_names:
            raise ConfigError(f"{self._section}.spectrum_of = {self.spectrum_of!r}: expected '' or one of the sources this run "
                              f"localises from: {', '.join(self.source_names)}")
        super()._check_relations()

    @property
    def snr_values(self) -> list[float]:
        return _floats(f"{self._section}.snrs_db", self.snrs_db, -60.0, 100.0)

    @property
    def estimator_names(self) -> list[str]:
        return _names(f"{self._section}.estimators", self.estimators, SAMPLE_ESTIMATORS)

    @property
    def source_names(self) -> list[str]:
        """Every covariance source this run localises from (:func:`workbench.studies.localisation.localisation_sources`)."""
        names = ["R_true", *(f"R_samp[{e}]" for e in self.estimator_names), *(["physics[ML]"] if self.physics_baseline else [])]
        for p in self.preset_names:
            names += [f"{p}:R_pred", *([f"{p}:R_blend"] if self.blend else [])]
        if self.localiser:
            names += ["localiser:R_pred", *(["localiser:R_blend"] if self.blend else [])]
        return names

    @property
    def entry_names(self) -> list[str]:
        """The entries trained (or reused) here: the presets, and the learned localiser (the ``localiser`` entry of
        :data:`workbench.experiments.VARIANTS`) when ``localiser`` is on and no ``localiser_run`` is given."""
        return [*self.preset_names, *(["localiser"] if self.localiser and not self.localiser_run else [])]

    @property
    def localiser_path(self) -> Path | None:
        """``localiser_run`` as an absolute run folder (relative: under :func:`project_root`), or None for ""."""
        if not self.localiser_run:
            return None
        return Path(self.localiser_run) if os.path.isabs(self.localiser_run) else project_root() / self.localiser_run

    @property
    def spectrum_source(self) -> str:
        """``spectrum_of``, or for "" the last preset's R_pred."""
        return self.spectrum_of or f"{self.preset_names[-1]}:R_pred"

    @property
    def models_path(self) -> Path:
        """``models_dir`` as an absolute folder: "" is notebook 04's output folder beside ``out_dir`` (so a report
        or a lab session reuses what 04 trained), or ``out_dir/models`` with ``data``; relative values are under
        :func:`project_root`."""
        if not self.models_dir:
            return self.out_path / "models" if self.data_path is not None else self.out_path.parent / "04_training"
        return Path(self.models_dir) if os.path.isabs(self.models_dir) else project_root() / self.models_dir


# ---------------------------------------------------------------------------------------------
# 06: Optuna sweep
_SWEEP_CI_SPACE = {"fixed": {"fixes.qr_retraction": True},  # a rank-K_max projector: exactly degenerate eigenvalues
                   "params": {"fixes.subspace_backend": ["eigh", "safe"], "loss.subspace": [0.0, 0.1],
                              "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
_SWEEP_BAD = {"fixes.subspace_backend": "eigh", "loss.subspace": 0.1}  # eigenvector gradients through a degenerate spectrum


def _json_arg(where: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} = {text[:80]!r}: not valid JSON ({e.msg} at character {e.pos})") from e


@dataclass
class SweepParams(NotebookParams):
    """06: a small Optuna sweep (:func:`workbench.sweep.run_sweep`) over fixes and hyperparameters.

    ``space``: "" (the built-in :data:`workbench.search_space.DEFAULT_SPACE`), a JSON object, or the path of a JSON/YAML
    space file. ``enqueue``: a JSON list of {knob: value} dicts run first (knobs left out are sampled), e.g. a
    configuration known to be bad. ``storage``: "" means ``sqlite:///<out_dir>/optuna.db``, so a notebook run
    never touches ``runs/optuna.db``."""

    _section: ClassVar[str] = "06_sweep"
    ci: ClassVar[dict[str, Any]] = {"trials": 4, "epochs": 1, "n_train": 16, "n_val": 8, "batch_size": 8, "width": 16, "N_side": 6,
                                    "space": json.dumps(_SWEEP_CI_SPACE),
                                    "enqueue": json.dumps([{**_SWEEP_BAD, "train.lr": 1e-3},
                                                           {**_SWEEP_BAD, "fixes.subspace_backend": "safe", "train.lr": 1e-3}])}
    fixed: ClassVar[dict[str, Any]] = {"model.layers": 1}

    trials: int = field(default=6, metadata=_rng(1, 100_000))
    epochs: int = field(default=2, metadata=_rng(1, 100_000))
    n_train: int = field(default=64, metadata=_rng(1, 10_000_000))
    n_val: int = field(default=32, metadata=_rng(1, 10_000_000))
    batch_size: int = field(default=32, metadata=_rng(1, 65_536))
    width: int = field(default=32, metadata=_rng(8, 8192))
    N_side: int = field(default=8, metadata=_rng(3, 64))
    storage: str = ""
    study: str = "06_sweep"
    space: str = ""
    enqueue: str = '[{"fixes.subspace_backend": "eigh", "loss.subspace": 0.1}]'
    preset: str = "recommended"
    pruner: str = field(default="median", metadata={"choices": ("median", "none")})
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    data: str | None = None
    out_dir: str = "runs/06_sweep"

    def _check_relations(self) -> None:
        import re

        if not self.study.strip():
            raise ConfigError(f"{self._section}.study = {self.study!r}: expected a non-empty study name")
        if self.storage and not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", self.storage):
            raise ConfigError(f"{self._section}.storage = {self.storage!r}: expected '' (an SQLite file under out_dir) or an SQLAlchemy "
                              "URL such as sqlite:///runs/optuna.db or postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB")
        super()._check_relations()
        self.enqueued  # noqa: B018 - validates the space and the queued configurations

    @property
    def search_space(self):
        """The validated :class:`workbench.search_space.SearchSpace` (ConfigError names ``06_sweep.space``)."""
        from .search_space import load_space

        text = self.space.strip()
        spec: Any = None
        if text.startswith("{"):
            spec = _json_arg(f"{self._section}.space", text)
        elif text:
            if not Path(text).is_file():
                raise ConfigError(f"{self._section}.space = {text!r}: neither a JSON object nor an existing space file")
            spec = text
        try:
            return load_space(spec, self.preset, self.dotted_overrides())
        except ConfigError as e:
            raise ConfigError(f"{self._section}.space: {e}") from e

    @property
    def enqueued(self) -> list[dict[str, Any]]:
        """The queued configurations, each checked against the search space (knob searched, value inside its range)."""
        where = f"{self._section}.enqueue"
        items = _json_arg(where, self.enqueue) if self.enqueue.strip() else []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigError(f"{where} = {self.enqueue[:80]!r}: expected a JSON list of {{knob: value}} objects")
        space = self.search_space
        for item in items:
            space.check_point(item, where)
        return items

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.out_path / 'optuna.db'}"


NOTEBOOK_PARAMS: dict[str, type[NotebookParams]] = {
    cls._section: cls for cls in (NormalisationParams, SpectrumParams, GradientParams, TrainingParams, LocalisationParams, SweepParams)
}


def notebook_params(name: str, **values: Any) -> NotebookParams:
    """Validated parameters of notebook ``name`` (wrong type / range / unknown key -> ConfigError naming the field)."""
    check_choice("notebook", name, tuple(NOTEBOOK_PARAMS))
    return NOTEBOOK_PARAMS[name].from_dict(values)


def from_cell(name: str, namespace: dict[str, Any]) -> NotebookParams:
    """The validated parameters of notebook ``name`` read from its parameters cell's variables in ``namespace``
    (``globals()`` of the notebook), by the dataclass's field names."""
    check_choice("notebook", name, tuple(NOTEBOOK_PARAMS))
    names = [f.name for f in dataclasses.fields(NOTEBOOK_PARAMS[name])]
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ConfigError(f"{name}: the parameters cell does not define {', '.join(missing)}")
    return notebook_params(name, **{n: namespace[n] for n in names})
