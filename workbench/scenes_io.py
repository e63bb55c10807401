"""Scenes from outside the simulator: reading a user's scene file and importing it as a dataset.

The format is documented in ``docs/data-format.md``: a NumPy ``.npz``, a MATLAB ``.mat`` (read with
``scipy.io.loadmat``; MATLAB v7.3 files are HDF5: save them with ``-v7`` or write an ``.h5`` from Python) or an
HDF5 ``.h5``/``.hdf5`` file (h5py; datasets at the root) holding

* ``y`` [n,L,M] complex received snapshots, ``H`` [n,M,N] complex BS-RIS channel, ``codes`` [n,L,N] complex
  unit-modulus RIS configurations (|c| = 1 within :data:`UNIT_TOL`);
* ``N_H``, ``N_V`` (scalars, N_H * N_V = N) and optionally any other :class:`~workbench.config.SystemConfig`
  field as a scalar (``carrier_hz``, ``spacing_wavelengths``, ...; defaults otherwise). ``L`` and ``M`` are
  implied by the shapes (given ones must agree); ``K_max`` by the truth's second dimension;
* the optional truth: ``K`` [n] integer source counts, ``phi``, ``theta`` [n,K_max] radians, ``r`` [n,K_max]
  metres, ``power`` [n,K_max] mW, ``noise_var`` [n] mW per complex entry, and optionally ``snr_db`` [n].
  Slots at or beyond a scene's K are padding: they are ignored (NaN is allowed there) and stored as 0.

Owns: :func:`read_scene_file` (every check, each failing with a ConfigError naming the file and the field) and
:func:`import_scenes` (the dataset it becomes, through :func:`workbench.data.save_dataset`), :func:`dataset_truth` (whether
an imported dataset has the truth). Must not: simulate
scenes or write dataset files itself (:mod:`workbench.data` does).

Truth: training learns R_true (a function of the truth), so :func:`import_scenes` requires it for now and says
so when it is missing; :func:`read_scene_file` reads a file without it (``truth`` False) for estimators that
need none. The stored scene's ``signal`` (the noise-free part, unknown for measured data) is ``y`` itself.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, SystemConfig
from .io import atomic_write_json

SUFFIXES = (".npz", ".mat", ".h5", ".hdf5")
REQUIRED = ("y", "H", "codes")
TRUTH = ("K", "phi", "theta", "r", "power", "noise_var")
OPTIONAL = ("snr_db",)
UNIT_TOL = 1e-3  # | |c| - 1 | allowed for a RIS configuration entry (float32 phases written by other tools)
IMPORT_FILE = "import.json"  # beside an imported dataset's manifest: where it came from


@dataclass
class SceneFile:
    """What :func:`read_scene_file` returns: ``tensors`` (y, H, codes complex64; with the truth also K int64,
    phi, theta, r, power float32 [n,K_max], mask bool [n,K_max], noise_var, snr_db float32 [n]), the
    ``system`` the file implies, and ``truth`` (whether the truth fields were there)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    system: SystemConfig
    truth: bool

    def __len__(self) -> int:
        return int(self.tensors["y"].shape[0])


def _fail(path: Path, name: str, message: str) -> ConfigError:
    return ConfigError(f"scene file '{path}': {name}: {message} (see docs/data-format.md)")


def _load_arrays(path: Path) -> dict[str, Any]:
    """{name: numpy value} of the file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"scene file '{path}': unknown suffix {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ConfigError(f"scene file '{path}' does not exist or is not a file")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".mat":
            from scipy.io import loadmat

            return {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
        import h5py

        with h5py.File(path, "r") as f:
            return {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
    except ConfigError:
        raise
    except Exception as e:  # each reader has its own exception types for a file that is not what it says
        raise ConfigError(f"scene file '{path}': cannot be read as {suffix} ({type(e).__name__}: {e})") from None


def _scalar(path: Path, name: str, value: Any) -> Any:
    a = np.asarray(value)
    if a.size != 1:
        raise _fail(path, name, f"expected a scalar, got an array of shape {a.shape}")
    v = a.reshape(()).item()
    if isinstance(v, bytes):
        v = v.decode()
    return v


def _vector(path: Path, name: str, value: Any, n: int) -> np.ndarray:
    """An [n] vector; MATLAB's [1,n] and [n,1] are accepted."""
    a = np.asarray(value)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.shape != (n,):
        raise _fail(path, name, f"has shape {a.shape}, expected ({n},): one value per scene")
    return a


def _real(path: Path, name: str, a: np.ndarray, finite_mask: np.ndarray | None = None) -> np.ndarray:
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise _fail(path, name, f"has dtype {a.dtype}, expected real numbers")
    a = a.astype(np.float64)
    check = a if finite_mask is None else a[finite_mask]
    if not np.isfinite(check).all():
        raise _fail(path, name, "has non-finite values (NaN/inf)" + (" in a source slot below K" if finite_mask is not None else ""))
    return a


