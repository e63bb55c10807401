"""Atomic file writes: write to a temporary file in the same folder, fsync, then os.replace, so a reader
never sees a half-written file and an existing file is only replaced by a complete one.

Permissions follow the user's umask, as ``open()`` and ``mkdir`` would: a new file gets ``0o666 & ~umask``
(:func:`file_mode`), a new folder ``0o777 & ~umask`` (:func:`dir_mode`); a replaced file keeps its mode.
(``tempfile.mkstemp``/``mkdtemp`` make private files; every writer of the workbench chmods them to these modes.)

JSON written here is strict (RFC 8259) JSON: a float that is not finite (NaN, inf, -inf; Python, NumPy or
a 0-d tensor) is written as ``null``. In every JSON file of the workbench, ``null`` where a number is
expected means "no finite value": e.g. the train_loss of an epoch whose every step was skipped, or a
val_nmse that overflowed. Readers treat it as missing, never as zero."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path`` and move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else file_mode())  # mkstemp's file is private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def umask() -> int:
    """The process's umask (read without changing it for good)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file under the user's umask: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode of a new folder under the user's umask: ``0o777 & ~umask``."""
    return 0o777 & ~umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as strict JSON (non-finite floats as null, see the module docstring), written atomically."""
    return atomic_write_text(path, dumps_json(obj))


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (sorted keys, a final newline): non-finite floats become null, objects with
    ``tolist()`` or ``to_dict()`` (arrays, tensors, configs) are converted, anything else fails."""
    return json.dumps(finite_or_none(obj), indent=indent, sort_keys=True, allow_nan=False) + "\n"


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` in plain JSON types, with every non-finite float replaced by None."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {_key(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return finite_or_none(_jsonable(obj))


def _key(k: Any) -> Any:
    """A dict key as JSON allows it (str, int, float, bool or None: json.dumps converts those itself)."""
    return k if isinstance(k, (str, int, float, bool)) or k is None else str(k)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item") and getattr(o, "ndim", None) == 0:  # NumPy scalars, 0-d arrays and tensors
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def save_metrics(out_dir: str | os.PathLike, metrics: dict, name: str = "metrics.json") -> str:
    """``metrics.json`` under ``out_dir`` (created), written atomically. Returns its path."""
    path = os.path.join(os.fspath(out_dir), name)
    atomic_write_json(path, metrics)
    return path
