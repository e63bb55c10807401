"""Runs with an identity (workbench.runs): manifests, listing runs and ``workbench runs diff`` on two small
synthetic run folders written by the test."""

from __future__ import annotations

import json

import pytest

from workbench import runs
from workbench.cli import main
from workbench.config import ConfigError


def _run(folder, name, params, metrics, status="ok"):
    runs.start_run(folder, "train", name, params, device="cpu")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    runs.finish_run(folder, status, 1.5)


@pytest.fixture
def two_runs(tmp_path):
    a, b = tmp_path / "runs" / "train-a", tmp_path / "runs" / "train-b"
    _run(a, "a", {"preset": "recommended", "train": {"lr": 1e-3}, "only_a": 1},
         {"val_nmse": 0.25, "history": [{"loss": 2.0}, {"loss": 1.0}], "ok": True, "note": "text", "missing": None})
    _run(b, "b", {"preset": "recommended", "train": {"lr": 1e-2}}, {"val_nmse": 0.5, "history": [{"loss": 3.0}], "extra": {"x": 7}}, "failed")
    return tmp_path / "runs", a, b


def test_manifest_fields(two_runs):
    _, a, _ = two_runs
    m = runs.read_run(a)
    assert m["kind"] == "train" and m["status"] == "ok" and m["seconds"] == 1.5 and m["device"] == "cpu"
    assert set(m["versions"]) == {"python", "workbench", "torch", "numpy", "optuna"} and m["time"].endswith("+00:00")
    commit, dirty = runs.git_state()
    assert m["commit"] == commit and m["dirty"] == dirty
    assert runs.git_state(a) == (None, None) or runs.git_state(a)[0] == commit  # not a checkout of its own


def test_git_state_outside_a_checkout(tmp_path):
    assert runs.git_state(tmp_path / "nowhere") == (None, None)


def test_flatten_keeps_numbers_only():
    flat = runs.flatten({"a": 1, "b": {"c": [0.5, {"d": 2}]}, "t": True, "s": "x", "n": None})
    assert flat == {"a": 1, "b.c.0": 0.5, "b.c.1.d": 2}


def test_diff_rows(two_runs):
    root, a, b = two_runs
    d = runs.diff_runs("train-a", str(b), root)  # a name under the root, or a path
    rows = {(s, k): (va, vb) for s, k, va, vb in d["rows"]}
    assert rows[("run", "status")] == ("ok", "failed")
    assert rows[("parameters", "train.lr")] == (1e-3, 1e-2) and rows[("parameters", "only_a")] == (1, None)
    assert rows[("parameters", "preset")] == ("recommended", "recommended")
    assert rows[("metrics", "val_nmse")] == (0.25, 0.5) and rows[("metrics", "history.1.loss")] == (1.0, None)
    assert rows[("metrics", "extra.x")] == (None, 7)
    assert not any(k in ("ok", "note", "missing") for s, k in rows if s == "metrics")  # numbers only
    changed = runs.diff_runs(a, b, root, only_different=True)["rows"]
    assert ("parameters", "preset", "recommended", "recommended") not in changed and ("metrics", "val_nmse", 0.25, 0.5) in changed


