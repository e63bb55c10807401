"""Sweeps never hang and never leak: heartbeats of 0 or less are refused, a stale RUNNING trial that never sent a
heartbeat is failed and re-run so `--join` finishes, processes started at the same moment on a new SQLite file or
PostgreSQL database all succeed without starting more trials than asked, `--join` creates no database, a corrupt
SQLite file is named as such, and storage secrets stay out of messages and command lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from workbench import search_space, sweep
from workbench.cli import main
from workbench.config import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY_BUDGET = {"train.epochs": 1, "train.n_train": 8, "train.n_val": 4}
TINY_ARGS = ["--epochs", "1", "--n-train", "8", "--n-val", "4"]
TINY_SPACE = {"preset": "recommended",
              "fixed": {"system.N_H": 4, "system.N_V": 4, "system.M": 4, "system.L": 4, "system.K_max": 2, "model.width": 8,
                        "model.heads": 2, "model.layers": 1, "train.device": "cpu", "train.batch_size": 8,
                        "fixes.rsamp_estimator": "ls_scatter"},
              "params": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(TINY_SPACE))
    return path


# ---------------------------------------------------------------------------------------------
# refused before anything starts
@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_heartbeat_below_one_second_is_refused_naming_the_flag(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--join", "--storage", f"sqlite:///{tmp_path}/x.db", "--heartbeat", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--heartbeat" in err and value in err and ">= 1" in err
    for call in (lambda: sweep.run_worker(f"sqlite:///{tmp_path}/x.db", "s", 1, heartbeat=int(value)),
                 lambda: sweep.run_sweep(TINY_SPACE["params"], trials=1, storage=f"sqlite:///{tmp_path}/x.db", heartbeat=int(value))):
        with pytest.raises(ConfigError, match="heartbeat"):
            call()
    assert not list(tmp_path.iterdir())


def test_join_on_a_missing_sqlite_file_creates_nothing(tmp_path, capsys):
    assert main(["sweep", "--join", "--storage", f"sqlite:///{tmp_path}/sub/none.db"]) == 2
    assert "does not exist" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("join", [True, False])
def test_a_corrupt_sqlite_file_is_named_not_a_traceback(tmp_path, capsys, space_file, join):
    db = tmp_path / "optuna.db"
    db.write_bytes(b"this is not a database, just some notes\n" * 200)
    args = ["sweep", "--storage", f"sqlite:///{db}"] + (["--join"] if join else ["--space", str(space_file), "--trials", "1"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{db} is not a valid SQLite database" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# secrets
@pytest.mark.parametrize("url, secret, kept", [
    ("postgresql+psycopg2://u:hunter2@db.example:5432/x", "hunter2", "u:***@db.example:5432/x"),
    ("postgresql+psycopg2://us@er:p@ss@db.example/x", "p@ss", "@db.example/x"),
    ("postgresql://u:pw%40rd@db.example/x", "pw%40rd", "u:***@db.example/x"),
    ("postgresql://db.example/x?password=s3cret&sslmode=require", "s3cret", "sslmode=require"),
])
def test_storage_urls_are_masked_by_parsing(url, secret, kept):
    masked = sweep.mask_url(url)
    assert secret not in masked and kept in masked and "***" in masked
    assert sweep.mask_url("sqlite:////tmp/runs/optuna.db") == "sqlite:////tmp/runs/optuna.db"


def test_an_unencoded_at_in_the_user_info_is_refused_without_leaking(capsys):
    assert main(["sweep", "--join", "--storage", "postgresql+psycopg2://us@er:top@secret@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err
    assert "%40" in err and "top@secret" not in err and "secret" not in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/PID/cmdline")
def test_workers_get_the_storage_url_from_the_environment_not_the_command_line():
    url = "postgresql+psycopg2://someone:Sup3rSecret@127.0.0.1:1/nodb"
    p = sweep.spawn_worker(url, "s", 1, heartbeat=1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        cmdline = ""
        deadline = time.monotonic() + 30
        while "workbench" not in cmdline and p.poll() is None and time.monotonic() < deadline:
            cmdline = open(f"/proc/{p.pid}/cmdline", "rb").read().decode()  # what `ps` shows
            time.sleep(0.01)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert "sweep" in cmdline and "--join" in cmdline and "Sup3rSecret" not in cmdline and "127.0.0.1" not in cmdline
    assert p.returncode == 2 and "127.0.0.1:1" in err and "Sup3rSecret" not in err  # it did get the URL, masked in its error


# ---------------------------------------------------------------------------------------------
# never hang
def test_join_finishes_a_study_whose_running_trial_never_sent_a_heartbeat(tmp_path):
    """A worker killed between creating its trial and the first heartbeat (or one run without heartbeats) leaves a
    RUNNING trial with no heartbeat at all: Optuna's stale check skips it, so a joining worker used to wait for ever."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    space = search_space.load_space(TINY_SPACE, overrides=TINY_BUDGET)
    sweep.create_study(space, url, "stale", pruner="none")
    orphan = optuna.load_study(study_name="stale", storage=sweep.open_storage(url, heartbeat=None)).ask()  # RUNNING, silent
    space.suggest(orphan)  # its parameters are drawn: the retry must reuse them
    joiner = subprocess.Popen([sys.executable, "-m", "workbench.cli", "sweep", "--join", "--storage", url, "--study", "stale", "--trials", "1",
                               "--heartbeat", "1", "--grace", "2"], env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = joiner.communicate(timeout=120)
    finally:
        if joiner.poll() is None:
            joiner.kill()
    assert joiner.returncode == 0, err[-2000:]
    trials = sweep.load_study(url, "stale", heartbeat=None).trials
    assert trials[orphan.number].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == trials[orphan.number].params


BARRIER = r"""
import os, runpy, sys, time
import workbench.sweep
ready, go, *argv = sys.argv[1:]
script = argv[0] == "--run"  # a script with its arguments, else a workbench command
if not script:
    from workbench.cli import main
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
if script:
    sys.argv = argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)
sys.exit(main(argv))
"""


def _together(tmp_path, commands, timeout=180):
    """Start one process per argument list (each runs BARRIER: imports, then waits for the go file), release them at
    the same moment, and return [(returncode, stderr)]."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER, str(tmp_path / f"ready{i}"), str(go), *argv], env=CHILD_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, argv in enumerate(commands)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(len(procs))) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        results = []
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


CREATE = r"""
import sys
from workbench import search_space, sweep
sweep.create_study(search_space.load_space({"train.lr": [0.001, 0.01]}), sys.argv[1], "created", pruner="none")
"""


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_many_processes_creating_a_study_on_a_new_database_at_the_same_moment_all_succeed(tmp_path, request, backend):
    """The schema and study creation race (alembic_version UNIQUE on SQLite, CREATE TABLE on PostgreSQL), with light
    processes that only create the study, released together."""
    url = f"sqlite:///{tmp_path}/new.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    script = tmp_path / "create.py"
    script.write_text(CREATE)
    results = _together(tmp_path, [["--run", str(script), url]] * 6)
    for code, err in results:
        assert code == 0, err[-2000:]
    assert sweep.study_space(sweep.load_study(url, "created", heartbeat=None))[0].params


def test_processes_started_together_on_a_new_database_all_succeed_without_extra_trials(tmp_path, space_file):
    """The whole command, twice at the same moment on a new SQLite file (PostgreSQL: the creation race above, and the
    claim lock in test_sweep.py's killed-worker test)."""
    url = f"sqlite:///{tmp_path}/new.db"
    target = 2  # two workers could each start the last trial: 3 without the claim lock
    argv = ["sweep", "--space", str(space_file), "--storage", url, "--study", "together", "--trials", str(target), "--heartbeat", "1",
            "--pruner", "none", "--threads", "1", *TINY_ARGS]
    for code, err in _together(tmp_path, [[*argv, "--seed", str(i)] for i in range(2)]):
        assert code == 0, err[-2000:]
    trials = sweep.load_study(url, "together", heartbeat=None).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * target  # exactly as many trials as asked, none failed


def test_join_refuses_options_that_conflict_with_the_stored_study_naming_each(tmp_path, capsys, space_file):
    """`--join` used to ignore --space/--preset/--set/--epochs silently (trials ran lr 0.0055 when [0.5, 0.9] was asked)."""
    url = f"sqlite:///{tmp_path}/join.db"
    stored = search_space.load_space(TINY_SPACE, overrides=TINY_BUDGET)
    sweep.create_study(stored, url, "s")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_SPACE, "params": {"train.lr": {"type": "float", "low": 0.5, "high": 0.9}}}))
    base = ["sweep", "--join", "--storage", url, "--study", "s", "--trials", "1"]
    assert main([*base, "--space", str(other), "--epochs", "5", "--set", "train.batch_size", "4"]) == 2
    err = capsys.readouterr().err
    for needle in ("--epochs 5 (the study has 1)", "--set train.batch_size 4 (the study has 8)", "--space", "searched knobs train.lr"):
        assert needle in err, err
    assert main([*base, "--preset", "seed_before"]) == 2
    err = capsys.readouterr().err
    assert "--preset (differ from the study in" in err and "fixes." in err, err
    assert optuna.load_study(study_name="s", storage=url).get_trials() == []  # nothing ran
    # options equal to the stored ones are accepted (the same command as the creation, plus --join)
    s = optuna.load_study(study_name="s", storage=url)
    space, settings = sweep.study_space(s)
    assert sweep.join_conflicts(space, settings, space=str(space_file), epochs=1, n_train=8, n_val=4, pruner="median",
                                overrides={"train.batch_size": 8}) == []
