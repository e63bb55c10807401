"""Optuna sweeps over the fix knobs and training hyperparameters (issue 5).

The objective is the UNWEIGHTED validation NMSE of R_pred (``record["val_nmse"]`` of :func:`train.fit`),
a quantity the searched loss weights cannot shrink by themselves. It is reported every epoch with
``trial.report`` so the pruner can act. A trial whose training skipped a non-finite step (or whose loss
or validation NMSE is non-finite) is pruned, and its NaN provenance is kept as the trial user attribute
``provenance`` (plain JSON), with ``pruned_reason = "nonfinite"``.

Storage. Everything goes through Optuna's ``RDBStorage``: the default is an SQLite file
``runs/optuna.db`` (no server; one file a researcher can copy, and the same schema, heartbeats and
stale-trial handling as the server path), and ``--storage postgresql+psycopg2://...`` shares one study
between workers on many machines (:mod:`workbench.storage`). Creating the schema and the study happens under a :class:`~workbench.storage.StorageLock`
(a file lock beside an SQLite file, an advisory lock on PostgreSQL), so processes started at the same moment
on a new database all succeed. The study stores the search space, the base config and the pruner settings
as study user attributes, so a worker elsewhere only needs the storage, ``--study`` and ``--join``; ``--join``
never creates a database, and refuses options that conflict with the stored study (:func:`join_conflicts`: a
``--space``/``--preset``/``--set``/``--epochs``/``--n-train``/``--n-val``/``--pruner`` that would change what the study
searches is named, never silently ignored; options equal to the stored ones are accepted). URLs are shown with
their secrets masked (:func:`~workbench.storage.mask_url`), and workers started
here get the URL through the environment (``WORKBENCH_STORAGE``), never on a command line that ``ps`` shows.

Workers. Each worker runs trials until the study holds ``trials`` finished trials (COMPLETE, PRUNED, or
FAIL that was not retried); re-running the same command therefore resumes the study, and a larger
``--trials`` extends it. Counting the finished and running trials and creating the next one happen under the
same lock, so workers together never start more than ``trials``. Heartbeats (every ``heartbeat`` >= 1 seconds;
0 is refused) mark a killed worker's running trial FAIL after the grace period and re-queue it once with the
same parameters (``RetryHeartbeatStaleTrialCallback``), so a killed worker loses at most its running trial; a
RUNNING trial that never sent a heartbeat (its worker died right after creating it) is failed the same way once
it is older than the grace period, so a worker waiting for it never hangs.

The search space (what may be searched, the file format, validation) is :mod:`workbench.search_space`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .config import ConfigError, ExperimentConfig, resolve_device
from .search_space import SearchSpace, load_space
from .storage import STORAGE_ENV, StorageLock, check_heartbeat, default_storage_url, mask_url, open_storage, storage_errors

DEFAULT_STUDY = "sweep"
DEFAULT_DB = Path("runs") / "optuna.db"
PRUNERS = ("median", "none")
PROVENANCE_KEEP = 20  # provenance records stored per trial (the count is stored too)


def _pruner(settings: dict) -> optuna.pruners.BasePruner:
    if settings["pruner"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=settings["startup"], n_warmup_steps=0)


def create_study(space: SearchSpace, storage: str | None = None, study: str = DEFAULT_STUDY, pruner: str = "median",
                 pruner_startup: int = 2) -> optuna.Study:
    """Create the study (or load it when it exists with the same space and base config).

    Call once before workers fan out. Stores {"space", "pruner"} as study user attributes. ConfigError
    when an existing study of that name was made with a different space, base config or pruner."""
    if pruner not in PRUNERS:
        raise ConfigError(f"pruner = {pruner!r} is not allowed: choose one of {', '.join(map(repr, PRUNERS))}")
    if isinstance(pruner_startup, bool) or not isinstance(pruner_startup, int) or pruner_startup < 0:
        raise ConfigError(f"pruner_startup = {pruner_startup!r}: expected an integer >= 0")
    settings = {"pruner": pruner, "startup": pruner_startup}
    st = open_storage(storage)
    with storage_errors(st.url), StorageLock(st.url):  # processes creating the same study together see one creation
        s = optuna.create_study(study_name=study, storage=st, direction="minimize", load_if_exists=True, pruner=_pruner(settings))
        want = space.to_dict()
        have = s.user_attrs.get("space")
        if have is None:
            s.set_user_attr("space", want)
            s.set_user_attr("pruner", settings)
    if have is not None and (json.dumps(have, sort_keys=True) != json.dumps(want, sort_keys=True) or s.user_attrs.get("pruner") != settings):
        raise ConfigError(f"study = {study!r} already exists in {mask_url(st.url)!r} with a different search space, base config "
                          "or pruner; resume it with the same command, or choose a new --study name")
    return s


def study_space(study: optuna.Study) -> tuple[SearchSpace, dict]:
    """The search space and pruner settings stored in a study by :func:`create_study`."""
    if "space" not in study.user_attrs:
        raise ConfigError(f"study = {study.study_name!r} was not created by `workbench sweep` (no stored search space)")
    return SearchSpace.from_dict(study.user_attrs["space"]), study.user_attrs.get("pruner", {"pruner": "median", "startup": 2})


def load_study(storage: str | None = None, study: str = DEFAULT_STUDY, heartbeat: int | None = 10, grace: int | None = None,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Load an existing study, with the pruner it was created with. ConfigError when there is none (a missing
    SQLite file is not created)."""
    st = open_storage(storage, heartbeat, grace, create=False)
    with storage_errors(st.url):
        names = [s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)]
        if study not in names:
            raise ConfigError(f"study = {study!r} not found in {mask_url(st.url)!r}; existing: {', '.join(names) or 'none'}")
        s = optuna.load_study(study_name=study, storage=st, sampler=sampler)
    _, settings = study_space(s)
    s.pruner = _pruner(settings)
    return s


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def join_conflicts(stored: SearchSpace, settings: dict, *, space: Any = None, preset_name: str | None = None,
                   overrides: dict[str, Any] | None = None, epochs: int | None = None, n_train: int | None = None,
                   n_val: int | None = None, pruner: str | None = None) -> list[str]:
    """What the options of a ``--join`` (None: not given) would change in the stored study, one line per option;
    empty when every given option agrees with it. A joining worker runs the stored space and base config."""
    base, out = stored.base, []
    for flag, value, have in (("--epochs", epochs, base.train.epochs), ("--n-train", n_train, base.train.n_train),
                              ("--n-val", n_val, base.train.n_val), ("--pruner", pruner, settings.get("pruner"))):
        if value is not None and value != have:
            out.append(f"{flag} {value} (the study has {have})")
    for key, value in (overrides or {}).items():
        try:
            changed = base.replace(**{key: value}) != base
        except ConfigError as e:
            raise ConfigError(f"--set {key}: {e}") from None
        if changed:
            section, field = key.split(".", 1)
            out.append(f"--set {key} {value!r} (the study has {getattr(getattr(base, section), field)!r})")
    if space is not None or preset_name is not None:
        train = {"train.epochs": epochs or base.train.epochs, "train.n_train": n_train or base.train.n_train,
                 "train.n_val": n_val or base.train.n_val}
        want = load_space(space, preset_name or "recommended", {**train, **(overrides or {})}).to_dict()
        have = stored.to_dict()
        params = sorted(k for k in set(want["params"]) | set(have["params"]) if want["params"].get(k) != have["params"].get(k))
        fields = sorted(f"{sec}.{k}" for sec in have["base"] for k in have["base"][sec]
                        if want["base"].get(sec, {}).get(k) != have["base"][sec][k])
        if params or fields:
            flags = " and ".join(f for f, v in (("--space", space), ("--preset", preset_name)) if v is not None)
            parts = (f"searched knobs {_short(params)}" if params else "", f"base fields {_short(fields)}" if fields else "")
            diff = "; ".join(x for x in parts if x)
            out.append(f"{flags} (differ from the study in {diff})")
    return out


