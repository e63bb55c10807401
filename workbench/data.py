"""Datasets of simulated scenes on disk, with a manifest and integrity checks.

A dataset is a folder (conventionally under ``data/``) holding

* ``scenes.pt``: ``torch.save`` of a dict of the :class:`~workbench.physics.SceneBatch` tensors, except
  ``R_true``, which is a function of the stored source parameters and is recomputed on load with
  :func:`~workbench.physics.source_covariance` (it would be ~80 % of the file: N^2 entries per scene);
* ``manifest.json``: format version, the :class:`~workbench.config.SystemConfig` as a dict, seed, n,
  chunk, package version, SHA-256 and size of ``scenes.pt``, tensor shapes/dtypes, creation time (UTC).

Both are written into a temporary folder beside the target and moved into place with ``os.replace``, so a
reader never sees half a dataset; with ``force`` an existing dataset is replaced only once the new one is
complete. Loading verifies size and checksum before unpickling anything (``torch.load(weights_only=True)``),
and that the stored config equals the expected one when given. Every failure raises :class:`DatasetError`
(a :class:`~workbench.config.ConfigError`) naming the path and what is wrong.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .config import ConfigError, ExperimentConfig, SystemConfig, parse_value
from .physics import SceneBatch, simulate, source_covariance

FORMAT = 1
SCENES_FILE = "scenes.pt"
MANIFEST_FILE = "manifest.json"
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


def _is_dataset(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


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


def save_dataset(batch: SceneBatch, system: SystemConfig, seed: int, out: str | os.PathLike, force: bool = False,
                 chunk: int | None = None) -> Path:
    """Write ``batch`` (simulated from ``system`` with ``seed``) as a dataset folder ``out``, atomically.

    Raises DatasetError if ``out`` already holds a dataset and ``force`` is False. Returns ``out``."""
    if not isinstance(batch, SceneBatch):
        raise DatasetError(f"batch: expected a SceneBatch, got {type(batch).__name__}")
    if not isinstance(system, SystemConfig):
        raise DatasetError(f"system: expected a SystemConfig, got {type(system).__name__}")
    out = Path(out)
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in batch.tensors().items() if name in STORED}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with open(tmp / SCENES_FILE, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "format": FORMAT,
            "config": system.to_dict(),
            "seed": int(seed),
            "n": len(batch),
            "chunk": chunk,
            "version": __version__,
            "torch": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": {SCENES_FILE: {"sha256": _sha256(tmp / SCENES_FILE), "bytes": (tmp / SCENES_FILE).stat().st_size}},
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
            "recomputed": list(RECOMPUTED),
        }
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset folder is an ordinary folder
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _check_target(out, force)  # again: another writer may have created it meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)  # the complete new dataset is ready; now swap
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the dataset folder ``path`` (checked for the required keys, not the checksum)."""
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
        raise DatasetError(f"dataset '{path}': format {manifest['format']!r} is not supported (expected {FORMAT})")
    return manifest


def dataset_system(path: str | os.PathLike) -> SystemConfig:
    """The SystemConfig a dataset was generated with."""
    try:
        return SystemConfig.from_dict(read_manifest(path)["config"])
    except DatasetError:
        raise
    except ConfigError as e:
        raise DatasetError(f"dataset '{path}': the stored config is invalid: {e}") from None


