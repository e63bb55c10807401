"""Datasets of simulated scenes on disk, with a manifest and integrity checks.

A dataset is a folder (conventionally under ``data/``) holding

* ``scenes-<first 16 hex digits of its SHA-256>.bin`` (format 3): the :class:`~workbench.physics.SceneBatch`
  tensors as raw little-endian arrays, one contiguous region per tensor (:func:`layout`; nothing is pickled), except
  ``R_true``, which is a function of the stored source parameters and is recomputed on load with
  :func:`~workbench.physics.source_covariance` (it would be ~80 % of the file: N^2 entries per scene). Format 2
  (one ``torch.save`` file ``scenes-<hash>.pt``) is still read;
* ``manifest.json``: format version, the :class:`~workbench.config.SystemConfig` as a dict, seed, n, chunk,
  package version, the scene file's name, SHA-256 and size, the tensors' shapes, dtypes and offsets, creation
  time (UTC), and ``digest``: the SHA-256 of everything else in the manifest, so an edited configuration
  (``carrier_hz``, ``N_H``, ...) is detected like an edited scene file.

Bounded memory. :func:`generate` simulates ``chunk`` scenes at a time and writes each into its place in the scene
file before simulating the next (R_true dropped), so its memory is that of one chunk whatever ``n``; the disk
space (:func:`dataset_bytes`) is checked against the free space before anything is simulated, and claimed with
``posix_fallocate`` where the file system supports it.

Writing. A new dataset is streamed into a temporary folder ``.<name>.*.tmp`` beside the target and moved into
place with one rename. ``force`` replaces an existing dataset in place: the new scene file is streamed into a
temporary file inside it, then renamed to its own (content-derived) name, then ``manifest.json`` is replaced
atomically (the switch), then the old scene file is removed; a crash at any moment leaves the old or the new
dataset, complete, at the path. Only files the workbench writes (``manifest.json``, ``scenes-*.bin``/``.pt``, its
temporary files) are ever removed: anything else in
the folder stays. Leftovers of a crashed write (temporary folders and files, an unreferenced scene file) are
removed by the next write to the same path (never those of a live writer: it holds a flock on its temporary
folder and file, and cleaners skip locked ones). The switches into one parent folder are serialised by a lock on
it; simulating and streaming run outside that lock. Files and folders follow the user's umask
(:func:`workbench.io.file_mode`).

Loading (and ``workbench data check``) verifies, in order: the manifest's structure and digest, the stored
config (valid, and equal to the expected one when given), the scene file's size and SHA-256 (before reading
anything from it), the layout (known dtypes, regions inside the file), the tensors' names and shapes, and the
scenes themselves with :func:`check_scenes` (finite values, source counts within [K_min, K_max], masks matching K). Every failure
raises :class:`DatasetError` (a :class:`~workbench.config.ConfigError`) naming the path, and the scene where
one is at fault.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .checks import check_K
from .config import ConfigError, SystemConfig
from .io import atomic_write_text, dir_mode, dumps_json, file_mode, fsync_dir
from .physics import SceneBatch, scene_seed, simulate, source_covariance

FORMAT = 3
READABLE_FORMATS = (2, 3)  # format 2: one torch.save file scenes-<hash>.pt (read, never written)
MANIFEST_FILE = "manifest.json"
SCENES_FILE = re.compile(r"scenes-[0-9a-f]{16}\.(bin|pt)")  # the scene file's name (.bin format 3, .pt format 2); format 1 used "scenes.pt"
LEGACY_SCENES_FILE = "scenes.pt"
TEMPORARY = re.compile(r"\.(scenes|manifest\.json)\..+\.tmp")  # this module's temporary files inside a dataset
RECOMPUTED = ("R_true",)  # SceneBatch fields not stored, rebuilt on load
STORED = tuple(name for name in SceneBatch.__dataclass_fields__ if name not in RECOMPUTED)


class DatasetError(ConfigError):
    """A dataset on disk is missing, corrupt, truncated, mismatched, or would be overwritten."""


def _sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its ``digest`` entry (what the digest covers)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_dataset(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def _ours(name: str) -> bool:
    """A file name this module writes inside a dataset folder (only these are ever removed)."""
    return name == MANIFEST_FILE or name == LEGACY_SCENES_FILE or bool(SCENES_FILE.fullmatch(name) or TEMPORARY.fullmatch(name))


# ---------------------------------------------------------------------------------------------
# scene checks: one definition of a valid stored scene, used on save, on load and by train.fit
def _expected_shapes(system: SystemConfig, n: int) -> dict[str, tuple[int, ...]]:
    s, k = system, system.K_max
    return {"y": (n, s.L, s.M), "signal": (n, s.L, s.M), "H": (n, s.M, s.N), "codes": (n, s.L, s.N), "R_true": (n, s.N, s.N),
            "K": (n,), "phi": (n, k), "theta": (n, k), "r": (n, k), "power": (n, k), "mask": (n, k), "snr_db": (n,), "noise_var": (n,)}


def check_scenes(scenes: SceneBatch | dict[str, torch.Tensor], system: SystemConfig, where: str = "scenes") -> None:
    """DatasetError unless every scene is valid for ``system``: tensors of the expected shapes, every value finite
    (y, H, r, ...), K within [system.K_min, system.K_max] and the mask marking exactly the first K slots.

    The message names ``where`` (e.g. the dataset path) and the index of the first bad scene in it."""
    tensors = scenes.tensors() if isinstance(scenes, SceneBatch) else scenes
    n = tensors["K"].shape[0] if isinstance(tensors.get("K"), torch.Tensor) and tensors["K"].ndim else 0
    if n == 0:
        raise DatasetError(f"{where}: holds no scenes")
    for name, shape in _expected_shapes(system, n).items():
        t = tensors.get(name)
        if t is None and name in RECOMPUTED:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise DatasetError(f"{where}: {name} has shape {got}, expected {shape} for {n} scenes of this system config")
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t).reshape(n, -1).all(-1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise DatasetError(f"{where}: scene {i}: {name} has non-finite values (NaN/inf)")
    try:
        K = check_K(tensors["K"], n, system.N, name="K", k_min=system.K_min, k_max=system.K_max)
    except ConfigError as e:
        raise DatasetError(f"{where}: {e} (system.K_min = {system.K_min}, system.K_max = {system.K_max})") from None
    slots = torch.arange(system.K_max, device=K.device)[None, :] < K[:, None]
    bad = (tensors["mask"].to(torch.bool) != slots).any(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise DatasetError(f"{where}: scene {i}: the source mask does not mark exactly the first K = {int(K[i])} slots")


# ---------------------------------------------------------------------------------------------
# the scene file: raw little-endian arrays, one region per stored tensor (no pickle)
DTYPES = {"y": torch.complex64, "signal": torch.complex64, "H": torch.complex64, "codes": torch.complex64, "K": torch.int64,
          "phi": torch.float32, "theta": torch.float32, "r": torch.float32, "power": torch.float32, "mask": torch.bool,
          "snr_db": torch.float32, "noise_var": torch.float32}  # the stored tensors' dtypes (simulate's output)
_NP = {"complex64": np.complex64, "float32": np.float32, "int64": np.int64, "bool": np.uint8}  # bool stored as one byte 0/1
SPACE_MARGIN = 1 << 20  # bytes kept free beyond the dataset's own size (manifest, folder entries)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout(system: SystemConfig, n: int) -> dict[str, dict]:
    """The scene file's layout for ``n`` scenes of ``system``: ``{name: {"shape", "dtype", "offset"}}`` in STORED
    order, each tensor one contiguous C-order region; the file is exactly :func:`layout_bytes` long."""
    shapes, out, offset = _expected_shapes(system, n), {}, 0
    for name in STORED:
        shape, dtype = shapes[name], DTYPES[name]
        out[name] = {"shape": list(shape), "dtype": _dtype_name(dtype), "offset": offset}
        offset += math.prod(shape) * dtype.itemsize
    return out


def layout_bytes(lay: dict[str, dict]) -> int:
    return sum(math.prod(v["shape"]) * np.dtype(_NP[v["dtype"]]).itemsize for v in lay.values())


def dataset_bytes(system: SystemConfig, n: int) -> int:
    """Bytes on disk of a dataset of ``n`` scenes of ``system`` (its scene file; the manifest is a few KB)."""
    return layout_bytes(layout(system, n))


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} TB"


def check_space(out: Path, need: int, what: str = "n") -> None:
    """DatasetError unless the file system of ``out`` has ``need`` bytes (plus a margin) free; names ``what``."""
    where = _existing_ancestor(out)
    free = shutil.disk_usage(where).free
    if need + SPACE_MARGIN > free:
        raise DatasetError(f"{what}: the dataset needs {_fmt_bytes(need)} on disk but only {_fmt_bytes(free)} is free on "
                           f"'{where}'; choose a smaller --n or free disk space")


def _write_chunk(f, lay: dict[str, dict], n_total: int, first: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one chunk's tensors (scenes ``first``...) into their regions of the open scene file ``f``."""
    for name in STORED:
        t = tensors[name]
        if t.dtype != DTYPES[name]:
            raise DatasetError(f"{name}: simulate returned {_dtype_name(t.dtype)}, the dataset format stores {_dtype_name(DTYPES[name])}")
        a = t.detach().cpu().contiguous().numpy()
        if a.dtype == np.bool_:
            a = a.view(np.uint8)
        per_scene = a[:1].nbytes if len(a) else 0
        f.seek(lay[name]["offset"] + first * per_scene)
        f.write(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    """Hold an exclusive flock on ``fd`` (a temporary file or folder being written): cleaners skip it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield


def _in_use(path: Path) -> bool:
    """True when another open file description holds a flock on ``path`` (a live writer's temporary file/folder)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _writer_lock(parent: Path) -> Iterator[None]:
    """Serialise dataset switches into ``parent`` (an exclusive flock on the folder itself, released on exit or death)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (concurrent writers to one parent folder are then not protected)
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_target(out: Path, force: bool) -> None:
    """Refuse an existing target without ``force``; never replace something that is not a dataset."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"out = '{out}' exists and is a file, not a dataset folder; choose another path")
    if not _is_dataset(out) and any(out.iterdir()):
        raise DatasetError(f"out = '{out}' is a non-empty folder that is not a workbench dataset; not overwriting it, even with --force")
    if _is_dataset(out) and not force:
        raise DatasetError(f"out = '{out}' already holds a dataset; pass --force (force=True) to replace it")


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """The switch: ``manifest.json`` with its digest, replaced atomically."""
    atomic_write_text(folder / MANIFEST_FILE, dumps_json({**manifest, "digest": manifest_digest(manifest)}))


def _remove_unreferenced(folder: Path) -> None:
    """Remove this module's files in a dataset folder that its manifest does not reference (a replaced scene file,
    temporary files of a crashed write). Files of any other name, and a live writer's temporary file, are never touched."""
    try:
        keep = set(json.loads((folder / MANIFEST_FILE).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return  # an unreadable manifest: leave everything for `data check` to report
    for p in folder.iterdir():
        if p.is_file() and p.name != MANIFEST_FILE and p.name not in keep and _ours(p.name) and not _in_use(p):
            p.unlink(missing_ok=True)


def _clean_leftovers(out: Path) -> None:
    """Before a write to ``out``: remove temporary folders of crashed writes beside it (``.<name>.*.tmp``/``.old``,
    when they hold only this module's files and no live writer holds them) and unreferenced files of this module inside it."""
    for p in list(out.parent.glob(f".{out.name}.*.tmp")) + list(out.parent.glob(f".{out.name}.*.old")):
        if p.is_dir() and all(q.is_file() and _ours(q.name) for q in p.iterdir()) and not _in_use(p):
            shutil.rmtree(p, ignore_errors=True)
    if _is_dataset(out):
        _remove_unreferenced(out)


def _manifest(lay: dict, n: int, system: SystemConfig, seed: int, chunk: int | None, name: str, info: dict) -> dict:
    return {
        "format": FORMAT,
        "config": system.to_dict(),
        "seed": int(seed),
        "n": int(n),
        "chunk": chunk,
        "version": __version__,
        "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {name: info},
        "tensors": lay,
        "recomputed": list(RECOMPUTED),
    }


def _stream(out: Path, system: SystemConfig, n: int, seed: int, chunk: int | None, chunks: Iterable[dict[str, torch.Tensor]],
            force: bool) -> Path:
    """The one writer: stream ``chunks`` (dicts of the STORED tensors, valid scenes, ``n`` in all) into a scene file,
    then switch it in with the protocol of the module docstring. Holds one chunk in memory at a time."""
    lay = layout(system, n)
    total = layout_bytes(lay)
    check_space(out, total)
    out.parent.mkdir(parents=True, exist_ok=True)
    replacing = _is_dataset(out)
    # where the scene file is streamed: inside the dataset being replaced, or a temporary folder beside a new one
    folder = out if replacing else Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    folder_fd = os.open(folder, os.O_RDONLY) if not replacing else None
    fd, tmp = tempfile.mkstemp(prefix=".scenes.", suffix=".tmp", dir=folder)
    tmp = Path(tmp)
    try:
        with contextlib.ExitStack() as stack:
            if folder_fd is not None:
                stack.enter_context(_locked(folder_fd))
            stack.enter_context(_locked(fd))
            with os.fdopen(os.dup(fd), "wb") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, total)  # claims the space now: a full disk fails here, not at the end
                except (AttributeError, OSError) as e:
                    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                        raise
                written = 0
                for tensors in chunks:
                    m = int(tensors["K"].shape[0])
                    if written + m > n:
                        raise DatasetError(f"out = '{out}': more than n = {n} scenes were given")
                    _write_chunk(f, lay, n, written, tensors)
                    written += m
                if written != n:
                    raise DatasetError(f"out = '{out}': {written} scenes were given, n = {n} expected")
                f.flush()
                os.fsync(f.fileno())
            info = {"sha256": _sha256(tmp), "bytes": tmp.stat().st_size}
            name = f"scenes-{info['sha256'][:16]}.bin"
            os.chmod(tmp, file_mode())  # mkstemp makes it private; a dataset follows the user's umask
            with _writer_lock(out.parent):
                _check_target(out, force)  # again: another writer may have created it meanwhile
                _clean_leftovers(out)
                if replacing != _is_dataset(out):
                    raise DatasetError(f"out = '{out}' was created or removed by another process while this one wrote; run again")
                os.replace(tmp, folder / name)
                tmp.unlink(missing_ok=True)
                if replacing:  # new file beside the old one, switch the manifest, remove the old file
                    fsync_dir(out)
                    _write_manifest(out, _manifest(lay, n, system, seed, chunk, name, info))
                    _remove_unreferenced(out)
                else:  # complete in the temporary folder, then one rename
                    _write_manifest(folder, _manifest(lay, n, system, seed, chunk, name, info))
                    os.chmod(folder, dir_mode())  # mkdtemp makes it private; a dataset folder follows the user's umask
                    os.replace(folder, out)  # `out` is absent or an empty folder
                    fsync_dir(out.parent)
    finally:
        os.close(fd)
        if folder_fd is not None:
            os.close(folder_fd)
        tmp.unlink(missing_ok=True)
        if not replacing and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
    return out


def save_dataset(batch: SceneBatch, system: SystemConfig, seed: int, out: str | os.PathLike, force: bool = False,
                 chunk: int | None = None) -> Path:
    """Write ``batch`` (simulated from ``system`` with ``seed``) as a dataset folder ``out``, crash-safely.

    Raises DatasetError if ``out`` already holds a dataset and ``force`` is False, if it is something other
    than a dataset, or if a scene is invalid (:func:`check_scenes`). Returns ``out``."""
    if not isinstance(batch, SceneBatch):
        raise DatasetError(f"batch: expected a SceneBatch, got {type(batch).__name__}")
    if not isinstance(system, SystemConfig):
        raise DatasetError(f"system: expected a SystemConfig, got {type(system).__name__}")
    out = Path(out)
    _check_target(out, force)
    tensors = {name: t.detach().cpu().contiguous() for name, t in batch.tensors().items() if name in STORED}
    check_scenes(tensors, system, f"batch for '{out}'")
    return _stream(out, system, len(batch), seed, chunk, [tensors], force)


# ---------------------------------------------------------------------------------------------
# reading
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The verified manifest of the dataset folder ``path``: well-formed, of this format, listing one scene file,
    and unaltered (its digest matches). The scene file itself is verified by :func:`load_dataset`."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset '{path}' does not exist or is not a folder")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} is missing (not a dataset, or an interrupted copy)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} is corrupt ({e})") from None
    missing = [k for k in ("format", "config", "seed", "n", "files") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} lacks {', '.join(missing)}")
    if manifest["format"] not in READABLE_FORMATS:
        raise DatasetError(f"dataset '{path}': format {manifest['format']!r} is not supported (expected one of {READABLE_FORMATS}; "
                           "format 1 had no manifest checksum: generate the dataset again)")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} lists no scene file (files is empty): an incomplete dataset")
    if len(files) != 1 or not SCENES_FILE.fullmatch(next(iter(files))):
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} must list exactly one scene file named scenes-<hash>.bin, got {sorted(files)}")
    if manifest.get("digest") != manifest_digest(manifest):
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} was altered after it was written (its digest does not match its "
                           "content, e.g. an edited config); generate the dataset again")
    return manifest