def check_join(study: optuna.Study, **options: Any) -> None:
    """ConfigError naming every ``--join`` option that conflicts with the stored study (:func:`join_conflicts`)."""
    stored, settings = study_space(study)
    conflicts = join_conflicts(stored, settings, **options)
    if conflicts:
        raise ConfigError(f"--join runs study {study.study_name!r} with the search space and base config it was created with; "
                          f"these options conflict with it: {'; '.join(conflicts)}. Drop them to join, or give a new --study "
                          "name to start another study")


# ---------------------------------------------------------------------------------------------
# objective
class TrialData:
    """The scenes of the trials a worker runs, owned by the worker: simulated once per system, sizes and seed
    (trials usually share them) with their R_samp cache (:class:`workbench.forward.TrainingData`). ``dataset``: a
    dataset folder whose scenes are taken instead (:meth:`~workbench.forward.TrainingData.from_dataset`; the trials'
    system must be the dataset's)."""

    def __init__(self, dataset: str | os.PathLike | None = None):
        self.data = None
        self.dataset = dataset

    def for_config(self, cfg: ExperimentConfig):
        from .forward import TrainingData

        key = TrainingData.key_of(cfg)
        if self.data is None or self.data.key != key:
            device = resolve_device(cfg.train.device)
            self.data = (TrainingData.simulate(cfg, device) if self.dataset is None
                         else TrainingData.from_dataset(self.dataset, cfg, device))
        return self.data


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (tensors, paths and other objects become strings)."""
    return json.loads(json.dumps(obj, default=str))


def train_objective(trial: optuna.Trial, cfg: ExperimentConfig, fit: Callable | None = None, data: TrialData | None = None) -> float:
    """Train under ``cfg``; returns the last epoch's unweighted validation NMSE of R_pred.

    Reports ``val_nmse`` every epoch (step = epoch) and raises ``optuna.TrialPruned`` when the pruner says
    so, or when a step was non-finite; then the trial's user attributes hold ``pruned_reason``
    ("pruner" | "nonfinite"), and for non-finite trials ``nonfinite_steps``, ``provenance`` (the first
    records of train.fit's NaN provenance) and ``provenance_count``. ``fit`` is injectable (tests); ``data``
    holds the worker's scenes (a fresh :class:`TrialData` when None)."""
    if fit is None:
        from .train import fit
    state: dict[str, Any] = {"reason": None, "epochs": []}

    def on_epoch(record: dict) -> bool:
        val = float(record["val_nmse"])
        state["epochs"].append({"epoch": record["epoch"], "val_nmse": val if math.isfinite(val) else None,
                                "skipped_nonfinite": int(record["skipped_nonfinite"]), "seconds": float(record.get("seconds", 0.0))})
        bad = int(record["skipped_nonfinite"]) > 0 or not math.isfinite(float(record["train_loss"])) or not math.isfinite(val)
        if bad:
            state["reason"] = "nonfinite"
            return True
        trial.report(val, record["epoch"])
        if trial.should_prune():
            state["reason"] = "pruner"
            return True
        return False

    result = fit(cfg, (data or TrialData()).for_config(cfg), on_epoch=on_epoch, progress=False)
    trial.set_user_attr("epochs", state["epochs"])
    if state["reason"] == "nonfinite":
        prov = list(result.provenance)
        trial.set_user_attr("pruned_reason", "nonfinite")
        trial.set_user_attr("nonfinite_steps", sum(e["skipped_nonfinite"] for e in state["epochs"]))
        trial.set_user_attr("provenance", _jsonable(prov[:PROVENANCE_KEEP]))
        trial.set_user_attr("provenance_count", len(prov))
        ops = sorted({f"{p.get('term')}:{p.get('op')}" for p in prov})
        raise optuna.TrialPruned(f"non-finite training step(s) from {', '.join(ops) or 'a non-finite loss'}")
    if state["reason"] == "pruner":
        trial.set_user_attr("pruned_reason", "pruner")
        raise optuna.TrialPruned(f"pruned at epoch {state['epochs'][-1]['epoch']}: val_nmse {state['epochs'][-1]['val_nmse']:.4g}")
    return float(result.history[-1]["val_nmse"])


# ---------------------------------------------------------------------------------------------
# workers
def progress_counts(study: optuna.Study) -> dict[str, int]:
    """{"done", "running", "waiting", "complete", "pruned", "failed", "retried"}: ``done`` counts COMPLETE,
    PRUNED and FAIL trials, less the failed ones that were re-queued (their retry counts instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    by = {s: [t for t in trials if t.state == s] for s in TrialState}
    failed = [t for t in by[TrialState.FAIL] if t.number not in retried]
    return {"done": len(by[TrialState.COMPLETE]) + len(by[TrialState.PRUNED]) + len(failed),
            "running": len(by[TrialState.RUNNING]), "waiting": len(by[TrialState.WAITING]),
            "complete": len(by[TrialState.COMPLETE]), "pruned": len(by[TrialState.PRUNED]), "failed": len(failed),
            "retried": len(retried)}


def run_worker(storage: str | None = None, study: str = DEFAULT_STUDY, trials: int = 8, *, worker: int = 0, seed: int = 0,
               heartbeat: int = 10, grace: int | None = None, objective: Callable | None = None, verbose: bool = True,
               join_options: dict[str, Any] | None = None, data: str | os.PathLike | None = None) -> list[int]:
    """Run trials of an existing study until it holds ``trials`` done trials (see :func:`progress_counts`).

    ``objective(trial, cfg) -> float`` defaults to :func:`train_objective`. Returns the trial numbers this
    worker ran. Waits (polling every half heartbeat) while the remaining trials are running elsewhere, so that a
    dead worker's trial, once failed by its stale (or missing) heartbeat, is re-run here. Counting the trials and
    creating the next one happen under the storage's :class:`StorageLock`, so workers together never start more
    than ``trials``. ``join_options`` (the options of ``--join``, see :func:`join_conflicts`) are checked against the
    stored study before any trial runs. ``data``: a dataset folder the trials train on (:class:`TrialData`)."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials = {trials!r}: expected an integer >= 1")
    check_heartbeat(heartbeat, grace)
    url = storage or default_storage_url()
    s = load_study(url, study, heartbeat, grace, sampler=optuna.samplers.TPESampler(seed=seed + 1000 * worker, n_startup_trials=4))
    if join_options:
        check_join(s, **join_options)
    space, _ = study_space(s)
    trial_data = TrialData(data)  # scenes shared by this worker's trials
    objective = objective or (lambda trial, cfg: train_objective(trial, cfg, data=trial_data))
    host = f"{socket.gethostname()}:{os.getpid()}"
    ran: list[int] = []
    claim = StorageLock(url)

    def func(trial: optuna.Trial) -> float:
        claim.release()  # the trial exists (RUNNING): other workers count it from now on
        trial.set_user_attr("worker", {"index": worker, "host": host})
        cfg = space.config(space.suggest(trial))
        try:
            return objective(trial, cfg)
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            raise

    def log(st: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        ran.append(t.number)
        if verbose:
            what = f"{t.value:.5g}" if t.state == TrialState.COMPLETE else t.user_attrs.get("pruned_reason") or t.user_attrs.get("error", "")
            print(f"[worker {worker}] trial {t.number} {t.state.name.lower()} {what}", flush=True)

    with warnings.catch_warnings(), storage_errors(claim.url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            claim.acquire()
            try:
                step = _next_step(s, trials)
                if step == "done":
                    break
                if step == "wait":  # the rest run elsewhere: wait, they may die
                    claim.release()
                    time.sleep(max(1, heartbeat // 2))
                    continue
                s.optimize(func, n_trials=1, catch=(Exception,), callbacks=[log], gc_after_trial=False)
            finally:
                claim.release()
    return ran


def _next_step(study: optuna.Study, trials: int) -> str:
    """"done" (the study holds ``trials`` done trials), "wait" (the rest are running elsewhere) or "run"."""
    optuna.storages.fail_stale_trials(study)
    c = progress_counts(study)
    if c["done"] >= trials:
        return "done"
    return "wait" if c["done"] + c["running"] >= trials else "run"


def parse_devices(text: str) -> list[str]:
    """``--devices``: comma-separated CUDA device indices ("0,1"), or "all" for every GPU torch sees (one worker each).
    ConfigError naming ``--devices`` for anything else, a repeated index, or "all" on a machine without CUDA."""
    text = text.strip()
    if text == "all":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError("--devices = 'all': no CUDA device is visible here; give indices (e.g. 0,1) or leave --devices out")
        return [str(i) for i in range(n)]
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t.isdigit() for t in items) or len(set(items)) != len(items):
        raise ConfigError(f"--devices = {text!r}: expected 'all' or distinct CUDA device indices separated by commas, e.g. 0,1")
    return items


def spawn_worker(storage: str, study: str, trials: int, *, worker: int = 0, seed: int = 0, heartbeat: int = 10,
                 grace: int | None = None, threads: int | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start ``workbench sweep --join`` as a child process (same interpreter); returns the Popen. The storage URL
    goes through the environment (:data:`STORAGE_ENV`), never the command line, where ``ps`` would show a password."""
    check_heartbeat(heartbeat, grace)
    cmd = [sys.executable, "-m", "workbench.cli", "sweep", "--join", "--study", study,
           "--trials", str(trials), "--worker-index", str(worker), "--seed", str(seed), "--heartbeat", str(heartbeat)]
    if grace:
        cmd += ["--grace", str(grace)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**(popen_kwargs.pop("env", None) or os.environ), STORAGE_ENV: storage}
    return subprocess.Popen(cmd, env=env, **popen_kwargs)


def run_sweep(space: str | os.PathLike | dict | SearchSpace | None = None, *, trials: int = 8, epochs: int = 2, n_train: int = 256,
              n_val: int = 64, study: str = DEFAULT_STUDY, storage: str | None = None, workers: int = 1, preset_name: str = "recommended",
              overrides: dict[str, Any] | None = None, seed: int = 0, pruner: str = "median", pruner_startup: int = 2,
              heartbeat: int = 10, grace: int | None = None, enqueue: list[dict[str, Any]] | None = None,
              devices: list[str] | None = None, verbose: bool = True, data: str | os.PathLike | None = None) -> optuna.Study:
    """Validate the space, create (or resume) the study, run ``workers`` workers, return the study.

    ``enqueue``: configurations ({knob: value}, knobs left out are sampled) queued before the sampler's, once
    (a resumed study does not queue them again). One worker runs in this process; more run as child
    processes (``workbench sweep --join``), each with cpu_count // workers torch threads. ``devices``: CUDA device
    indices (:func:`parse_devices`), one child worker per device that sees only its own GPU
    (``CUDA_VISIBLE_DEVICES``), so ``train.device = "auto"`` puts each worker's trials on its own device; it
    replaces ``workers``. ``data``: a dataset folder the trials train on instead of simulated scenes (one worker in
    this process only; the space's config must carry the dataset's system). Every check on the input happens before
    any trial starts."""
    if data is not None and (workers != 1 or devices is not None):
        raise ConfigError(f"data = '{data}': training on a dataset runs with workers = 1 and no devices (got workers = {workers}, "
                          f"devices = {devices})")
    for name, v, lo in (("trials", trials, 1), ("epochs", epochs, 1), ("n_train", n_train, 1), ("n_val", n_val, 1), ("workers", workers, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} = {v!r}: expected an integer >= {lo}")
    if devices is not None:
        if workers != 1:
            raise ConfigError(f"workers = {workers} with devices = {devices}: devices starts one worker per device; give one of them")
        devices = parse_devices(",".join(devices))
    if not isinstance(space, SearchSpace):
        space = load_space(space, preset_name, {"train.epochs": epochs, "train.n_train": n_train, "train.n_val": n_val, **(overrides or {})})
    for item in enqueue or []:
        space.check_point(item, "enqueue")
    check_heartbeat(heartbeat, grace)
    url = storage or default_storage_url()
    s = create_study(space, url, study, pruner, pruner_startup)
    with storage_errors(url), StorageLock(url):
        for item in enqueue or []:
            s.enqueue_trial(item, skip_if_exists=True)
    if workers == 1 and devices is None:
        run_worker(url, study, trials, worker=0, seed=seed, heartbeat=heartbeat, grace=grace, verbose=verbose, data=data)
    else:
        n = len(devices) if devices is not None else workers
        threads = max(1, (os.cpu_count() or 1) // n)
        envs = [None] * n if devices is None else [{**os.environ, "CUDA_VISIBLE_DEVICES": d} for d in devices]
        procs = [spawn_worker(url, study, trials, worker=i, seed=seed, heartbeat=heartbeat, grace=grace, threads=threads, env=envs[i])
                 for i in range(n)]
        codes = [p.wait() for p in procs]
        if any(codes) and verbose:
            print(f"sweep: worker exit codes {codes}", file=sys.stderr)
    return s


# ---------------------------------------------------------------------------------------------
# summaries
def trials_table(study: optuna.Study) -> list[dict]:
    """One plain dict per trial: number, state, value, params, pruned_reason, nonfinite_steps, worker, seconds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
                     "pruned_reason": t.user_attrs.get("pruned_reason"), "nonfinite_steps": t.user_attrs.get("nonfinite_steps", 0),
                     "worker": t.user_attrs.get("worker"), "error": t.user_attrs.get("error"),
                     "seconds": t.duration.total_seconds() if t.duration else None})
    return rows


def summarize(study: optuna.Study) -> dict:
    """{"study", "counts" (progress_counts), "nonfinite", "best": {"number", "value", "params"} | None}."""
    c = progress_counts(study)
    rows = trials_table(study)
    best = None
    if c["complete"]:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params}
    return {"study": study.study_name, "counts": c, "nonfinite": sum(r["pruned_reason"] == "nonfinite" for r in rows), "best": best}