def test_runs_cli_lists_and_diffs(two_runs, capsys):
    root, a, b = two_runs
    (root / "data-like").mkdir()
    (root / "data-like" / "manifest.json").write_text(json.dumps({"format": 2}))  # a dataset's manifest: not a run
    assert main(["runs", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert str(a) in out and str(b) in out and "data-like" not in out and "failed" in out
    assert main(["runs", "diff", "train-a", "train-b", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("val_nmse"))
    assert line.split()[:3] == ["val_nmse", "0.25", "0.5"] and line.rstrip().endswith("*")
    assert "[parameters]" in out and "[metrics]" in out and "train.lr" in out


def test_unknown_run_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no run folder"):
        runs.resolve_run("nope", tmp_path)
    assert main(["runs", "diff", "nope", "nope2", "--root", str(tmp_path)]) == 2
    assert "workbench runs: error: run 'nope'" in capsys.readouterr().err


def test_new_run_dirs_are_distinct(tmp_path):
    first, second = runs.new_run_dir(tmp_path, "report"), runs.new_run_dir(tmp_path, "report")
    assert first != second and first.is_dir() and second.is_dir() and first.name.startswith("report-")


# ---------------------------------------------------------------------------------------------
# notebook 04's runs cell: the two latest runs of the notebook side by side, through diff_runs
def _notebook_run(folder, name, epochs, val):
    runs.start_run(folder, "notebook", name, {"epochs": epochs, "presets": "recommended"})
    (folder / "metrics.json").write_text(json.dumps({"rows": [{"final val NMSE": val}]}))
    runs.finish_run(folder, "ok", 2.0)


def test_notebook_runs_and_the_runs_root(tmp_path, monkeypatch):
    root = tmp_path / "out"
    runs.start_run(root / "report-1", "report", "report-1")
    _notebook_run(root / "report-1" / "04_training", "04_training", 2, 0.5)
    _notebook_run(root / "report-1" / "02_eigen_spectrum", "02_eigen_spectrum", 2, 0.1)
    runs.start_run(root / "04_training" / "panels" / "train-x", "panel", "04_training/train-x", {"notebook": "04_training", "action": "train"})
    found = runs.notebook_runs("04_training", root)
    assert sorted(m["kind"] for m in found) == ["notebook", "panel"] and all("02_eigen" not in m["path"] for m in found)
    assert runs.runs_root_of(root / "report-1" / "04_training") == root  # a report's notebook folder: the report's --out
    assert runs.report_of(root / "report-1" / "04_training") == root / "report-1" / "04_training"
    assert runs.report_of(root / "04_training") is None
    monkeypatch.setenv("WORKBENCH_ROOT", str(tmp_path / "checkout"))
    assert runs.runs_root_of(root / "04_training") == tmp_path / "checkout" / "runs"  # a lab out_dir: the checkout's runs/


def test_notebook_04_runs_cell_shows_diff_runs(tmp_path, monkeypatch):
    """The cell of notebook 04 run on two report runs: it shows exactly diff_runs' changed rows (the CLI's function)."""
    import jupytext
    from IPython.display import Markdown

    from workbench.figures.runs import diff_markdown
    from workbench.report import notebook_path

    root = tmp_path / "out"
    for i, (epochs, val) in enumerate(((2, 0.5), (3, 0.25))):
        runs.start_run(root / f"report-{i}", "report", f"report-{i}")
        _notebook_run(root / f"report-{i}" / "04_training", "04_training", epochs, val)
    cell = next(c.source for c in jupytext.read(notebook_path("04_training")).cells if "notebook_runs(" in c.source)
    assert "diff_runs(" in cell and "def " not in cell  # no second implementation in the notebook
    shown = []
    ns = {"out": root / "report-1" / "04_training", "display": shown.append, "Markdown": Markdown, "notebook_runs": runs.notebook_runs,
          "runs_root_of": runs.runs_root_of, "diff_runs": runs.diff_runs, "fig_runs": __import__("workbench.figures.runs").figures.runs}
    exec(cell, ns)  # noqa: S102 - our own notebook's cell
    want = runs.diff_runs(root / "report-0" / "04_training", root / "report-1" / "04_training", only_different=True)
    assert [m.data for m in shown] == [diff_markdown(want)]
    text = shown[0].data
    assert "| parameters | epochs | 2 | 3 | ≠ |" in text and "| metrics | rows.0.final val NMSE | 0.5 | 0.25 | ≠ |" in text
    assert "| parameters | presets |" not in text  # equal rows are left out
    # with one run only, it says so
    shown.clear()
    ns["out"] = tmp_path / "other" / "04_training"
    monkeypatch.setenv("WORKBENCH_ROOT", str(tmp_path / "empty"))
    exec(cell, ns)  # noqa: S102
    assert "Fewer than two runs" in shown[0].data


def test_diff_markdown_caps_the_rows(two_runs):
    from workbench.figures.runs import diff_markdown

    root, a, b = two_runs
    d = runs.diff_runs(a, b, root)
    text = diff_markdown(d, max_rows=3)
    assert text.count("\n| ") == 4 and f"{len(d['rows']) - 3} more rows: `workbench runs diff {a} {b}`" in text
