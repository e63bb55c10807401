"""The report's pure helpers: notebook selection, parameter reading, refusing unknown parameters, the index page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench import report
from workbench.config import ConfigError, parse_value

NOTEBOOKS = report.list_notebooks()


def test_select_and_parse_value():
    assert [p.stem for p in report.select(NOTEBOOKS, ["03"])] == ["03_nan_gradients"]
    with pytest.raises(ConfigError, match="no such notebook"):
        report.select(NOTEBOOKS, ["99"])
    assert parse_value("1e-3") == 1e-3 and parse_value("true") is True and parse_value("eigh") == "eigh"


def test_notebook_parameters_read_modern_annotations_and_comments():
    ps = report.notebook_parameters(report.notebook_path("02_eigen_spectrum"))
    assert ps["c_eps"] == {"type": "float | None", "default": "None", "help": ps["c_eps"]["help"]}
    assert "preset's value" in ps["c_eps"]["help"] and ps["n_scenes"]["type"] == "int"


def test_unknown_parameter_fails_before_running(tmp_path):
    with pytest.raises(ConfigError, match="not a parameter"):
        report.run_report(NOTEBOOKS[:1], tmp_path, {"no_such_param": 1}, progress=False)
    assert not any(tmp_path.iterdir())


def test_write_index_links_everything(tmp_path):
    run = report.NotebookRun(name="x", status="failed", out_dir=str(tmp_path / "x"), notebook="x.ipynb", parameters={"a": 1}, seconds=3.0,
                             cell_seconds=[0.5, 1.0], error="ConfigError: bad", cell=3, cell_source="[config] p = 1",
                             figures=["f.png"], pages=["s.html"], metrics="metrics.json")
    page = report.write_index([run], tmp_path).read_text()
    for needle in ("x/x.ipynb", "x/f.png", "x/s.html", "x/metrics.json", "failed in cell 3", "ConfigError: bad"):
        assert needle in page
    data = json.loads((tmp_path / "index.json").read_text())
    assert data[0]["kernel_seconds"] == pytest.approx(1.5)


def test_outputs_are_readable_by_the_group(tmp_path):
    """Figures, figures.json and metrics.json are 0644 like any ordinary file (mkstemp's temporary file is 0600)."""
    import matplotlib.pyplot as plt

    from workbench import figures
    from workbench.io import save_metrics

    fig, ax = plt.subplots()
    ax.set(title="t", xlabel="x", ylabel="y")
    figures.save_figure(fig, tmp_path / "f.png")
    save_metrics(tmp_path, {"a": 1.0})
    for name in ("f.png", "figures.json", "metrics.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# ---------------------------------------------------------------------------------------------
# Runs with an identity: each report is its own run folder; the index accumulates; -p is validated first.
# Tiny notebooks written by the test keep these cheap (one kernel start per notebook run).
def _tiny_notebook(path, *sources, parameters='out_dir: str = "."  # where the outputs go'):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, str(path))


WRITE_METRICS = ("import json, pathlib\n"
                 "(pathlib.Path(out_dir) / 'metrics.json').write_text(json.dumps({'ran': 1}))")


def test_a_bad_parameter_leaves_earlier_results_intact(tmp_path, capsys):
    """``report --only 02 -p c_eps -1`` is refused by 02's parameter class before anything is created or removed."""
    from workbench.cli import main

    out = tmp_path / "runs"
    old = out / "report-earlier" / "02_eigen_spectrum"
    old.mkdir(parents=True)
    for name in ("02_eigen_spectrum.ipynb", "spectrum.png", "metrics.json", "figures.json"):
        (old / name).write_text("good results of an earlier run")
    good = report.NotebookRun(name="02_eigen_spectrum", status="ok", out_dir=str(old), notebook="02_eigen_spectrum.ipynb", parameters={},
                              seconds=1.0, figures=["spectrum.png"], metrics="metrics.json")
    report.write_index([good], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    assert main(["report", "--only", "02", "-p", "c_eps", "-1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "02_eigen_spectrum" in err and "c_eps = -1.0 is out of range" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing removed, changed or added
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "index.json", "report-earlier"]


def test_only_keeps_the_other_entries_of_the_index(tmp_path):
    books, out = tmp_path / "notebooks", tmp_path / "runs"
    books.mkdir()
    for name in ("a_first", "b_second"):
        _tiny_notebook(books / f"{name}.ipynb", WRITE_METRICS)
    notebooks = report.list_notebooks(books)
    first = report.run_report(notebooks, out, progress=False)
    second = report.run_report(report.select(notebooks, ["a"]), out, progress=False)
    run1, run2 = Path(first[0].out_dir).parent, Path(second[0].out_dir).parent
    assert run1 != run2 and run1.parent == run2.parent == out  # each report in a run folder of its own

    index = {r["name"]: r for r in json.loads((out / "index.json").read_text())}
    assert sorted(index) == ["a_first", "b_second"]  # --only a kept b's entry
    assert Path(index["a_first"]["out_dir"]) == run2 / "a_first" and Path(index["b_second"]["out_dir"]) == run1 / "b_second"
    page = (out / "index.html").read_text()
    for needle in (f"{run2.name}/a_first/metrics.json", f"{run1.name}/b_second/metrics.json", f"{run1.name}/index.html", f"{run2.name}/index.html"):
        assert needle in page
    assert [r["name"] for r in json.loads((run2 / "index.json").read_text())] == ["a_first"]  # the run's own index
    for run in (run1, run2):  # every run and notebook folder carries a manifest
        m = json.loads((run / "manifest.json").read_text())
        assert m["kind"] == "report" and m["status"] == "ok" and set(m["versions"]) >= {"workbench", "torch", "numpy", "optuna"}
        assert "commit" in m and "dirty" in m and m["device"]
    nb = json.loads((run2 / "a_first" / "manifest.json").read_text())
    assert nb["kind"] == "notebook" and nb["status"] == "ok" and nb["parameters"]["out_dir"] == str((run2 / "a_first").resolve())


def test_two_reports_never_share_an_optuna_study(tmp_path):
    """Notebook 06's default storage is a file under its out_dir, and each report has its own run folder: a tiny
    stand-in named 06_sweep records the storage URL that 06's parameters give in each report's folder."""
    books, out = tmp_path / "notebooks", tmp_path / "runs"
    books.mkdir()
    _tiny_notebook(books / "06_sweep.ipynb", "import json, pathlib\nimport workbench.params as wp\n"
                   "p = wp.notebook_params('06_sweep', out_dir=out_dir)\n"
                   "(pathlib.Path(out_dir) / 'metrics.json').write_text(json.dumps({'storage': p.storage_url}))")
    urls = []
    for _ in range(2):
        (run,) = report.run_report(report.list_notebooks(books), out, progress=False)
        assert run.status == "ok", run.error
        urls.append(json.loads((Path(run.out_dir) / "metrics.json").read_text())["storage"])
        assert urls[-1] == f"sqlite:///{Path(run.out_dir) / 'optuna.db'}"
    assert urls[0] != urls[1]
    interactive = wp_default_storage()
    assert interactive not in urls


def wp_default_storage() -> str:
    from workbench import params as wp

    return wp.notebook_params("06_sweep").storage_url  # what JupyterLab's 06 uses: runs/06_sweep/optuna.db


def test_help_notebook_does_not_list_out_dir(capsys):
    from workbench.cli import main

    assert main(["report", "--help-notebook", "02"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.split()[:1] == ["out_dir"] for line in lines) and any(line.split()[:1] == ["c_eps"] for line in lines)
