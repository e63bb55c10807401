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
