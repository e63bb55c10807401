"""Headless notebook runs: ``workbench report`` / ``make report``.

Every notebook in ``notebooks/`` is executed with papermill into ``runs/<name>/`` (the executed notebook,
its figures, its metrics.json), with a progress display, and ``runs/index.html`` links them all. A failing
notebook keeps its partial output (papermill saves after every cell) and makes the command exit non-zero,
naming the notebook and the cell. The kernel is ``python3`` launched from the current interpreter, so a
run from ``.venv/bin/workbench`` executes the notebooks with the project's environment.
"""

from __future__ import annotations

import html
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ConfigError, parse_value
from .io import atomic_write_json, atomic_write_text

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "python3"


def list_notebooks(folder: str | os.PathLike = NOTEBOOK_DIR) -> list[Path]:
    """The notebooks to run, sorted by name (checkpoint copies excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"notebooks = {str(folder)!r}: not a folder")
    return sorted(p for p in folder.glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def select(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    """Notebooks whose name (without .ipynb) equals or starts with one of ``only`` (e.g. "03" or "03_nan_gradients")."""
    if not only:
        return notebooks
    picked = []
    for want in only:
        stem = want.removesuffix(".ipynb")
        match = [p for p in notebooks if p.stem == stem] or [p for p in notebooks if p.stem.startswith(stem)]
        if not match:
            raise ConfigError(f"--only {want!r}: no such notebook; choose from {', '.join(p.stem for p in notebooks)}")
        picked += [p for p in match if p not in picked]
    return picked


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict]:
    """The ``parameters`` cell of a notebook: {name: {"type", "default", "help"}}, in order.

    Read with Python's own parser (papermill's inspector does not parse ``float | None`` annotations): every
    annotated assignment is a parameter, its trailing comment is the help text."""
    import ast
    import io
    import tokenize

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        raise ConfigError(f"notebook {str(path)!r} has no cell tagged 'parameters'")
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(cell.source).readline)
                if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = {"type": ast.unparse(node.annotation), "default": ast.get_source_segment(cell.source, node.value),
                                   "help": comments.get(node.end_lineno, "")}
    return out


def ci_parameters(name: str) -> dict:
    """The small parameters CI uses for notebook ``name`` (from its parameter class in :mod:`workbench.params`)."""
    from .params import NOTEBOOK_PARAMS

    cls = NOTEBOOK_PARAMS.get(name)
    return dict(cls.ci) if cls is not None else {}


@dataclass
class NotebookRun:
    """Outcome of one notebook: status "ok" | "failed", paths relative to the runs folder, seconds, and on
    failure the cell index (in the executed notebook), its first source line and the error."""

    name: str
    status: str
    out_dir: str
    notebook: str
    parameters: dict
    seconds: float
    cell_seconds: list[float] = field(default_factory=list)
    error: str | None = None
    cell: int | None = None
    cell_source: str | None = None
    figures: list[str] = field(default_factory=list)
    pages: list[str] = field(default_factory=list)
    metrics: str | None = None

    @property
    def kernel_seconds(self) -> float:
        """Wall time not spent inside cells: kernel start-up and shutdown, papermill's own work."""
        return max(self.seconds - sum(self.cell_seconds), 0.0)