def scenes_file(path: str | os.PathLike) -> Path:
    """The path of a dataset's scene file (as its verified manifest names it)."""
    return Path(path) / next(iter(read_manifest(path)["files"]))


def dataset_system(path: str | os.PathLike) -> SystemConfig:
    """The SystemConfig a dataset was generated with."""
    try:
        return SystemConfig.from_dict(read_manifest(path)["config"])
    except DatasetError:
        raise
    except ConfigError as e:
        raise DatasetError(f"dataset '{path}': the stored config is invalid: {e}") from None


def _check_system(path: Path, stored: SystemConfig, system: SystemConfig | None) -> None:
    if system is None:
        return
    if not isinstance(system, SystemConfig):
        raise DatasetError(f"system: expected a SystemConfig, got {type(system).__name__}")
    if system != stored:
        want, have = system.to_dict(), stored.to_dict()
        diff = ", ".join(f"{k}: dataset {have[k]!r} != expected {want[k]!r}" for k in want if want[k] != have.get(k))
        raise DatasetError(f"dataset '{path}' was generated with another system config ({diff})")


def _read_tensors(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The scene file's tensors, after its size and SHA-256 match the manifest (nothing unpickled before)."""
    name, info = next(iter(manifest["files"].items()))
    spath = path / name
    if not spath.is_file():
        raise DatasetError(f"dataset '{path}': {name} is missing")
    size = spath.stat().st_size
    if size != info.get("bytes"):
        raise DatasetError(f"dataset '{path}': {name} is truncated or altered ({size} bytes, manifest says {info.get('bytes')})")
    if _sha256(spath) != info.get("sha256"):
        raise DatasetError(f"dataset '{path}': {name} is corrupt (SHA-256 does not match the manifest)")
    if manifest["format"] == 2:
        try:
            tensors = torch.load(spath, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise DatasetError(f"dataset '{path}': {name} cannot be read ({type(e).__name__}: {e})") from None
    else:
        tensors = _read_raw(path, spath, manifest.get("tensors"))
    if not isinstance(tensors, dict) or set(tensors) != set(STORED):
        keys = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise DatasetError(f"dataset '{path}': {name} holds {keys}, expected {sorted(STORED)}")
    n = manifest["n"]
    bad = [k for k, t in tensors.items() if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != n]
    if bad:
        raise DatasetError(f"dataset '{path}': tensors {', '.join(bad)} do not hold n = {n} scenes")
    return tensors


def _read_raw(path: Path, spath: Path, lay: Any) -> dict[str, torch.Tensor]:
    """The tensors of a format-3 scene file as the manifest's layout describes them (regions inside the file, known dtypes)."""
    if not isinstance(lay, dict) or not all(isinstance(v, dict) for v in lay.values()):
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} has no tensor layout")
    size, out = spath.stat().st_size, {}
    for name, v in lay.items():
        shape, dtype, offset = v.get("shape"), v.get("dtype"), v.get("offset")
        if (dtype not in _NP or not isinstance(offset, int) or offset < 0 or not isinstance(shape, list)
                or not all(isinstance(d, int) and d >= 0 for d in shape)):
            raise DatasetError(f"dataset '{path}': {MANIFEST_FILE}: tensor {name!r} has an invalid layout {v}")
        count = math.prod(shape)
        if offset + count * np.dtype(_NP[dtype]).itemsize > size:
            raise DatasetError(f"dataset '{path}': tensor {name!r} lies beyond the end of {spath.name}")
        a = np.fromfile(spath, dtype=np.dtype(_NP[dtype]).newbyteorder("<"), count=count, offset=offset).reshape(shape)
        out[name] = torch.from_numpy(a != 0) if dtype == "bool" else torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=False))
    return out


