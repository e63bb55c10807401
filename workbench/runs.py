"""Runs with an identity: the ``manifest.json`` every run folder carries, listing runs and comparing two.

A *run* is a folder written by one command: a headless report (``workbench report``: kind "report", with one
folder per notebook inside, kind "notebook"), a training run (``workbench train``: kind "train"), a comparison
(``workbench compare``: kind "compare") or an action of a notebook's widget panel (04's *train*, 06's *run more
trials*: kind "panel", in ``<out_dir>/panels/<action>-<UTC time>/``, or under ``runs/panels/<notebook>/`` when
``out_dir`` is a headless report's folder: :func:`report_of`). Its ``manifest.json`` holds::

    {"kind": "report", "name": "...", "time": "2024-05-01T12:00:00+00:00" (UTC, ISO 8601),
     "commit": "<40 hex digits>" | null, "dirty": true | false | null,   # of the checkout the package runs from
     "versions": {"workbench": ..., "python": ..., "torch": ..., "numpy": ..., "optuna": ...},  # null when absent
     "device": "cpu" | "cuda:0 (NVIDIA ...)" | ..., "parameters": {...}, "status": "running" | "ok" | "failed",
     "seconds": float | null}

``commit``/``dirty`` come from ``git -C <checkout> rev-parse HEAD`` and ``git status --porcelain``; both are
null when the package is not in a git checkout (an installed wheel) or git is absent. Dataset folders have a
manifest.json too (:mod:`workbench.data`); they have no ``kind`` and are not runs.

Owns: the manifest's fields and its (atomic) writing, new run folder names, :func:`list_runs` and
:func:`diff_runs` (parameters and the numbers of ``metrics.json``, flattened to dotted keys). Must not: run
anything, draw, or parse command lines (``workbench runs`` is :mod:`workbench.cli.runs`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import ConfigError
from .io import atomic_write_json

MANIFEST = "manifest.json"
KINDS = ("report", "notebook", "train", "compare", "panel")
PACKAGES = ("workbench", "torch", "numpy", "optuna")
CHECKOUT = Path(__file__).resolve().parent.parent  # the folder holding the package: a git checkout in development


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (e.g. "2024-05-01T12:00:00+00:00")."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_state(checkout: str | os.PathLike = CHECKOUT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout ``checkout``: HEAD's hash and whether ``git status --porcelain`` lists any
    change; (None, None) when it is not a checkout or git cannot be run."""
    try:
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head.stdout.strip() or None, (bool(status.stdout.strip()) if status.returncode == 0 else None)


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of :data:`PACKAGES` (None for a package that is not installed)."""
    from . import __version__

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        if name == "workbench":
            out[name] = __version__
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: Any = None) -> str:
    """A readable name of ``device`` ("cpu", "cuda:0 (NVIDIA H200)"); None means what "auto" would pick."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)


def make_manifest(kind: str, name: str, parameters: dict | None = None, device: Any = None, status: str = "running",
                  checkout: str | os.PathLike = CHECKOUT, **extra: Any) -> dict[str, Any]:
    """A run's manifest (the fields of the module docstring); ``extra`` entries are added as they are."""
    if kind not in KINDS:
        raise ConfigError(f"run kind = {kind!r}: expected one of {', '.join(KINDS)}")
    commit, dirty = git_state(checkout)
    return {"kind": kind, "name": name, "time": utc_now(), "commit": commit, "dirty": dirty, "versions": package_versions(),
            "device": device_name(device), "parameters": dict(parameters or {}), "status": status, "seconds": None, **extra}


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """``folder/manifest.json`` (folder created), written atomically."""
    return atomic_write_json(Path(folder) / MANIFEST, manifest)


def start_run(folder: str | os.PathLike, kind: str, name: str | None = None, parameters: dict | None = None, device: Any = None,
              **extra: Any) -> dict[str, Any]:
    """Write the manifest of a run starting now in ``folder`` (status "running") and return it."""
    manifest = make_manifest(kind, name or Path(folder).name, parameters, device, **extra)
    write_manifest(folder, manifest)
    return manifest


