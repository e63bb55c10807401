"""The ``workbench`` command as a whole: argparse only in workbench/cli/, --version, --debug, one error path
(ConfigError: exit 2; OSError: exit 1, one line naming the path and what to do), non-finite --set values,
diagnose's exit code."""

import ast
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import workbench
from workbench.cli import build_parser, main
from workbench.config import SystemConfig, parse_value

PACKAGE = Path(workbench.__file__).resolve().parent
SMALL = SystemConfig(L=4, N_H=4, N_V=4, M=4, K_max=3)
SMALL_DIAGNOSE = ["--set", "system.N_H", "6", "--set", "system.N_V", "6", "--set", "model.width", "16", "--n", "2"]


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (import x.y, from x import y), anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_outside_workbench_cli_imports_argparse():
    files = sorted(PACKAGE.rglob("*.py"))
    cli = [f for f in files if f.relative_to(PACKAGE).parts[0] == "cli"]
    assert cli and any("argparse" in _imports(f) for f in cli)  # the walk does see the cli package's imports
    offenders = [str(f.relative_to(PACKAGE)) for f in files if f not in cli and "argparse" in _imports(f)]
    assert offenders == []


def test_every_subcommand_has_its_own_module_with_register():
    from workbench.cli import COMMAND_MODULES

    for module in COMMAND_MODULES:
        assert module.__name__.startswith("workbench.cli.") and callable(module.register)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == ["data", "seed-table", "estimator-table", "steering-mismatch", "diagnose", "train", "verify", "compare",
                                 "localiser", "sweep", "report", "runs"]


def test_version_prints_workbench_and_torch_versions(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"workbench {workbench.__version__} (torch {torch.__version__})\n"


def test_python_dash_m_workbench_cli_runs_the_command():
    """Sweep workers are started as ``python -m workbench.cli sweep --join``."""
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"workbench {workbench.__version__}")


@pytest.mark.parametrize("text, expected", [("inf", math.inf), ("-inf", -math.inf), ("Infinity", math.inf), ("-Infinity", -math.inf),
                                            ("-5", -5), ("-1e-3", -1e-3), ("[1, 2]", [1, 2]), ("svd", "svd")])
def test_parse_value_reads_infinities_and_numbers(text, expected):
    assert parse_value(text) == expected


@pytest.mark.parametrize("text", ["nan", "NaN"])
def test_parse_value_reads_nan_as_a_float(text):
    value = parse_value(text)
    assert isinstance(value, float) and math.isnan(value)


@pytest.mark.parametrize("value", ["-5", "-1e-3", "-inf", "-Infinity", "-nan", "-10,0"])
def test_negative_values_are_values_not_options(value):
    args = build_parser().parse_args(["train", "--set", "system.snr_db_min", value])
    assert args.set == [["system.snr_db_min", value]]
    args = build_parser().parse_args(["report", "-p", "snrs_db", value])
    assert args.parameter == [["snrs_db", value]]


@pytest.mark.parametrize("value", ["-inf", "-Infinity", "inf", "NaN"])
def test_a_non_finite_set_is_refused_naming_the_field(value, tmp_path, capsys):
    rc = main(["train", "--set", "system.snr_db_min", value, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("workbench train: error: system.snr_db_min = ")
    assert "finite" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_negative_set_value_reaches_the_config(tmp_path, capsys):
    out = tmp_path / "neg"
    assert main(["data", "generate", "--n", "2", "--out", str(out), "--quiet", "--config", json.dumps(SMALL.to_dict()),
                 "--set", "snr_db_min", "-5", "--set", "snr_db_max", "-1e-3"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["config"]["snr_db_min"], m["config"]["snr_db_max"]) == (-5.0, -1e-3)


def test_an_os_error_is_one_line_naming_the_path_and_debug_shows_the_traceback(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = ["data", "generate", "--n", "2", "--out", str(blocker / "data"), "--quiet", "--config", json.dumps(SMALL.to_dict())]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("workbench data: error: ")
    assert str(blocker) in err and "--out" in err and "Traceback" not in err
    with pytest.raises(OSError):
        main(["--debug", *args])
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "--debug", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_a_read_only_folder_is_one_line_and_exit_1(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        args = ["data", "generate", "--n", "2", "--out", str(ro / "data"), "--quiet", "--config", json.dumps(SMALL.to_dict())]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(ro) in err and "permissions" in err and "--out" in err
        assert main(["train", "--out", str(ro / "run"), "--epochs", "1", "--no-progress"]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(ro) in err and "Traceback" not in err
        with pytest.raises(OSError):
            main(["--debug", *args])
    finally:
        ro.chmod(0o700)


def test_config_error_with_debug_is_raised():
    from workbench.config import ConfigError

    with pytest.raises(ConfigError, match="system.snr_db_min"):
        main(["--debug", "train", "--set", "system.snr_db_min", "-inf"])


def test_diagnose_exit_code_says_whether_the_total_is_finite(capsys):
    assert main(["diagnose", *SMALL_DIAGNOSE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    nan = ["diagnose", "--preset", "recommended", "--set", "fixes.subspace_backend", "eigh", "--set", "fixes.c_eps", "1.0"]
    assert main([*nan, *SMALL_DIAGNOSE, "--json"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert record["ok"] is False and any(p["in_total"] for p in record["provenance"])


def test_named_flags_have_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command, flag in [("seed-table", "--seed"), ("train", "--no-progress"), ("verify", "--no-progress"), ("compare", "--no-progress")]:
        action = next(a for a in sub.choices[command]._actions if flag in a.option_strings)
        assert action.help, (command, flag)
    assert "exit code 1" in " ".join(sub.choices["diagnose"].format_help().lower().split())


@pytest.mark.parametrize("error, advice", [
    (OSError(errno.ENOSPC, "No space left on device", "/disk/rows.json"), "free some disk space"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/rows.json"), "check the folder's permissions"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/file/rows.json"), "not a folder"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/dir"), "a folder where a file is expected"),
    (FileExistsError(errno.EEXIST, "File exists", "/x"), "in the way"),
])
def test_each_os_error_names_the_path_and_what_to_do(error, advice, monkeypatch, capsys):
    import workbench.cli.seed_table as cli_seed_table

    def fail(**kwargs):
        raise error

    monkeypatch.setattr(cli_seed_table, "seed_table", fail)
    assert main(["seed-table", "--n", "1", "--json", "rows.json"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("workbench seed-table: error: ")
    assert repr(error.filename) in err and advice in err and error.strerror in err and "Traceback" not in err
    with pytest.raises(type(error)):
        main(["--debug", "seed-table", "--n", "1"])
