"""The report's pure helpers: notebook selection, parameter reading, refusing unknown parameters, the index page."""

from __future__ import annotations

import json

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
