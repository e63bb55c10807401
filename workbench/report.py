"""Headless notebook runs: ``workbench report`` / ``make report``.

Each report is a run of its own: ``workbench report`` makes a new folder ``<out>/report-<UTC time>/`` (or reuses
``--run NAME``) with a ``manifest.json`` (:mod:`workbench.runs`: time, git commit and dirty flag, package
versions, device, parameters) and executes every notebook in ``notebooks/`` with papermill into
``<run>/<name>/`` (the executed notebook, its figures, its metrics.json and its own manifest), with a progress
display. So a headless report never shares a folder, an Optuna database (notebook 06 keeps its study under its
out_dir unless ``-p storage`` names one) or trained models with an interactive session (whose notebooks write
to ``runs/<name>/``) or with another report. ``<run>/index.html`` links that report's notebooks, and
``<out>/index.html`` accumulates: per notebook the latest report's result (``--only 02`` updates 02's entry and
keeps the others) and a list of every report run.

Parameters are validated before anything is created or deleted: unknown names, ``out_dir`` (set by the report
itself to ``<run>/<name>``: use ``--out``/``--run``), and the values, by the notebook's class in
:mod:`workbench.params`. A failing notebook keeps its partial output (papermill saves after every cell) and makes
the command exit non-zero, naming the notebook and the cell; so does a notebook whose kernel dies (killed, out
of memory): the other notebooks still run and the indexes are written after each one. Before a notebook runs in
a reused folder, the outputs of its previous run there (executed notebook, figures, pages, metrics.json,
figures.json) are removed, so a failed run never shows an earlier run's results as its own. The kernel is
``python3`` launched from the current interpreter, so a run from ``.venv/bin/workbench`` executes the notebooks
with the project's environment.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ConfigError
from .io import atomic_write_json, atomic_write_text
from .runs import finish_run, list_runs, new_run_dir, start_run

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "python3"


class _KnownParameters(logging.Filter):
    """Hide papermill's "Passed unknown parameter" warning: parameters are checked against the notebook before a
    run (:func:`notebook_parameters`, which also reads ``float | None`` annotations that papermill cannot)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


logging.getLogger("papermill").addFilter(_KnownParameters())