def load_dataset(path: str | os.PathLike, system: SystemConfig | None = None, device: str | torch.device = "cpu") -> SceneBatch:
    """Load and verify a dataset folder (every check of the module docstring); ``system`` (optional) must equal
    the stored config. Returns a SceneBatch on ``device`` with R_true recomputed from the source parameters."""
    path = Path(path)
    manifest = read_manifest(path)
    stored = dataset_system(path)
    _check_system(path, stored, system)
    tensors = _read_tensors(path, manifest)
    check_scenes(tensors, stored, f"dataset '{path}'")
    dev = torch.device(device)
    tensors = {k: t.to(dev) for k, t in tensors.items()}
    R_true = source_covariance(stored, tensors["phi"], tensors["theta"], tensors["r"], tensors["power"], tensors["mask"])
    return SceneBatch(**tensors, R_true=R_true)


def chunk_seed(seed: int, index: int) -> int:
    """The simulate() seed of chunk ``index`` of a dataset with ``seed``: :func:`~workbench.physics.scene_seed`."""
    return scene_seed(seed, index)


def generate(system: SystemConfig, n: int, out: str | os.PathLike, seed: int = 0, force: bool = False,
             progress: bool = True, chunk: int = 1024, device: str | torch.device = "cpu") -> Path:
    """Simulate ``n`` scenes in chunks of ``chunk`` (chunk i uses ``chunk_seed(seed, i)``) and stream them into the
    dataset ``out``, one chunk in memory at a time (R_true, which simulate returns, is dropped per chunk: it is
    rebuilt on load). A progress bar shows scenes per second. Fails before simulating if ``out`` exists without
    ``force``, or if the dataset (:func:`dataset_bytes`) would not fit the free disk."""
    for name, value, lo in (("n", n, 1), ("chunk", chunk, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise DatasetError(f"{name} = {value!r}: expected an integer >= {lo}")
    if not isinstance(system, SystemConfig):
        raise DatasetError(f"system: expected a SystemConfig, got {type(system).__name__}")
    out = Path(out)
    _check_target(out, force)
    check_space(out, dataset_bytes(system, n), what=f"n = {n}")

    def chunks() -> Iterator[dict[str, torch.Tensor]]:
        with tqdm(total=n, unit="scene", unit_scale=True, desc=f"generate {out.name}", disable=not progress, file=sys.stderr,
                  smoothing=0.1) as bar:
            for i, s in enumerate(range(0, n, chunk)):
                m = min(chunk, n - s)
                batch = simulate(system, m, seed=chunk_seed(seed, i), device=device, chunk=m)
                tensors = {k: t.detach().cpu().contiguous() for k, t in batch.tensors().items() if k in STORED}
                del batch  # R_true goes with it
                check_scenes(tensors, system, f"generated scenes {s}..{s + m - 1} for '{out}'")
                yield tensors
                bar.update(m)

    return _stream(out, system, n, seed, chunk, chunks(), force)
