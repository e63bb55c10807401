"""A training run on disk: its result, checkpoint files and resumable run folders.

Owns: :class:`TrainResult`, standalone checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`), the checks
every loaded checkpoint passes (:func:`check_same_run`, :func:`load_weights`: the same system and model config,
the same parameter names and shapes, finite weights; a ConfigError naming the checkpoint otherwise) and
:class:`RunFolder`. Must not: train (:mod:`workbench.train` writes and resumes run folders through this module).

Run folders (``workbench train --out DIR``). After every epoch the whole resumable state (weights, optimiser,
scheduler, scaler, epoch counter, RNG states, history, provenance) is written as ``checkpoint.pt`` together with
``history.json`` into a fresh folder ``DIR/.epoch-*``; the symbolic link ``DIR/state`` is then switched to it
with one atomic rename, and ``DIR/history.json`` and ``DIR/checkpoint.pt`` are links through ``state``. So the two
files always describe the same epoch of the same run, whenever the process is killed. A run folder has one writer at a
time: :meth:`RunFolder.lock` takes an exclusive ``flock`` on ``DIR/.lock`` (released when the process ends, however it
ends) and a second writer gets a ConfigError naming the holder's PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ExperimentConfig, resolve_device
from .io import atomic_torch_save, atomic_write_json, dir_mode, fsync_dir
from .model import CovarianceNet, build_model


@dataclass
class TrainResult:
    history: list[dict]
    provenance: list[dict]
    model: CovarianceNet
    config: ExperimentConfig
    extra: dict = field(default_factory=dict)


CHECKPOINT_FORMAT = 2
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
STATE_LINK = "state"
LOCK_FILE = ".lock"


def check_same_run(saved: ExperimentConfig, cfg: ExperimentConfig, where: str) -> None:
    """ConfigError unless ``cfg`` has the system and model config ``saved`` was trained with (naming each difference)."""
    diffs = []
    for section in ("system", "model"):
        have, want = getattr(saved, section).to_dict(), getattr(cfg, section).to_dict()
        diffs += [f"{section}.{k}: checkpoint {have[k]!r} != requested {want[k]!r}" for k in want if have.get(k) != want[k]]
    if diffs:
        raise ConfigError(f"{where} was trained with another system or model config ({'; '.join(diffs)}); "
                          "resume with the run's own configuration, or start a new run in another folder")


def load_weights(model: CovarianceNet, state: Any, where: str) -> None:
    """Load ``state`` into ``model`` after checking it: the same parameter names and shapes, every value finite.
    ConfigError naming the checkpoint and the offending keys otherwise (never a shape traceback)."""
    if not isinstance(state, dict):
        raise ConfigError(f"{where}: the weights are a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own if k in state
              and (not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing keys {_few(missing)}" if missing else "", f"unexpected keys {_few(unexpected)}" if unexpected else "",
                 f"shape mismatch {_few(shapes)}" if shapes else ""]
        raise ConfigError(f"{where}: the weights do not fit this model (another architecture or version?): "
                          + "; ".join(p for p in parts if p))
    bad = [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"{where}: non-finite weights (NaN/inf) in {_few(bad)}; refusing to load them")
    model.load_state_dict(state)


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _read_payload(path: Path) -> dict:
    """A checkpoint file's payload with its config checked; ConfigError for a missing, truncated or foreign file."""
    if not path.is_file():
        raise ConfigError(f"checkpoint = {str(path)!r}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        ExperimentConfig.from_json(payload["config"])
    except ConfigError:
        raise
    except Exception as e:  # truncated or foreign files raise many different errors
        raise ConfigError(f"checkpoint = {str(path)!r}: not a readable workbench checkpoint ({type(e).__name__}: {e})") from e
    if "model" not in payload:
        raise ConfigError(f"checkpoint = {str(path)!r}: holds no weights (no 'model' entry)")
    return payload


def save_checkpoint(path: str | Path, result: TrainResult) -> Path:
    """A standalone checkpoint of a finished run (weights, config, history; not resumable), written atomically;
    loadable with weights_only=True. ``workbench train`` writes resumable ones into its run folder."""
    payload = {"model": result.model.state_dict(), "config": result.config.to_json(), "history": json.dumps(result.history),
               "provenance": json.dumps(result.provenance), "format": CHECKPOINT_FORMAT}
    return atomic_torch_save(path, payload)


def load_checkpoint(path: str | Path, device=None) -> TrainResult:
    """A checkpoint file (standalone, or a run folder's ``checkpoint.pt``) as a TrainResult, after the checks of
    :func:`load_weights`, its model on ``device`` (default: the run's own ``train.device``, resolved: "auto" is CUDA
    when present, so a model trained on CUDA is evaluated there)."""
    path = Path(path)
    payload = _read_payload(path)
    cfg = ExperimentConfig.from_json(payload["config"])
    model = build_model(cfg.system, cfg.model)
    load_weights(model, payload["model"], f"checkpoint = {str(path)!r}")
    return TrainResult(history=json.loads(payload["history"]), provenance=json.loads(payload["provenance"]),
                       model=model.to(resolve_device(cfg.train.device if device is None else device)), config=cfg)


def check_out_folder(path: Path) -> None:
    """ConfigError unless ``path`` is a folder (created if missing) in which a file can be written: checked before
    any training, so a bad ``--out`` never costs a run."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out = '{path}' is a file, not a folder: give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--out = '{path}' is not a writable folder ({type(e).__name__}: {e.strerror or e})") from None


class RunFolder:
    """A training run folder (module docstring): ``checkpoint.pt`` and ``history.json`` switched together."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / STATE_LINK / CHECKPOINT_FILE

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder's writer lock for the block (an exclusive flock on ``DIR/.lock``, holding the PID);
        ConfigError "in use by PID n" when another process holds it. Released on exit, or when the process dies."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise ConfigError(f"run folder '{self.path}' is in use by PID {holder} (another workbench train writing into it); "
                                  "wait for it to finish, or use another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def check_writable(self) -> None:
        """ConfigError unless the folder exists or can be created, accepts files, and is not an older layout."""
        p = self.path
        check_out_folder(p)
        for name in (HISTORY_FILE, CHECKPOINT_FILE):
            if (p / name).exists() and not (p / name).is_symlink():
                raise ConfigError(f"--out = '{p}' holds a {name} of an older workbench (a plain file, not a run folder of this "
                                  "version); give another --out or move the old files away")

    def read(self) -> dict:
        """The checkpoint payload of the last complete epoch; ConfigError if the folder holds none."""
        if not self.checkpoint.is_file():
            raise ConfigError(f"--resume '{self.path}': no run to resume ({STATE_LINK}/{CHECKPOINT_FILE} is missing)")
        return _read_payload(self.checkpoint)

    def config(self) -> ExperimentConfig:
        return ExperimentConfig.from_json(self.read()["config"])

    def write(self, payload: dict, history: dict) -> None:
        """Write the epoch's checkpoint and history into a fresh folder, then switch ``state`` to it (atomic)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._clean()
        folder = Path(tempfile.mkdtemp(prefix=f".epoch-{payload['epoch']:05d}-", dir=self.path))
        atomic_torch_save(folder / CHECKPOINT_FILE, payload)
        atomic_write_json(folder / HISTORY_FILE, history)
        os.chmod(folder, dir_mode())  # mkdtemp makes it private; the umask decides who may read it
        for name in (HISTORY_FILE, CHECKPOINT_FILE):
            _symlink(self.path / name, f"{STATE_LINK}/{name}")  # once per folder; dangling until the first switch
        _symlink(self.path / STATE_LINK, folder.name)  # the switch
        self._clean()

    def _clean(self) -> None:
        """Remove epoch folders that ``state`` does not point to (the previous epoch's, or a killed write's)."""
        link = self.path / STATE_LINK
        current = os.readlink(link) if link.is_symlink() else None
        for p in self.path.glob(".epoch-*"):
            if p.name != current and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        for p in self.path.glob(".link.*.tmp"):
            p.unlink(missing_ok=True)


def _symlink(path: Path, target: str) -> None:
    """Make ``path`` a symbolic link to ``target`` with one atomic rename (nothing to do when it already is)."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    tmp = path.parent / f".link.{uuid.uuid4().hex}.tmp"
    os.symlink(target, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