def _complex_array(path: Path, name: str, value: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype.names and set(a.dtype.names) >= {"r", "i"}:  # HDF5 compound complex written by other tools
        a = a["r"] + 1j * a["i"]
    if not (np.issubdtype(a.dtype, np.complexfloating) or np.issubdtype(a.dtype, np.floating)):
        raise _fail(path, name, f"has dtype {a.dtype}, expected complex numbers")
    if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
        want = "[" + ",".join("?" if w is None else str(w) for w in shape) + "]"
        raise _fail(path, name, f"has shape {a.shape}, expected {want}")
    if not np.isfinite(a).all():
        bad = int(np.argwhere(~np.isfinite(a).reshape(a.shape[0], -1).all(-1))[0, 0])
        raise _fail(path, name, f"scene {bad} has non-finite values (NaN/inf)")
    return a.astype(np.complex64)


def read_scene_file(path: str | os.PathLike) -> SceneFile:
    """Read and validate a scene file (the format of the module docstring): shapes, dtypes, finite values,
    unit-modulus codes, the system the fields imply, and the truth when present (all of :data:`TRUTH` or none).
    Every failure is a ConfigError naming the file and the field."""
    path = Path(path)
    raw = _load_arrays(path)
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise _fail(path, ", ".join(missing), f"missing; a scene file holds {', '.join(REQUIRED)} (and N_H, N_V), found {', '.join(sorted(raw))}")
    y = _complex_array(path, "y", raw["y"], (None, None, None))
    n, L, M = y.shape
    H = _complex_array(path, "H", raw["H"], (n, M, None))
    N = H.shape[2]
    codes = _complex_array(path, "codes", raw["codes"], (n, L, N))
    off = np.abs(np.abs(codes) - 1.0)
    if off.max() > UNIT_TOL:
        s = int(np.argwhere(off.reshape(n, -1).max(-1) > UNIT_TOL)[0, 0])
        raise _fail(path, "codes", f"scene {s}: entries are not unit-modulus (| |c| - 1 | = {off.max():.3g} > {UNIT_TOL:g})")

    system_fields = {f.name for f in fields(SystemConfig)}
    given = {k: _scalar(path, k, v) for k, v in raw.items() if k in system_fields}
    for k in ("N_H", "N_V"):
        if k not in given:
            raise _fail(path, k, f"missing: the RIS's {'horizontal' if k == 'N_H' else 'vertical'} element count is needed "
                                 f"(N_H * N_V = N = {N} from H's shape)")
    for k, v in {"L": L, "M": M}.items():
        if k in given and int(given[k]) != v:
            raise _fail(path, k, f"= {given[k]} but y's shape {y.shape} implies {v}")
    cfg: dict[str, Any] = {**given, "L": L, "M": M}
    for k in ("N_H", "N_V", "K_min", "K_max", "phase_bits"):
        if k in cfg:
            cfg[k] = int(cfg[k])
    if cfg["N_H"] * cfg["N_V"] != N:
        raise _fail(path, "N_H, N_V", f"N_H * N_V = {cfg['N_H']} * {cfg['N_V']} = {cfg['N_H'] * cfg['N_V']} but H has N = {N} columns")

    tensors = {"y": torch.from_numpy(y), "H": torch.from_numpy(H), "codes": torch.from_numpy(codes)}
    present = [k for k in TRUTH if k in raw]
    if present and len(present) < len(TRUTH):
        lacking = [k for k in TRUTH if k not in raw]
        raise _fail(path, ", ".join(lacking), f"missing: the truth is all of {', '.join(TRUTH)} or none (found {', '.join(present)})")
    truth = bool(present)
    if truth:
        K = np.asarray(raw["K"])
        K = _vector(path, "K", K, n)
        if not (np.issubdtype(K.dtype, np.integer) or (np.issubdtype(K.dtype, np.floating) and np.all(np.isfinite(K)) and np.all(K == np.round(K)))):
            raise _fail(path, "K", f"has dtype {K.dtype} or non-integer values, expected integer source counts")
        K = K.astype(np.int64)
        phi = np.asarray(raw["phi"])
        if phi.ndim == 1 and n == 1:
            phi = phi[None, :]
        if phi.ndim != 2 or phi.shape[0] != n:
            raise _fail(path, "phi", f"has shape {phi.shape}, expected [{n},K_max]")
        K_max = phi.shape[1]
        if "K_max" in cfg and cfg["K_max"] != K_max:
            raise _fail(path, "K_max", f"= {cfg['K_max']} but phi's shape {phi.shape} implies {K_max}")
        cfg["K_max"] = K_max
        cfg.setdefault("K_min", max(1, min(int(K.min()), K_max)))
        if K.min() < 1 or K.max() > K_max:
            raise _fail(path, "K", f"values within [{int(K.min())}, {int(K.max())}], expected within [1, K_max = {K_max}]")
        mask = np.arange(K_max)[None, :] < K[:, None]
        src = {}
        for k in ("phi", "theta", "r", "power"):
            a = np.asarray(raw[k])
            if a.ndim == 1 and n == 1:
                a = a[None, :]
            if a.shape != (n, K_max):
                raise _fail(path, k, f"has shape {a.shape}, expected ({n}, {K_max}) like phi")
            a = np.where(mask, _real(path, k, a, mask), 0.0)
            src[k] = a
        if (src["r"][mask] <= 0).any() or (src["power"][mask] < 0).any():
            raise _fail(path, "r, power" if (src["r"][mask] <= 0).any() else "power", "r must be > 0 m and power >= 0 mW for every source")
        noise_var = _real(path, "noise_var", _vector(path, "noise_var", raw["noise_var"], n))
        if (noise_var <= 0).any():
            raise _fail(path, "noise_var", "must be > 0 (mW per complex entry) in every scene")
        if "snr_db" in raw:
            snr_db = _real(path, "snr_db", _vector(path, "snr_db", raw["snr_db"], n))
        else:  # the measured signal power over the noise (y holds both): 10 log10((mean |y|^2 - noise_var) / noise_var)
            p_y = (np.abs(y.astype(np.complex128)) ** 2).mean((1, 2))
            snr_db = 10 * np.log10(np.maximum(p_y - noise_var, 1e-12 * noise_var) / noise_var)
        lo, hi = float(snr_db.min()), float(snr_db.max())
        cfg.setdefault("snr_db_min", max(-60.0, math.floor(lo)))
        cfg.setdefault("snr_db_max", min(100.0, max(math.ceil(hi), cfg["snr_db_min"])))
        tensors.update(K=torch.from_numpy(K), mask=torch.from_numpy(mask), noise_var=torch.from_numpy(noise_var.astype(np.float32)),
                       snr_db=torch.from_numpy(snr_db.astype(np.float32)),
                       **{k: torch.from_numpy(v.astype(np.float32)) for k, v in src.items()})
    try:
        system = SystemConfig.from_dict(cfg)
    except ConfigError as e:
        raise ConfigError(f"scene file '{path}': the system it implies is invalid: {e}") from None
    return SceneFile(path=path, tensors=tensors, system=system, truth=truth)


def to_scene_batch(scenes: SceneFile):
    """The :class:`~workbench.physics.SceneBatch` of a scene file with its truth: R_true from the source parameters
    (:func:`~workbench.physics.source_covariance`), ``signal`` = ``y`` (the noise-free part is not known)."""
    from .physics import SceneBatch, source_covariance

    if not scenes.truth:
        raise ConfigError(f"scene file '{scenes.path}': K, phi, theta, r, power, noise_var: missing; training and the dataset format "
                          "need the truth (R_true is the training target) for now; see docs/data-format.md")
    t = scenes.tensors
    R_true = source_covariance(scenes.system, t["phi"], t["theta"], t["r"], t["power"], t["mask"])
    return SceneBatch(y=t["y"], signal=t["y"].clone(), H=t["H"], codes=t["codes"], R_true=R_true, K=t["K"], phi=t["phi"],
                      theta=t["theta"], r=t["r"], power=t["power"], mask=t["mask"], snr_db=t["snr_db"], noise_var=t["noise_var"])


def import_scenes(path: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Turn the scene file ``path`` into the dataset folder ``out`` (:func:`workbench.data.save_dataset`, seed 0;
    its manifest holds the implied system config), with ``import.json`` beside the manifest naming the source
    file and its SHA-256. Requires the truth (see the module docstring). Returns ``out``."""
    from .data import save_dataset

    scenes = read_scene_file(path)
    batch = to_scene_batch(scenes)
    out = save_dataset(batch, scenes.system, 0, out, force=force)
    h = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    atomic_write_json(Path(out) / IMPORT_FILE, {"source": str(Path(path).resolve()), "sha256": h, "n": len(scenes), "truth": scenes.truth,
                                                "signal": "y (the noise-free part of imported scenes is not known)"})
    return Path(out)


def dataset_truth(path: str | os.PathLike) -> bool:
    """Whether the dataset folder ``path`` holds the truth (K, phi, theta, r, power, noise_var): a generated dataset
    always does; an imported one says so in its ``import.json`` (True when that file is absent or unreadable, as
    :func:`import_scenes` requires the truth for now). Notebooks refuse a dataset without it, naming ``data``."""
    import json

    try:
        info = json.loads((Path(path) / IMPORT_FILE).read_text())
    except (OSError, ValueError):
        return True
    return bool(info.get("truth", True)) if isinstance(info, dict) else True