def list_notebooks(folder: str | os.PathLike = NOTEBOOK_DIR) -> list[Path]:
    """The notebooks to run, sorted by name: each notebook's source, the percent-format ``NAME.py`` of a jupytext
    pair (the ``NAME.ipynb`` beside it is generated and not counted again) or a lone ``NAME.ipynb``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"notebooks = {str(folder)!r}: not a folder")
    text = {p.stem: p for p in folder.glob("*.py") if _is_percent_notebook(p)}
    books = {p.stem: p for p in folder.glob("*.ipynb") if p.stem not in text}
    return [p for _, p in sorted({**books, **text}.items())]


def _is_percent_notebook(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return any(line.startswith("# %%") for line in f)


def notebook_path(name: str, folder: str | os.PathLike = NOTEBOOK_DIR) -> Path:
    """The source of notebook ``name`` (e.g. "03_nan_gradients") in ``folder``."""
    (path,) = select(list_notebooks(folder), [name])[:1]
    return path


def read_notebook(path: str | os.PathLike):
    """A notebook as an nbformat NotebookNode from its percent-format source (jupytext) or an .ipynb file; a bare
    name is looked up in ``notebooks/``."""
    import jupytext

    path = Path(path)
    if path.suffix not in (".py", ".ipynb"):
        path = notebook_path(str(path))
    return jupytext.read(path)


def select(notebooks: list[Path], only: list[str] | None, flag: str = "--only") -> list[Path]:
    """Notebooks whose name (without .ipynb) equals or starts with one of ``only`` (e.g. "03" or "03_nan_gradients")."""
    if not only:
        return notebooks
    picked = []
    for want in only:
        stem = want.removesuffix(".ipynb").removesuffix(".py")
        match = [p for p in notebooks if p.stem == stem] or [p for p in notebooks if p.stem.startswith(stem)]
        if not match:
            raise ConfigError(f"{flag} {want!r}: no such notebook; choose from {', '.join(p.stem for p in notebooks)}")
        picked += [p for p in match if p not in picked]
    return picked


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict]:
    """The ``parameters`` cell of a notebook: {name: {"type", "default", "help"}}, in order.

    Read with Python's own parser (papermill's inspector does not parse ``float | None`` annotations): every
    annotated assignment is a parameter, its trailing comment is the help text."""
    import ast
    import io
    import tokenize

    nb = read_notebook(path)
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
    failure the error, the cell index in the executed notebook, its first source line, and ``where``: the cell
    as the user sees it in the source (its number, and the line of the .py source where it starts)."""

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
    where: str | None = None
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
    _refuse_out_dir(parameters)
    params = {**(ci_parameters(name) if ci else {}), **(parameters or {})}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(f"{name}: unknown parameter(s) {', '.join(unknown)}; declared: {', '.join(declared)}")
    if "out_dir" in declared:
        params["out_dir"] = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_nb = out_dir / f"{name}.ipynb"
    clear_outputs(out_dir, name)
    start_run(out_dir, "notebook", name, params, notebook=str(path))
    t0 = time.perf_counter()
    error = cell = source = where = None
    try:
        papermill.execute_notebook(read_notebook(path), str(out_nb), parameters=params, kernel_name=kernel_name, progress_bar=progress,
                                   cwd=str(cwd or Path.cwd()))
        status = "ok"
    except PapermillExecutionError as e:
        status, cell = "failed", e.cell_index
        error = f"{e.ename}: {e.evalue}"
    except Exception as e:  # the kernel died (DeadKernelError), timed out, or could not start: this notebook failed
        status = "failed"
        error = f"{type(e).__name__}: {str(e).strip() or 'no message'} (the kernel stopped: killed, out of memory, or failed to start)"
    seconds = time.perf_counter() - t0
    cell_seconds = []
    if out_nb.exists():
        nb = nbformat.read(out_nb, as_version=4)
        cell_seconds = [float((c.metadata.get("papermill") or {}).get("duration") or 0.0) for c in nb.cells]
        if status == "failed":  # papermill inserts an error banner at the top: find the cell by its error output
            failed = [i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
            started = [i for i, c in enumerate(nb.cells) if (c.metadata.get("papermill") or {}).get("start_time")]
            cell = failed[0] if failed else cell if cell is not None else (started[-1] if started else None)  # dead kernel: the last started
            if cell is not None and cell < len(nb.cells):
                tags = [t for t in nb.cells[cell].metadata.get("tags", []) if t != "injected-parameters"]
                first = next((ln for ln in nb.cells[cell].source.splitlines() if ln.strip()), "")
                source = f"[{','.join(tags)}] {first}" if tags else first
                where = source_location(path, nb, cell)
    run = NotebookRun(name=name, status=status, out_dir=str(out_dir), notebook=out_nb.name, parameters=params, seconds=seconds,
                      cell_seconds=cell_seconds, error=error, cell=cell, cell_source=source, where=where)
    run.figures = figure_files(out_dir)
    run.pages = sorted(p.name for p in out_dir.glob("*.html"))
    run.metrics = "metrics.json" if (out_dir / "metrics.json").exists() else None
    finish_run(out_dir, status, seconds, error=error, where=where)
    return run


INJECTED = ("injected-parameters", "papermill-error-cell-tag")  # cells papermill adds to the executed notebook


def source_location(path: Path, executed, cell: int) -> str:
    """Where cell ``cell`` of the executed notebook is in the source: "cell N" counting the source's cells from 1
    (papermill's injected cells left out) and, for a percent-format source, "NAME.py line L" of its ``# %%``."""
    injected = sum(bool(set(c.metadata.get("tags", [])) & set(INJECTED)) for c in executed.cells[:cell])
    number = cell - injected + 1
    where = f"cell {number} of {path.name}"
    if path.suffix == ".py":
        markers = [i + 1 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if line.startswith("# %%")]
        if number <= len(markers):
            where = f"{path.name} line {markers[number - 1]} (cell {number})"
    return where


def figure_files(out_dir: Path) -> list[str]:
    """The run's PNG figures in the order the notebook saved them (figures.json), then any others by name."""
    listed = []
    manifest = out_dir / "figures.json"
    if manifest.exists():
        try:
            listed = [e["file"] for e in json.loads(manifest.read_text()) if (out_dir / e["file"]).exists()]
        except (ValueError, KeyError, TypeError):
            listed = []
    return listed + sorted(p.name for p in out_dir.glob("*.png") if p.name not in listed)


OUTPUT_PATTERNS = ("*.png", "*.svg", "*.pdf", "*.html", "figures.json", "metrics.json")  # what a notebook run writes


def clear_outputs(out_dir: str | os.PathLike, name: str) -> None:
    """Remove the outputs of an earlier run of notebook ``name`` from its folder: the executed notebook, figures,
    pages, figures.json and metrics.json. Other files (a study database, plotly.min.js) stay."""
    out_dir = Path(out_dir)
    for p in [out_dir / f"{name}.ipynb", *(q for pattern in OUTPUT_PATTERNS for q in out_dir.glob(pattern))]:
        if p.is_file():
            p.unlink()


def _refuse_out_dir(parameters: dict | None) -> None:
    if parameters and "out_dir" in parameters:
        raise ConfigError(f"-p out_dir {parameters['out_dir']!r}: the report sets each notebook's out_dir to <--out>/<name> itself "
                          "(so the index finds its outputs); choose the folder with --out instead")


def _metrics(run: NotebookRun) -> dict:
    path = Path(run.out_dir) / "metrics.json"
    try:
        return json.loads(path.read_text()) if run.metrics and path.exists() else {}
    except ValueError:
        return {}


def _captions(run: NotebookRun) -> dict[str, str]:
    path = Path(run.out_dir) / "figures.json"
    try:
        return {e["file"]: e.get("title", "") for e in json.loads(path.read_text())} if path.exists() else {}
    except (ValueError, KeyError, TypeError):
        return {}


def _parameter_table(params: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td><code>{html.escape(json.dumps(v))}</code></td></tr>" for k, v in params.items())
    return f"<table class='params'>{rows}</table>"


def _section(r: NotebookRun, index_dir: Path | None = None) -> str:
    import mistune

    rel = os.path.relpath(r.out_dir, index_dir) if index_dir is not None else r.name
    base = html.escape(Path(rel).as_posix()) + "/"
    colour = "#070" if r.status == "ok" else "#b00"
    m = _metrics(r)
    conclusion = mistune.html(m["conclusion"]) if r.status == "ok" and m.get("conclusion") else ""
    err = (f"<p class='error'>failed in {html.escape(r.where or f'cell {r.cell}')} (<code>{html.escape(r.cell_source or '')}</code>): "
           f"{html.escape(r.error or '')}</p>") if r.status != "ok" else ""
    captions = _captions(r)
    figs = "".join(f"<figure><a href='{base}{html.escape(f)}'><img src='{base}{html.escape(f)}' alt='{html.escape(captions.get(f, f))}'></a>"
                   f"<figcaption>{html.escape(captions.get(f) or f)}</figcaption></figure>" for f in r.figures)
    pages = " · ".join(f"<a href='{base}{html.escape(p)}'>{html.escape(p)} (interactive)</a>" for p in r.pages if p != "plotly.min.js")
    links = " · ".join(x for x in (f"<a href='{base}{html.escape(r.notebook)}'>executed notebook</a>",
                                   f"<a href='{base}{r.metrics}'>metrics.json</a>" if r.metrics else "no metrics.json", pages) if x)
    used = m.get("params") or r.parameters
    fixes = f"<details><summary>fix knobs used</summary>{_parameter_table(m['fixes'])}</details>" if m.get("fixes") else ""
    return (f"<section id='{html.escape(r.name)}'><h2>{html.escape(r.name)} <span style='color:{colour}'>{r.status}</span> "
            f"<small>{r.seconds:.1f} s (kernel {r.kernel_seconds:.1f} s)</small></h2>{err}"
            f"<div class='conclusion'>{conclusion}</div><div class='figs'>{figs}</div><p>{links}</p>"
            f"<details><summary>parameters used</summary>{_parameter_table(used)}</details>{fixes}</section>")


def write_index(runs: list[NotebookRun], out_root: str | os.PathLike = "runs", history: list[dict] | None = None) -> Path:
    """``out_root/index.html`` (and index.json), a results page: per notebook its status and time, the conclusion
    its run computed, its figures in the notebook's order with their titles, the parameters it actually ran with
    (the validated values, defaults included, as the notebook recorded them), and links (relative to
    ``out_root``) to the executed notebook, metrics.json and the interactive pages. ``history``: report run
    manifests (with "path") listed at the end, newest first."""
    out_root = Path(out_root)
    toc = " · ".join(f"<a href='#{html.escape(r.name)}' style='color:{'#070' if r.status == 'ok' else '#b00'}'>{html.escape(r.name)}</a>"
                     for r in runs)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>workbench report</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 12px} section{border-bottom:1px solid #ddd;padding-bottom:12px}"
            ".figs{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;flex:1 1 560px;max-width:100%}"
            "figure img{width:100%;border:1px solid #ccc} figcaption{font-size:0.85em;color:#444}"
            ".conclusion{background:#f6f8fa;padding:2px 12px;border-left:4px solid #6a8} table.params{font-size:0.85em;border-collapse:collapse}"
            "table.params td{padding:1px 8px;border-bottom:1px solid #eee} .error{color:#b00}</style></head><body><h1>workbench report</h1>"
            f"<p>{sum(r.status == 'ok' for r in runs)}/{len(runs)} notebooks ok, {time.strftime('%Y-%m-%d %H:%M:%S')}: {toc}</p>"
            + "".join(_section(r, out_root.resolve()) for r in runs) + _history(history or [], out_root) + "</body></html>")
    atomic_write_json(out_root / "index.json", [asdict(r) | {"kernel_seconds": r.kernel_seconds} for r in runs])
    return atomic_write_text(out_root / "index.html", page)


def _history(history: list[dict], out_root: Path) -> str:
    if not history:
        return ""

    def link(m: dict) -> str:
        return html.escape(Path(os.path.relpath(m["path"], out_root.resolve())).as_posix()) + "/index.html"

    rows = "".join(
        f"<tr><td>{html.escape(str(m.get('time')))}</td><td><a href='{link(m)}'>{html.escape(Path(m['path']).name)}</a></td>"
        f"<td>{html.escape(str(m.get('status')))}</td>"
        f"<td><code>{html.escape((m.get('commit') or '-')[:10] + ('+' if m.get('dirty') else ''))}</code></td>"
        f"<td>{html.escape(', '.join(m.get('notebooks') or []))}</td></tr>" for m in reversed(history))
    return (f"<section id='runs'><h2>report runs</h2><table class='params'><tr><th>time (UTC)</th><th>run</th><th>status</th>"
            f"<th>commit</th><th>notebooks</th></tr>{rows}</table></section>")


def read_index(out_root: str | os.PathLike) -> list[NotebookRun]:
    """The notebook entries of ``out_root/index.json`` ([] when there is none or it cannot be read)."""
    path = Path(out_root) / "index.json"
    try:
        entries = json.loads(path.read_text())
        names = set(NotebookRun.__dataclass_fields__)
        return [NotebookRun(**{k: v for k, v in e.items() if k in names}) for e in entries]
    except (FileNotFoundError, ValueError, TypeError, UnicodeDecodeError):
        return []


def update_index(runs: list[NotebookRun], out_root: str | os.PathLike = "runs") -> Path:
    """The accumulating ``out_root/index.html``: the entries of ``runs`` replace those of the same notebooks, the
    other notebooks' entries (from earlier reports) stay; every report run under ``out_root`` is listed."""
    mine = {r.name for r in runs}
    kept = [r for r in read_index(out_root) if r.name not in mine and Path(r.out_dir).is_dir()]
    merged = sorted(kept + list(runs), key=lambda r: r.name)
    return write_index(merged, out_root, history=list_runs(out_root, depth=1))


def validate_parameters(notebooks: list[Path], parameters: dict | None = None, ci: bool = False) -> dict[Path, dict]:
    """{notebook: the parameters it gets} after every check a run would make, before anything is written: ``out_dir``
    refused, every name declared by some notebook, and the values of each notebook that has a parameter class in
    :mod:`workbench.params` validated by it (ConfigError naming the notebook and field)."""
    from .params import NOTEBOOK_PARAMS

    parameters = parameters or {}
    _refuse_out_dir(parameters)
    declared = {p: set(notebook_parameters(p)) for p in notebooks}
    unknown = sorted(k for k in parameters if not any(k in d for d in declared.values()))
    if unknown:
        raise ConfigError(f"-p {', '.join(unknown)}: not a parameter of {', '.join(p.stem for p in notebooks)} (see --help-notebook NAME)")
    out = {}
    for path in notebooks:
        mine = {k: v for k, v in parameters.items() if k in declared[path]}
        cls = NOTEBOOK_PARAMS.get(path.stem)
        if cls is not None:
            try:
                cls.from_dict({**(ci_parameters(path.stem) if ci else {}), **mine})
            except ConfigError as e:
                raise ConfigError(f"{path.stem}: {e} (nothing was run or removed)") from None
        out[path] = mine
    return out


def run_report(notebooks: list[Path], out_root: str | os.PathLike = "runs", parameters: dict | None = None, ci: bool = False,
               progress: bool = True, kernel_name: str = KERNEL, run_name: str | None = None) -> list[NotebookRun]:
    """Run ``notebooks`` in order (every one, even after a failure) into a new report run folder under ``out_root``
    (``run_name``: that folder's name instead, reused if it exists), writing its index and the accumulating
    ``out_root/index.html`` after each. ``parameters`` go to each notebook that declares them; a name no
    notebook declares, or a value a notebook's parameter class refuses, fails before anything is written.
    Each returned run's ``out_dir`` is ``<out_root>/<run>/<name>``."""
    from tqdm.auto import tqdm

    per_notebook = validate_parameters(notebooks, parameters, ci)
    out_root = Path(out_root)
    if run_name:
        if Path(run_name).name != run_name or run_name in (".", ".."):
            raise ConfigError(f"--run {run_name!r}: expected a folder name (no /), e.g. baseline")
        run_dir = out_root / run_name
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(out_root, "report")
    start_run(run_dir, "report", run_dir.name, {"parameters": parameters or {}, "ci": ci}, notebooks=[p.stem for p in notebooks])
    t0 = time.perf_counter()
    runs = []
    bar = tqdm(notebooks, desc="notebooks", unit="nb", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.stem)
        runs.append(run_notebook(path, run_dir, per_notebook[path], ci=ci, kernel_name=kernel_name, progress=progress))
        write_index(runs, run_dir)
        update_index(runs, out_root)
    finish_run(run_dir, "ok" if all(r.status == "ok" for r in runs) else "failed", time.perf_counter() - t0,
               failed=[r.name for r in runs if r.status != "ok"])
    update_index(runs, out_root)  # the run list shows the finished status
    return runs