def finish_run(folder: str | os.PathLike, status: str, seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    """Record a run's end in its manifest: ``status`` ("ok" | "failed"), its seconds and any ``extra`` fields."""
    manifest = read_run(folder)
    manifest.update(status=status, seconds=seconds, **extra)
    write_manifest(folder, manifest)
    return manifest


def read_run(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the run folder ``folder`` (ConfigError when it has none, or it is not a run's)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"run '{folder}': no {MANIFEST} (not a run folder, or written before runs had manifests)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"run '{folder}': {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or "kind" not in manifest:
        raise ConfigError(f"run '{folder}': {MANIFEST} is not a run manifest (a dataset's?)")
    return manifest


def new_run_dir(root: str | os.PathLike, kind: str) -> Path:
    """A new, empty folder ``root/<kind>-<UTC time>`` (e.g. runs/report-20240501T120000Z), with -2, -3, ... appended
    when one of that second exists. Created, so two runs never share it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for i in range(1, 10_000):
        path = root / (f"{kind}-{stamp}" if i == 1 else f"{kind}-{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"--out '{root}': could not create a new run folder for {kind}-{stamp}")


def report_of(folder: str | os.PathLike) -> Path | None:
    """The headless report run that ``folder`` belongs to: ``folder`` itself or its parent when that holds a run
    manifest of kind "report" or "notebook" (``workbench report`` writes both before a notebook runs); else None.
    Interactive actions never write there (:mod:`workbench.ui`)."""
    folder = Path(folder)
    for path in (folder, folder.parent):
        try:
            if read_run(path).get("kind") in ("report", "notebook"):
                return path
        except ConfigError:
            continue
    return None


def notebook_runs(notebook: str, root: str | os.PathLike = "runs") -> list[dict[str, Any]]:
    """The runs of notebook ``notebook`` under ``root``, oldest first (:func:`list_runs`, four levels down): its
    folders in headless reports (kind "notebook") and its panels' actions (kind "panel")."""
    return [m for m in list_runs(root, depth=4)
            if (m.get("kind") == "notebook" and m.get("name") == notebook)
            or (m.get("kind") == "panel" and (m.get("parameters") or {}).get("notebook") == notebook)]


def runs_root_of(out_dir: str | os.PathLike) -> Path:
    """The folder holding the runs an ``out_dir`` sits among: the ``--out`` root of the headless report it belongs to
    (:func:`report_of`), else ``runs/`` of the checkout (:func:`workbench.params.project_root`)."""
    report = report_of(out_dir)
    if report is not None:
        if read_run(report).get("kind") == "notebook":  # <out>/<report run>/<notebook>, or <out>/<notebook> run on its own
            report = report.parent if (report.parent / MANIFEST).is_file() else report
        return report.parent
    from .params import project_root

    return project_root() / "runs"


def list_runs(root: str | os.PathLike = "runs", depth: int = 3) -> list[dict[str, Any]]:
    """Every run under ``root`` (folders up to ``depth`` levels down holding a run manifest), oldest first; each
    manifest has ``path`` (the folder) added. Unreadable manifests and datasets are left out."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for level in range(1, depth + 1):
        for path in root.glob("/".join(["*"] * level) + "/" + MANIFEST):
            try:
                m = read_run(path.parent)
            except ConfigError:
                continue
            out.append({**m, "path": str(path.parent)})
    return sorted(out, key=lambda m: (str(m.get("time") or ""), m["path"]))


def resolve_run(ref: str | os.PathLike, root: str | os.PathLike = "runs") -> Path:
    """The folder of run ``ref``: a folder path, or a name under ``root`` (e.g. "report-20240501T120000Z/02_eigen_spectrum")."""
    for path in (Path(ref), Path(root) / ref):
        if (path / MANIFEST).is_file():
            return path
    raise ConfigError(f"run {str(ref)!r}: no run folder with a {MANIFEST} there or under '{root}' (workbench runs lists them)")


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a JSON value as {dotted key: number}: dict keys joined with ".", list items by index
    ("runs.recommended.history.2.val_nmse"); booleans, strings and nulls are left out."""
    out: dict[str, float] = {}
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


METRICS_FILES = ("metrics.json", "compare.json", "verify.json")  # a notebook's, `workbench compare`'s, `workbench verify`'s


def run_metrics(folder: str | os.PathLike) -> dict[str, float]:
    """The flattened numbers of a run's results: the first of :data:`METRICS_FILES` it has, else the last epoch of a
    training run's ``history.json`` (keys "final.<name>"); {} when it has none."""
    folder = Path(folder)
    try:
        for name in METRICS_FILES:
            if (folder / name).is_file():
                return flatten(json.loads((folder / name).read_text()))
        if (folder / "history.json").is_file():
            history = json.loads((folder / "history.json").read_text())
            records = history.get("history", history) if isinstance(history, dict) else history
            return flatten({"final": records[-1]}) if isinstance(records, list) and records else {}
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
    return {}


def diff_runs(a: str | os.PathLike, b: str | os.PathLike, root: str | os.PathLike = "runs", only_different: bool = False) -> dict[str, Any]:
    """Two runs side by side: {"a": manifest, "b": manifest, "rows": [(section, key, value in a, value in b)]} with
    section "run" (kind, time, commit, dirty, device, status), "parameters" (the union of both runs' parameters,
    flattened) and "metrics" (the union of their metrics.json numbers). A value one run lacks is None.
    ``only_different`` keeps the rows whose two values differ."""
    pa, pb = resolve_run(a, root), resolve_run(b, root)
    ma, mb = read_run(pa), read_run(pb)
    rows: list[tuple[str, str, Any, Any]] = []
    for key in ("kind", "name", "time", "commit", "dirty", "device", "status", "seconds"):
        rows.append(("run", key, ma.get(key), mb.get(key)))
    for key in sorted(set(ma.get("versions") or {}) | set(mb.get("versions") or {})):
        rows.append(("run", f"versions.{key}", (ma.get("versions") or {}).get(key), (mb.get("versions") or {}).get(key)))
    qa, qb = _flat_params(ma.get("parameters") or {}), _flat_params(mb.get("parameters") or {})
    rows += [("parameters", k, qa.get(k), qb.get(k)) for k in sorted(set(qa) | set(qb))]
    xa, xb = run_metrics(pa), run_metrics(pb)
    rows += [("metrics", k, xa.get(k), xb.get(k)) for k in sorted(set(xa) | set(xb))]
    if only_different:
        rows = [r for r in rows if r[2] != r[3]]
    return {"a": {**ma, "path": str(pa)}, "b": {**mb, "path": str(pb)}, "rows": rows}


def _flat_params(params: dict) -> dict[str, Any]:
    """Parameters as {dotted key: value}: nested dicts joined with "."; other values (strings, lists) as they are."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat_params(v).items()})
        else:
            out[str(k)] = v
    return out