def run_notebook(path: str | os.PathLike, out_root: str | os.PathLike = "runs", parameters: dict | None = None, ci: bool = False,
                 kernel_name: str = KERNEL, progress: bool = False, cwd: str | os.PathLike | None = None) -> NotebookRun:
    """Execute one notebook with papermill into ``out_root/<name>/<name>.ipynb``; ``out_dir`` is set to that
    folder. Parameters the notebook does not declare fail (ConfigError) before anything runs."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    path = Path(path)
    name = path.stem
    out_dir = Path(out_root).resolve() / name  # absolute: the kernel may run elsewhere
    declared = notebook_parameters(path)
    params = {**(ci_parameters(name) if ci else {}), **(parameters or {})}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(f"{name}: unknown parameter(s) {', '.join(unknown)}; declared: {', '.join(declared)}")
    if "out_dir" in declared:
        params["out_dir"] = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_nb = out_dir / f"{name}.ipynb"
    t0 = time.perf_counter()
    error = cell = source = None
    try:
        papermill.execute_notebook(str(path), str(out_nb), parameters=params, kernel_name=kernel_name, progress_bar=progress,
                                   cwd=str(cwd or Path.cwd()))
        status = "ok"
    except PapermillExecutionError as e:
        status, cell = "failed", e.cell_index
        error = f"{e.ename}: {e.evalue}"
    seconds = time.perf_counter() - t0
    cell_seconds = []
    if out_nb.exists():
        nb = nbformat.read(out_nb, as_version=4)
        cell_seconds = [float((c.metadata.get("papermill") or {}).get("duration") or 0.0) for c in nb.cells]
        if status == "failed":  # papermill inserts an error banner at the top: find the cell by its error output
            failed = [i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
            cell = failed[0] if failed else cell
            if cell is not None and cell < len(nb.cells):
                tags = [t for t in nb.cells[cell].metadata.get("tags", []) if t != "injected-parameters"]
                first = next((ln for ln in nb.cells[cell].source.splitlines() if ln.strip()), "")
                source = f"[{','.join(tags)}] {first}" if tags else first
    run = NotebookRun(name=name, status=status, out_dir=str(out_dir), notebook=out_nb.name, parameters=params, seconds=seconds,
                      cell_seconds=cell_seconds, error=error, cell=cell, cell_source=source)
    run.figures = sorted(p.name for p in out_dir.glob("*.png"))
    run.pages = sorted(p.name for p in out_dir.glob("*.html"))
    run.metrics = "metrics.json" if (out_dir / "metrics.json").exists() else None
    return run


def write_index(runs: list[NotebookRun], out_root: str | os.PathLike = "runs") -> Path:
    """runs/index.html (and index.json): each notebook's status, time, executed notebook, figures, metrics."""
    out_root = Path(out_root)
    blocks = []
    for r in runs:
        base = f"{html.escape(r.name)}/"
        colour = "#070" if r.status == "ok" else "#b00"
        err = (f"<p class='error'>failed in cell {r.cell} (<code>{html.escape(r.cell_source or '')}</code>): "
               f"{html.escape(r.error or '')}</p>") if r.status != "ok" else ""
        figs = "".join(f"<a href='{base}{html.escape(f)}'><img src='{base}{html.escape(f)}' alt='{html.escape(f)}'></a>" for f in r.figures)
        pages = " ".join(f"<a href='{base}{html.escape(p)}'>{html.escape(p)}</a>" for p in r.pages if p != "plotly.min.js")
        metrics = f"<a href='{base}{r.metrics}'>metrics.json</a>" if r.metrics else "no metrics.json"
        params = html.escape(json.dumps(r.parameters))
        blocks.append(
            f"<section><h2>{html.escape(r.name)} <span style='color:{colour}'>{r.status}</span> "
            f"<small>{r.seconds:.1f} s (kernel {r.kernel_seconds:.1f} s)</small></h2>{err}"
            f"<p><a href='{base}{html.escape(r.notebook)}'>executed notebook</a> · {metrics} · {pages}</p>"
            f"<p><small>parameters: <code>{params}</code></small></p><div class='figs'>{figs}</div></section>"
        )
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>workbench report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto} img{max-height:260px;margin:4px;border:1px solid #ccc}"
            "section{border-bottom:1px solid #ddd;padding-bottom:8px}</style></head><body><h1>workbench report</h1>"
            f"<p>{sum(r.status == 'ok' for r in runs)}/{len(runs)} notebooks ok, {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
            + "".join(blocks) + "</body></html>")
    atomic_write_json(out_root / "index.json", [asdict(r) | {"kernel_seconds": r.kernel_seconds} for r in runs])
    return atomic_write_text(out_root / "index.html", page)


def run_report(notebooks: list[Path], out_root: str | os.PathLike = "runs", parameters: dict | None = None, ci: bool = False,
               progress: bool = True, kernel_name: str = KERNEL) -> list[NotebookRun]:
    """Run ``notebooks`` in order (every one, even after a failure), then write the index. ``parameters``
    go to each notebook that declares them; one that no notebook declares fails before anything runs."""
    from tqdm.auto import tqdm

    parameters = parameters or {}
    declared = {p: set(notebook_parameters(p)) for p in notebooks}
    unknown = sorted(k for k in parameters if not any(k in d for d in declared.values()))
    if unknown:
        raise ConfigError(f"-p {', '.join(unknown)}: not a parameter of {', '.join(p.stem for p in notebooks)} (see --help-notebook NAME)")
    runs = []
    bar = tqdm(notebooks, desc="notebooks", unit="nb", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.stem)
        mine = {k: v for k, v in parameters.items() if k in declared[path]}
        runs.append(run_notebook(path, out_root, mine, ci=ci, kernel_name=kernel_name, progress=progress))
        write_index(runs, out_root)
    return runs


# ---------------------------------------------------------------------------------------------
def register_cli(sub) -> None:
    p = sub.add_parser("report", help="execute every notebook headless with papermill into runs/, with an index page")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this notebook (name or prefix, e.g. 03); repeatable")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="pass a parameter to the notebooks that declare it (VALUE parsed as JSON when possible)")
    p.add_argument("--ci", action="store_true", help="small parameters, as in CI")
    p.add_argument("--out", default="runs", help="output folder (default runs/)")
    p.add_argument("--notebooks", default=str(NOTEBOOK_DIR), help="folder of the notebooks")
    p.add_argument("--help-notebook", metavar="NAME", help="list a notebook's parameters with types, defaults and meanings, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli_report)


def _cli_report(args) -> int:
    notebooks = list_notebooks(args.notebooks)
    if args.help_notebook:
        (path,) = select(notebooks, [args.help_notebook])[:1]
        print(f"{path.stem}: parameters (pass with -p KEY VALUE)")
        ci = ci_parameters(path.stem)
        for k, v in notebook_parameters(path).items():
            extra = f" [--ci: {ci[k]!r}]" if k in ci else ""
            print(f"  {k:<18} {v['type'] or '?':<6} default {v['default']:<14} {v['help']}{extra}")
        return 0
    selected = select(notebooks, args.only)
    params = {k: parse_value(v) for k, v in args.parameter}
    runs = run_report(selected, args.out, params, ci=args.ci, progress=not args.no_progress)
    for r in runs:
        print(f"{r.name}: {r.status} in {r.seconds:.1f} s (cells {sum(r.cell_seconds):.1f} s) -> {r.out_dir}/{r.notebook}")
    failed = [r for r in runs if r.status != "ok"]
    for r in failed:
        print(f"workbench report: notebook {r.name} failed in cell {r.cell} ({r.cell_source}): {r.error}; partial output in "
              f"{r.out_dir}/{r.notebook}", file=sys.stderr)
    print(f"index: {Path(args.out) / 'index.html'}")
    return 1 if failed else 0
