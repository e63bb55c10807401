"""Datasets of simulated scenes on disk, with a manifest and integrity checks.

A dataset is a folder (conventionally under ``data/``) holding

* ``scenes-<first 16 hex digits of its SHA-256>.pt``: ``torch.save`` of a dict of the
  :class:`~workbench.physics.SceneBatch` tensors, except ``R_true``, which is a function of the stored source
  parameters and is recomputed on load with :func:`~workbench.physics.source_covariance` (it would be ~80 % of
  the file: N^2 entries per scene);
* ``manifest.json``: format version, the :class:`~workbench.config.SystemConfig` as a dict, seed, n, chunk,
  package version, the scene file's name, SHA-256 and size, tensor shapes/dtypes, creation time (UTC), and
  ``digest``: the SHA-256 of everything else in the manifest, so an edited configuration (``carrier_hz``,
  ``N_H``, ...) is detected like an edited scene file.

Writing. A new dataset is written into a temporary folder ``.<name>.*.tmp`` beside the target and moved into
place with one rename. ``force`` replaces an existing dataset in place: the new scene file is written under
its own (content-derived) name, then ``manifest.json`` is replaced atomically (the switch), then the old scene
file is removed; a crash at any moment leaves the old or the new dataset, complete, at the path. Only files the
workbench writes (``manifest.json``, ``scenes-*.pt``, its temporary files) are ever removed: anything else in
the folder stays. Leftovers of a crashed write (temporary folders and files, an unreferenced scene file) are
removed by the next write to the same path. Writes into one parent folder are serialised by a lock on it.

Loading (and ``workbench data check``) verifies, in order: the manifest's structure and digest, the stored
config (valid, and equal to the expected one when given), the scene file's size and SHA-256 (before unpickling
anything, ``torch.load(weights_only=True)``), the tensors' names and shapes, and the scenes themselves with
:func:`check_scenes` (finite values, source counts within [K_min, K_max], masks matching K). Every failure
raises :class:`DatasetError` (a :class:`~workbench.config.ConfigError`) naming the path, and the scene where
one is at fault.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .checks import check_K
from .config import ConfigError, SystemConfig
from .io import atomic_write_text, dumps_json, fsync_dir
from .physics import SceneBatch, scene_seed, simulate, source_covariance

FORMAT = 2
MANIFEST_FILE = "manifest.json"
SCENES_FILE = re.compile(r"scenes-[0-9a-f]{16}\.pt")  # the scene file's name; format 1 used "scenes.pt"
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
# writing
@contextlib.contextmanager
def _writer_lock(parent: Path) -> Iterator[None]:
    """Serialise dataset writes into ``parent`` (an exclusive flock on the folder itself, released on exit or death)."""
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


def _write_scenes_file(folder: Path, tensors: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """Save ``tensors`` into ``folder`` under their content-derived name (atomic); returns (name, {"sha256", "bytes"})."""
    fd, tmp = tempfile.mkstemp(prefix=".scenes.", suffix=".tmp", dir=folder)
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        info = {"sha256": _sha256(tmp), "bytes": tmp.stat().st_size}
        name = f"scenes-{info['sha256'][:16]}.pt"
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a dataset is an ordinary file
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return name, info


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """The switch: ``manifest.json`` with its digest, replaced atomically."""
    atomic_write_text(folder / MANIFEST_FILE, dumps_json({**manifest, "digest": manifest_digest(manifest)}))


def _remove_unreferenced(folder: Path) -> None:
    """Remove this module's files in a dataset folder that its manifest does not reference (a replaced scene file,
    temporary files of a crashed write). Files of any other name are never touched."""
    try:
        keep = set(json.loads((folder / MANIFEST_FILE).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return  # an unreadable manifest: leave everything for `data check` to report
    for p in folder.iterdir():
        if p.is_file() and p.name != MANIFEST_FILE and p.name not in keep and _ours(p.name):
            p.unlink(missing_ok=True)


def _clean_leftovers(out: Path) -> None:
    """Before a write to ``out``: remove temporary folders of crashed writes beside it (``.<name>.*.tmp``/``.old``,
    when they hold only this module's files) and unreferenced files of this module inside it."""
    for p in list(out.parent.glob(f".{out.name}.*.tmp")) + list(out.parent.glob(f".{out.name}.*.old")):
        if p.is_dir() and all(q.is_file() and _ours(q.name) for q in p.iterdir()):
            shutil.rmtree(p, ignore_errors=True)
    if _is_dataset(out):
        _remove_unreferenced(out)


def _manifest(tensors: dict[str, torch.Tensor], system: SystemConfig, seed: int, chunk: int | None, name: str, info: dict) -> dict:
    return {
        "format": FORMAT,
        "config": system.to_dict(),
        "seed": int(seed),
        "n": int(tensors["K"].shape[0]),
        "chunk": chunk,
        "version": __version__,
        "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {name: info},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "recomputed": list(RECOMPUTED),
    }


def _write_new(out: Path, tensors: dict[str, torch.Tensor], system: SystemConfig, seed: int, chunk: int | None) -> None:
    """A dataset where there is none: complete it in a temporary folder beside ``out``, then one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        name, info = _write_scenes_file(tmp, tensors)
        _write_manifest(tmp, _manifest(tensors, system, seed, chunk, name, info))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset folder is an ordinary folder
        os.replace(tmp, out)  # `out` is absent or an empty folder
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_in_place(out: Path, tensors: dict[str, torch.Tensor], system: SystemConfig, seed: int, chunk: int | None) -> None:
    """Replace the dataset ``out``: new scene file beside the old one, switch the manifest, remove the old file."""
    name, info = _write_scenes_file(out, tensors)
    fsync_dir(out)
    _write_manifest(out, _manifest(tensors, system, seed, chunk, name, info))
    _remove_unreferenced(out)


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
    out.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(out.parent):
        _check_target(out, force)  # again: another writer may have created it meanwhile
        _clean_leftovers(out)
        if _is_dataset(out):
            _replace_in_place(out, tensors, system, seed, chunk)
        else:
            _write_new(out, tensors, system, seed, chunk)
    return out


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
    if manifest["format"] != FORMAT:
        raise DatasetError(f"dataset '{path}': format {manifest['format']!r} is not supported (expected {FORMAT}; "
                           "format 1 had no manifest checksum: generate the dataset again)")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} lists no scene file (files is empty): an incomplete dataset")
    if len(files) != 1 or not SCENES_FILE.fullmatch(next(iter(files))):
        raise DatasetError(f"dataset '{path}': {MANIFEST_FILE} must list exactly one scene file named scenes-<hash>.pt, got {sorted(files)}")
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
    try:
        tensors = torch.load(spath, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise DatasetError(f"dataset '{path}': {name} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict) or set(tensors) != set(STORED):
        keys = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise DatasetError(f"dataset '{path}': {name} holds {keys}, expected {sorted(STORED)}")
    n = manifest["n"]
    bad = [k for k, t in tensors.items() if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != n]
    if bad:
        raise DatasetError(f"dataset '{path}': tensors {', '.join(bad)} do not hold n = {n} scenes")
    return tensors


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
    """Simulate ``n`` scenes in chunks of ``chunk`` (chunk i uses ``chunk_seed(seed, i)``) with a progress
    bar, and save them as the dataset ``out``. Fails before simulating if ``out`` exists without ``force``."""
    for name, value, lo in (("n", n, 1), ("chunk", chunk, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise DatasetError(f"{name} = {value!r}: expected an integer >= {lo}")
    if not isinstance(system, SystemConfig):
        raise DatasetError(f"system: expected a SystemConfig, got {type(system).__name__}")
    out = Path(out)
    _check_target(out, force)
    parts = []
    with tqdm(total=n, unit="scene", desc=f"generate {out.name}", disable=not progress, file=sys.stderr) as bar:
        for i, s in enumerate(range(0, n, chunk)):
            m = min(chunk, n - s)
            parts.append(simulate(system, m, seed=chunk_seed(seed, i), device=device, chunk=m).to("cpu"))
            bar.update(m)
    batch = SceneBatch.cat(parts) if len(parts) > 1 else parts[0]
    return save_dataset(batch, system, seed, out, force=force, chunk=chunk)
