"""`workbench compare --out DIR` writes its outputs as one unit (compare.json, table.md, then manifest.json naming
each entry's config and the files' checksums); a failed rerun never leaves an old table beside new run folders; every
argument (--snrs, --out, free disk) is checked before anything is simulated, naming the option."""

from __future__ import annotations

import json

import pytest

from workbench import cli
from workbench.cli import compare as cli_compare

RUN = ["compare", "--budget", "tiny", "--presets", "seed_before", "--snrs", "20", "--n-per-snr", "2", "--no-progress", "--threads", "1"]


@pytest.fixture
def no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the comparison started before its arguments were checked")

    monkeypatch.setattr(cli_compare, "compare", boom)


@pytest.mark.parametrize("snrs", ["nan", "inf", "1e9", "-1000", "0,-inf"])
def test_bad_snrs_are_refused_before_anything_naming_the_option(tmp_path, capsys, no_work, snrs):
    assert cli.main(["compare", "--snrs", snrs, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--snrs" in err and "[-60, 100]" in err and "snr_db_min" in err.split("(")[-1] and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_out_that_is_a_file_or_not_creatable_is_refused_before_anything(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    assert cli.main(["compare", "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["compare", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_full_disk_is_refused_before_anything(tmp_path, capsys, no_work, monkeypatch):
    import shutil

    monkeypatch.setattr(cli_compare.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    assert cli.main(["compare", "--budget", "tiny", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "free" in err, err


def test_a_failed_rerun_leaves_no_table_beside_new_runs_and_a_refused_one_keeps_the_old_set(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    assert cli.main([*RUN, "--out", str(out)]) == 0
    manifest = cli_compare.current_outputs(out)
    assert manifest is not None and manifest["entries"]["seed_before"]["config"]["train"]["lr"] == pytest.approx(1e-3)
    assert set(manifest["files"]) == {"compare.json", "table.md"}
    old = {name: (out / name).read_bytes() for name in ("compare.json", "table.md", "manifest.json")}
    # refused at its arguments: the old set stays complete and current
    assert cli.main([*RUN, "--out", str(out), "--set", "train.lr", "0.003", "--snrs", "nan"]) == 2
    assert {name: (out / name).read_bytes() for name in old} == old and cli_compare.current_outputs(out) is not None

    # fails after new run folders were written: nothing is marked current, and the old table is gone
    def fails_midway(entries, overrides, out_dir, *a, **k):
        (out_dir / "seed_before" / "marker-of-a-new-run").write_text(json.dumps(overrides.get("train.lr")))
        raise RuntimeError("killed midway")

    monkeypatch.setattr(cli_compare, "compare", fails_midway)
    with pytest.raises(RuntimeError):
        cli.main([*RUN, "--out", str(out), "--set", "train.lr", "0.003"])
    assert cli_compare.current_outputs(out) is None
    assert not any((out / name).exists() for name in old)
    # an edited table is not current either
    monkeypatch.undo()
    assert cli.main([*RUN, "--out", str(out)]) == 0 and cli_compare.current_outputs(out) is not None
    (out / "table.md").write_text("edited")
    assert cli_compare.current_outputs(out) is None
