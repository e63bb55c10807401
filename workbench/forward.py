"""Where a batch meets a model: the one forward pass (:func:`forward`), the one R_samp cache (:class:`RsampCache`)
and the scenes of a training run (:class:`TrainingData`).

Owns: moving a batch, its R_samp and its prior factor to the model's device, running the model and the covariance
pipeline (:func:`workbench.losses.covariances`, optionally the loss terms, :func:`workbench.losses.compute_losses`)
and handing the results back on the device the caller asks for; R_samp [n,N,N] of a batch of scenes per
(estimator, Fix 1, system), and the model's prior factor of it [n,N,K_max] (for the detector head: its feature maps),
each computed once per scene, in chunks;
the maximum-likelihood fit of a batch's scenes (shared by the physics baseline and the physics head), once per batch.
Must not: train (optimiser, schedule: :mod:`workbench.train`), score (:mod:`workbench.studies`), draw, or choose a
device (:func:`workbench.config.resolve_device` does).

Every place that runs the network on scenes (training steps, validation, the gradient report, the seed table, the
pipeline study, the baselines' network NMSE, the localisation sources) goes through :func:`forward`; every place
that needs an estimator's R_samp of scenes reads it from the batch's :class:`RsampCache` (:func:`rsamp_cache`).
"""

from __future__ import annotations

import json
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .config import ConfigError, ExperimentConfig, FixConfig, SystemConfig, check_choice, resolve_device
from .covariance import Covariances
from .estimators import normalise_rsamp, rsamp_raw
from .losses import compute_losses, covariances
from .ml_fit import SnapshotFit, ml_fit_for
from .model import CovarianceNet, ModelOutput, PhysicsFits
from .physics import SceneBatch, scene_seed, simulate

# The held-out protocol: the scenes of one train.seed come from disjoint seed streams (physics.scene_seed), one per
# split. train/val: training and its early stopping, pruning and sweeps; dev: notebooks and anything a person looks at
# while choosing settings; test: only the reported tables (`workbench compare`), never a default, a preset or a sweep.
SPLITS = {"train": 0, "val": 1, "dev": 2, "test": 3}
RSAMP_CHUNK = 64  # scenes per estimator call (the beamscan estimator takes seconds per chunk on a CPU)


def split_seed(seed: int, split: str, *index: int) -> int:
    """The simulate() seed of a set of scenes of ``split`` (one of :data:`SPLITS`) under ``seed``; ``index`` names a
    sub-stream (e.g. 0 for a split's random-SNR scenes, (1, i) for its scenes at the i-th fixed SNR)."""
    check_choice("split", split, tuple(SPLITS))
    return scene_seed(seed, SPLITS[split], *index)