def load_dataset(path: str | os.PathLike, system: SystemConfig | None = None, device: str | torch.device = "cpu") -> SceneBatch:
    """Load and verify a dataset folder; ``system`` (optional) must equal the stored config.

    Checks, in order: manifest present and well-formed; scenes.pt present, of the recorded size (else
    "truncated") and SHA-256 (else "corrupt"); the stored config valid and equal to ``system``; the
    tensors loadable with ``weights_only=True``, complete and of n scenes. Returns a SceneBatch on
    ``device`` with R_true recomputed from the source parameters."""
    path = Path(path)
    manifest = read_manifest(path)
    stored = dataset_system(path)
    if system is not None:
        if not isinstance(system, SystemConfig):
            raise DatasetError(f"system: expected a SystemConfig, got {type(system).__name__}")
        if system != stored:
            want, have = system.to_dict(), stored.to_dict()
            diff = ", ".join(f"{k}: dataset {have[k]!r} != expected {want[k]!r}" for k in want if want[k] != have.get(k))
            raise DatasetError(f"dataset '{path}' was generated with another system config ({diff})")
    spath = path / SCENES_FILE
    if not spath.is_file():
        raise DatasetError(f"dataset '{path}': {SCENES_FILE} is missing")
    info = manifest["files"].get(SCENES_FILE, {})
    size = spath.stat().st_size
    if size != info.get("bytes"):
        raise DatasetError(f"dataset '{path}': {SCENES_FILE} is truncated or altered ({size} bytes, manifest says {info.get('bytes')})")
    if _sha256(spath) != info.get("sha256"):
        raise DatasetError(f"dataset '{path}': {SCENES_FILE} is corrupt (SHA-256 does not match the manifest)")
    try:
        tensors = torch.load(spath, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise DatasetError(f"dataset '{path}': {SCENES_FILE} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict) or set(tensors) != set(STORED):
        keys = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise DatasetError(f"dataset '{path}': {SCENES_FILE} holds {keys}, expected {sorted(STORED)}")
    n = manifest["n"]
    bad = [k for k, t in tensors.items() if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != n]
    if bad:
        raise DatasetError(f"dataset '{path}': tensors {', '.join(bad)} do not hold n = {n} scenes")
    dev = torch.device(device)
    tensors = {k: t.to(dev) for k, t in tensors.items()}
    R_true = source_covariance(stored, tensors["phi"], tensors["theta"], tensors["r"], tensors["power"], tensors["mask"])
    return SceneBatch(**tensors, R_true=R_true)


def chunk_seed(seed: int, index: int) -> int:
    """The simulate() seed of chunk ``index`` of a dataset with ``seed`` (independent streams per chunk)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


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


# ---------------------------------------------------------------------------------------------
def system_from_args(config: str | None, sets: list[list[str]] | None) -> SystemConfig:
    """A SystemConfig from ``--config`` (a JSON object or a path to a JSON file: a system dict, or an
    experiment dict with a "system" section) and ``--set FIELD VALUE`` pairs (VALUE parsed as JSON)."""
    data: dict[str, Any] = {}
    if config:
        text = Path(config).read_text() if not config.lstrip().startswith("{") and Path(config).is_file() else config
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config = {config!r}: not a JSON object or a JSON file ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config = {config!r}: expected a JSON object")
        if "system" in data and isinstance(data["system"], dict):
            data = ExperimentConfig.from_dict(data).system.to_dict()
    for key, value in sets or []:
        data[key.removeprefix("system.")] = parse_value(value)
    return SystemConfig.from_dict(data)


def _cmd_generate(args: argparse.Namespace) -> int:
    system = system_from_args(args.config, args.set)
    out = generate(system, args.n, args.out, seed=args.seed, force=args.force, progress=not args.quiet, chunk=args.chunk)
    print(f"wrote {out} ({args.n} scenes, seed {args.seed})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    system = system_from_args(args.config, args.set) if (args.config or args.set) else None
    batch = load_dataset(args.path, system=system)
    m = read_manifest(args.path)
    print(f"{args.path}: OK, {len(batch)} scenes, seed {m['seed']}, workbench {m.get('version')}, "
          f"created {m.get('created')}, sha256 {m['files'][SCENES_FILE]['sha256'][:16]}...")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """``workbench data generate`` and ``workbench data check``."""
    p = sub.add_parser("data", help="generate and check datasets of simulated scenes on disk")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    def config_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="system config: a JSON object or a JSON file (system or experiment dict)")
        q.add_argument("--set", nargs=2, action="append", metavar=("FIELD", "VALUE"),
                       help="set one system field, e.g. --set L 32 --set snr_db_min 10 (repeatable)")

    g = actions.add_parser("generate", help="simulate N scenes into a dataset folder (atomic; refuses to overwrite without --force)")
    g.add_argument("--n", type=int, required=True, help="number of scenes")
    g.add_argument("--out", required=True, help="dataset folder, e.g. data/train")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force", action="store_true", help="replace an existing dataset (only once the new one is complete)")
    g.add_argument("--chunk", type=int, default=1024, help="scenes per simulate() call")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    config_args(g)
    g.set_defaults(func=_cmd_generate)

    c = actions.add_parser("check", help="verify a dataset's checksum, tensors and (optionally) its config")
    c.add_argument("path")
    config_args(c)
    c.set_defaults(func=_cmd_check)
