"""Reports survive a dead kernel and never show stale results: a notebook whose kernel is killed (kill -9 from a
cell) is marked failed, the notebooks after it still run and the index is written; the outputs of an earlier run
in the same folder are cleared first; `-p out_dir` is refused, not ignored. Tiny notebooks written by the test."""

from __future__ import annotations

import json

import nbformat

from workbench.cli import main

PARAMETERS = 'out_dir: str = "."  # where the outputs go'
WRITE_OUTPUTS = ("import json, pathlib\n"
                 "p = pathlib.Path(out_dir)\n"
                 "(p / 'fig.png').write_bytes(b'\\x89PNG not really')\n"
                 "(p / 'metrics.json').write_text(json.dumps({'ran': True}))")


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, str(path))


def test_a_dead_kernel_fails_its_notebook_only_and_stale_outputs_are_cleared(tmp_path, capsys):
    books, out = tmp_path / "notebooks", tmp_path / "runs"
    books.mkdir()
    _notebook(books / "a_ok.ipynb", WRITE_OUTPUTS)
    _notebook(books / "b_dies.ipynb", "print('before the kill')", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", WRITE_OUTPUTS)
    _notebook(books / "c_after.ipynb", WRITE_OUTPUTS)
    stale = out / "r1" / "b_dies"  # an earlier, successful run of b_dies in the report run r1 left its results here
    stale.mkdir(parents=True)
    for name in ("old.png", "fig.png", "metrics.json", "figures.json", "page.html"):
        (stale / name).write_text("from the previous run")
    (stale / "study.db").write_text("not an output: kept")

    assert main(["report", "--notebooks", str(books), "--out", str(out), "--run", "r1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "notebook b_dies failed" in err and "DeadKernelError" in err

    index = {r["name"]: r for r in json.loads((out / "r1" / "index.json").read_text())}
    assert [index[n]["status"] for n in ("a_ok", "b_dies", "c_after")] == ["ok", "failed", "ok"]  # c ran after the dead kernel
    # cell 3 of the executed notebook (papermill inserts the injected parameters as cell 1)
    dead = index["b_dies"]
    assert dead["figures"] == [] and dead["metrics"] is None and dead["pages"] == []  # nothing from the earlier run
    assert dead["cell"] == 3 and "os.kill" in dead["cell_source"] and "kernel stopped" in dead["error"]
    assert sorted(p.name for p in stale.iterdir()) == ["b_dies.ipynb", "manifest.json", "study.db"]
    assert json.loads((stale / "manifest.json").read_text())["status"] == "failed"
    assert index["c_after"]["figures"] == ["fig.png"] and index["c_after"]["metrics"] == "metrics.json"
    for page in ((out / "r1" / "index.html").read_text(), (out / "index.html").read_text()):  # the run's index and the accumulating one
        assert "b_dies" in page and "failed in cell 3" in page and "from the previous run" not in page
    assert "b_dies" in page and "failed in cell 3" in page and "from the previous run" not in page


def test_out_dir_as_a_parameter_is_refused(tmp_path, capsys):
    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "a_ok.ipynb", WRITE_OUTPUTS)
    assert main(["report", "--notebooks", str(books), "--out", str(tmp_path / "runs"), "-p", "out_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "out_dir" in err and "--out" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()