# ---------------------------------------------------------------------------------------------
# The R_samp cache
class RsampCache:
    """R_samp of the scenes of one :class:`~workbench.physics.SceneBatch`, computed once per scene and kept.

    Entries, each for all n scenes of the batch, on the batch's device:

    * ``raw(estimator, system)``: the estimator's R_samp before Fix 1 (:func:`workbench.covariance.rsamp_raw`),
      [n,N,N] complex64, raw units;
    * ``rsamp(estimator, system, normalise)``: R_samp as the pipeline uses it (Fix 1 when ``normalise``:
      :func:`workbench.estimators.normalise_rsamp`), [n,N,N] complex64, trace N when normalised;
    * ``prior(estimator, system, normalise)``: the model's prior factor of that R_samp
      (:meth:`workbench.model.CovarianceNet.prior_factor` with k = K_max), [n,N,K_max] complex64;
    * ``ml_fit(system)``: the maximum-likelihood fit of the scenes, K by MDL (:func:`workbench.ml_fit.ml_fit_for`),
      and ``physics_fits(system)``, the physics head's view of it (:class:`workbench.model.PhysicsFits`).

    The key of an entry is (estimator, Fix 1, system); the scenes are the batch's. ``counts`` says how many chunks
    each kind ("raw", "prior") and how many batched ML fits ("ml_fit") were computed (tests read it). ``chunk``:
    scenes per R_samp/prior call (the ML fit chunks by device: :data:`workbench.ml_fit.ML_CHUNK`)."""

    def __init__(self, batch: SceneBatch, chunk: int = RSAMP_CHUNK):
        self.batch, self.chunk = batch, chunk
        self._store: dict[tuple, torch.Tensor] = {}
        self.counts = {"raw": 0, "prior": 0, "ml_fit": 0}

    def __len__(self) -> int:
        return len(self.batch)

    @staticmethod
    def _system_key(system: SystemConfig) -> str:
        return system.to_json()

    @torch.no_grad()
    def _estimate(self, estimator: str, system: SystemConfig, progress: bool) -> torch.Tensor:
        fixes = FixConfig(rsamp_estimator=estimator)
        b, parts = self.batch, []
        with tqdm(total=len(b), disable=not progress, desc=f"R_samp ({estimator})", unit="scene") as bar:
            for s in range(0, len(b), self.chunk):
                parts.append(rsamp_raw(b[s:s + self.chunk], fixes, system))
                self.counts["raw"] += 1
                bar.update(len(parts[-1]))
        return torch.cat(parts)

    def raw(self, estimator: str, system: SystemConfig, progress: bool = False) -> torch.Tensor:
        """The estimator's raw R_samp [n,N,N] complex64 (computed in chunks once; progress bar over the scenes)."""
        key = ("raw", estimator, self._system_key(system))
        if key not in self._store:
            self._store[key] = self._estimate(estimator, system, progress)
        return self._store[key]

    def rsamp(self, estimator: str, system: SystemConfig, normalise: bool = True, progress: bool = False) -> torch.Tensor:
        """R_samp [n,N,N] complex64 as the pipeline uses it: :meth:`raw` with Fix 1 when ``normalise`` (the raw matrices
        are kept only when :meth:`raw` itself was asked for: a training run needs only the normalised ones)."""
        if not normalise:
            return self.raw(estimator, system, progress)
        key = ("rsamp", estimator, self._system_key(system))
        if key not in self._store:
            raw = self._store.get(("raw", estimator, self._system_key(system)))
            raw = self._estimate(estimator, system, progress) if raw is None else raw
            self._store[key] = normalise_rsamp(raw, FixConfig(rsamp_normalise=True))
        return self._store[key]

    @torch.no_grad()
    def prior(self, estimator: str, system: SystemConfig, normalise: bool = True) -> torch.Tensor:
        """The prior factor [n,N,K_max] complex64 of :meth:`rsamp` (:meth:`CovarianceNet.prior_factor`, in chunks)."""
        key = ("prior", estimator, normalise, self._system_key(system))
        if key not in self._store:
            R = self.rsamp(estimator, system, normalise)
            parts = []
            for s in range(0, len(R), self.chunk):
                parts.append(CovarianceNet.prior_factor(R[s:s + self.chunk], system.K_max))
                self.counts["prior"] += 1
            self._store[key] = torch.cat(parts)
        return self._store[key]

    def derived(self, key, compute):
        """A value computed from these scenes once per ``key`` (e.g. a trained network's output on them, shared by the
        localisation sources R_pred and R_blend of that network) and kept as long as the batch."""
        key = ("derived", key)
        if key not in self._store:
            self._store[key] = compute()
        return self._store[key]

    def ml_fit(self, system: SystemConfig) -> SnapshotFit:
        """The maximum-likelihood fit of the batch's scenes with K by MDL (:func:`workbench.ml_fit.ml_fit_for`), on
        the batch's device, computed once per batch and system under the :meth:`derived` key ("ml_fit", system JSON):
        the physics baseline's localisation source (:class:`workbench.studies.localisation.PhysicsSource`) and the
        physics head (:meth:`physics_fits`) of the same batch share this one fit."""
        def compute():
            self.counts["ml_fit"] += 1
            with torch.no_grad():
                return ml_fit_for(self.batch, system)
        return self.derived(("ml_fit", self._system_key(system)), compute)

    def physics_fits(self, system: SystemConfig) -> PhysicsFits:
        """The physics head's :class:`~workbench.model.PhysicsFits` of the batch's scenes: :meth:`ml_fit`'s nested fits
        (no copy), [n,...] on the batch's device; index it by scene (``fits[idx]``) as R_samp is."""
        return PhysicsFits.of(self.ml_fit(system))

    def fits_of(self, cfg: ExperimentConfig) -> PhysicsFits | None:
        """The :meth:`physics_fits` the model of ``cfg`` takes (None unless ``model.head`` is "physics")."""
        return self.physics_fits(cfg.system) if cfg.model.head == "physics" else None

    # the same three for a config (its fixes.rsamp_estimator, fixes.rsamp_normalise and system)
    def rsamp_of(self, cfg: ExperimentConfig, progress: bool = False) -> torch.Tensor:
        return self.rsamp(cfg.fixes.rsamp_estimator, cfg.system, cfg.fixes.rsamp_normalise, progress)

    def prior_of(self, cfg: ExperimentConfig) -> torch.Tensor | None:
        """The per-scene input the model of ``cfg`` takes beside y, H and the codes, computed once per scene: the prior
        factor (``model.rsamp_input``), the detector head's feature maps (:meth:`detector_features`), else None."""
        if cfg.model.head == "detector":
            return self.detector_features(cfg)
        return self.prior(cfg.fixes.rsamp_estimator, cfg.system, cfg.fixes.rsamp_normalise) if cfg.model.rsamp_input else None

    def detector_features(self, cfg: ExperimentConfig) -> torch.Tensor:
        """The detector head's feature maps of the batch's scenes (:func:`workbench.detector.detector_features` on
        :func:`~workbench.detector.detection_grid` of ``cfg.model``), [n,F,P,T,Q] float32, from y, H and the codes
        only, in chunks, kept (:meth:`derived`)."""
        from .detector import detection_grid, detector_features

        grid = detection_grid(cfg.system, cfg.model)
        key = ("detector_features", self._system_key(cfg.system), cfg.model.detector_step_deg, cfg.model.detector_n_r)
        b = self.batch
        return self.derived(key, lambda: torch.cat([detector_features(cfg.system, grid, b.y[s:s + self.chunk], b.H[s:s + self.chunk],
                                                                      b.codes[s:s + self.chunk]) for s in range(0, len(b), self.chunk)]))

    def to(self, device) -> RsampCache:
        """The cache of the batch on ``device`` (self when already there); the entries move along."""
        batch = self.batch.to(device)
        if batch is self.batch:
            return self
        return self.copy_to(batch)

    def copy_to(self, batch: SceneBatch) -> RsampCache:
        """The cache of ``batch`` (the same scenes, e.g. on another device) filled with this cache's entries."""
        other = rsamp_cache(batch)
        device = batch.y.device
        for k, v in self._store.items():
            if k[0] != "derived":
                other._store.setdefault(k, v.to(device))
        return other


def rsamp_cache(batch: SceneBatch) -> RsampCache:
    """The :class:`RsampCache` of ``batch`` (created on first use and kept on the batch object itself, so it lives
    as long as the batch; a slice or a copy on another device is another batch with its own cache)."""
    cache = batch.__dict__.get("_rsamp_cache")
    if cache is None:
        cache = batch.__dict__["_rsamp_cache"] = RsampCache(batch)
    return cache


# ---------------------------------------------------------------------------------------------
# The scenes of a training run
class TrainingData:
    """The scenes of a training run (``train``, ``val``: SceneBatch) and their R_samp caches (:class:`RsampCache`),
    so that runs on the same data (sweep trials, the presets of a comparison) share R_samp and its prior factor.
    ``key`` says what the scenes depend on (system, sizes, seed, device)."""

    def __init__(self, train: SceneBatch, val: SceneBatch, key: str = ""):
        self.train, self.val, self.key = train, val, key
        self._moved: dict[str, TrainingData] = {}

    @staticmethod
    def key_of(cfg: ExperimentConfig) -> str:
        t = cfg.train
        return json.dumps([cfg.system.to_dict(), t.n_train, t.n_val, t.seed, t.device], sort_keys=True)

    @classmethod
    def simulate(cls, cfg: ExperimentConfig, device=None) -> TrainingData:
        """Training and validation scenes, seeded from ``cfg.train.seed`` (the "train" and "val" streams of
        :func:`split_seed`: disjoint from each other and from the dev and test scenes), on ``device`` (default:
        ``cfg.train.device`` resolved; the draws are made on the CPU, so the scenes are the same on every device)."""
        t = cfg.train
        dev = resolve_device(t.device if device is None else device)
        return cls(simulate(cfg.system, t.n_train, seed=split_seed(t.seed, "train"), device=dev),
                   simulate(cfg.system, t.n_val, seed=split_seed(t.seed, "val"), device=dev), cls.key_of(cfg))

    @classmethod
    def load(cls, cfg: ExperimentConfig, dataset=None, device=None) -> TrainingData:
        """:meth:`simulate`, or :meth:`from_dataset` when ``dataset`` (a dataset folder) is given: the scenes a
        notebook or a panel trains on."""
        return cls.simulate(cfg, device) if dataset is None else cls.from_dataset(dataset, cfg, device)

    @classmethod
    def from_dataset(cls, path, cfg: ExperimentConfig, device=None) -> TrainingData:
        """Training and validation scenes from the dataset folder ``path`` (made by ``workbench data generate`` or
        ``workbench data import``; verified by :func:`workbench.data.load_dataset`) instead of the simulator:
        ``cfg.train.n_train`` + ``cfg.train.n_val`` scenes of a permutation seeded by ``cfg.train.seed`` (so the split
        is deterministic and the two sets are disjoint), the first n_train for training. ``cfg.system`` must equal
        the dataset's (:func:`dataset_config` gives that config); a dataset with too few scenes fails naming the
        sizes."""
        from .config import ConfigError
        from .data import load_dataset

        t = cfg.train
        batch = load_dataset(path, system=cfg.system)
        need = t.n_train + t.n_val
        if need > len(batch):
            raise ConfigError(f"--data '{path}': holds {len(batch)} scenes, fewer than train.n_train + train.n_val = {t.n_train} + {t.n_val}; "
                              "lower --n-train / --set train.n_val, or add scenes")
        gen = torch.Generator().manual_seed(split_seed(t.seed, "train", 1))
        order = torch.randperm(len(batch), generator=gen)
        dev = resolve_device(t.device if device is None else device)
        pick = lambda idx: SceneBatch(**{k: v[idx] for k, v in batch.tensors().items()}).to(dev)  # noqa: E731
        return cls(pick(order[:t.n_train]), pick(order[t.n_train:need]), cls.key_of(cfg))

    @staticmethod
    def dataset_config(path, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` with the system of the dataset folder ``path`` (its manifest's config)."""
        from .data import dataset_system

        return cfg.replace(system=dataset_system(path).to_dict())

    @property
    def device(self) -> torch.device:
        return self.train.y.device

    def to(self, device) -> TrainingData:
        """The same data on ``device`` (self when it is already there; one copy per device, kept, so its caches fill
        once); the R_samp caches move along."""
        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if self.train.to(device) is self.train and self.val.to(device) is self.val:
            return self
        name = str(device)
        if name not in self._moved:
            moved = TrainingData(self.train.to(device), self.val.to(device), self.key)
            for split in ("train", "val"):
                self.cache(split).copy_to(getattr(moved, split))
            self._moved[name] = moved
        return self._moved[name]

    def cache(self, split: str) -> RsampCache:
        """The :class:`RsampCache` of the ``split`` ("train" | "val") scenes."""
        return rsamp_cache(getattr(self, split))

    def rsamp(self, split: str, cfg: ExperimentConfig, progress: bool = False) -> torch.Tensor:
        """R_samp [n,N,N] of the ``split`` ("train" | "val") scenes under ``cfg.fixes``, computed in chunks once
        (with a progress bar over the scenes when ``progress``: the beamscan estimator takes seconds per chunk)."""
        return self.cache(split).rsamp_of(cfg, progress)

    def prior(self, split: str, cfg: ExperimentConfig) -> torch.Tensor | None:
        """The model's prior factor [n,N,K_max] of :meth:`rsamp` (None when ``cfg.model.rsamp_input`` is off)."""
        return self.cache(split).prior_of(cfg)

    def fits(self, split: str, cfg: ExperimentConfig) -> PhysicsFits | None:
        """The physics head's ML fits of the ``split`` scenes (:meth:`RsampCache.fits_of`: once per scene, kept with
        the scenes; None unless ``cfg.model.head`` is "physics"). A step takes its scenes' fits by index."""
        return self.cache(split).fits_of(cfg)


# ---------------------------------------------------------------------------------------------
# The forward pass
class Forward(NamedTuple):
    """What :func:`forward` returns: the model's output, the covariance pipeline of it, and the loss terms by name
    plus ``total`` (None unless asked for)."""

    out: ModelOutput
    cov: Covariances
    losses: dict[str, torch.Tensor] | None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def _move(x, device):
    """Tensors (and the tensors inside a dataclass / dict / tuple of them) moved to ``device``."""
    if x is None or device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    if hasattr(x, "__dataclass_fields__"):
        return type(x)(**{k: _move(getattr(x, k), device) for k in x.__dataclass_fields__})
    return x


def forward(model: CovarianceNet, batch: SceneBatch, R_samp: torch.Tensor, cfg: ExperimentConfig, *,
            prior: torch.Tensor | None = None, fits: PhysicsFits | None = None, terms: tuple[str, ...] | None = None,
            losses: bool = False, amp: bool = False, out_device=None, count: torch.Tensor | None = None) -> Forward:
    """Run ``model`` on ``batch`` and the covariance pipeline of ``cfg`` on its prediction.

    batch: B scenes; R_samp [B,N,N] complex64 (the pipeline's, e.g. :meth:`RsampCache.rsamp_of`); prior: the model's
    prior factor [B,N,K_max] complex64 of R_samp (:meth:`RsampCache.prior_of`; None: the model computes it when it
    needs one); fits: the physics head's ML fits of these B scenes (:meth:`RsampCache.fits_of`, indexed like R_samp;
    None with a physics-head model: those of ``batch``'s own cache, :meth:`RsampCache.physics_fits`, computed once per
    batch object and shared with the physics baseline's source on it; ignored by the other heads). All are moved to
    the model's device first. ``losses`` (or a ``terms`` tuple): also the loss terms
    (:func:`workbench.losses.compute_losses`, ``terms`` None = all). ``amp``: the encoder under autocast. count: [B]
    given source counts for a model that takes them (the learned localiser, ``model.head = "detector"``: oracle
    knowledge such as ``batch.K``, for the RMSE peers report with K given; ConfigError for another head). Autograd is
    whatever the caller has on (training keeps it; evaluation wraps the call in ``torch.no_grad``).
    Returns :class:`Forward` (out, cov, losses), on ``out_device`` (default: the model's device)."""
    dev = model_device(model)
    head = getattr(getattr(model, "cfg", None), "head", None)
    if head != "physics":
        fits = None  # only a physics-head model takes fits
    elif fits is None:
        fits = rsamp_cache(batch).physics_fits(model.system)
    b, Rs, pr = batch.to(dev), R_samp.to(dev), _move(prior, dev)
    extra = {} if fits is None else {"fits": _move(fits, dev)}
    if count is not None:
        if head != "detector":
            raise ConfigError(f"count: only the learned localiser (model.head = 'detector') takes a given count, not model.head = {head!r}")
        extra["count"] = count.to(dev)
    out = model(b.y, b.H, b.codes, R_samp=Rs, amp=amp, prior=pr, **extra)
    if losses or terms is not None:
        values, cov = compute_losses(out, b, Rs, cfg, terms=terms)
    else:
        values, cov = None, covariances(out, b, Rs, cfg)
    if out_device is None or torch.device(out_device) == dev:
        return Forward(out, cov, values)
    target = torch.device(out_device)
    return Forward(_move(out, target), _move(cov, target), _move(values, target))
