"""A training run folder is consistent and resumable: kill -9 a real `workbench train`, its history.json and
checkpoint.pt still describe the same epoch, and `--resume` ends exactly where an uninterrupted run ends. Bad
checkpoints (another config or architecture, missing keys, non-finite weights), an unusable --out and scenes
with non-finite inputs are refused with clear errors before any training."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from workbench.checkpoints import RunFolder, load_checkpoint, save_checkpoint
from workbench.cli import main
from workbench.cli import train as cli_train
from workbench.config import PRESETS, ConfigError, preset
from workbench.data import DatasetError
from workbench.forward import TrainingData
from workbench.train import fit

TINY4 = {"system.N_H": 4, "system.N_V": 4, "system.M": 4, "system.L": 4, "system.K_max": 2, "model.width": 8, "model.layers": 1,
         "model.heads": 2, "train.n_train": 16, "train.n_val": 8, "train.batch_size": 8, "train.device": "cpu",
         "fixes.rsamp_estimator": "ls_scatter"}
EPOCHS = 10


def _args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", k, v if isinstance(v, str) else json.dumps(v)]
    return out


@pytest.fixture
def one_thread():
    """Bitwise-reproducible CPU arithmetic: the same thread count here as in the child processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flat(record: dict, prefix: str = "") -> dict:
    """A history record as {dotted key: number}, without the wall time (lists, e.g. step_loss, by index)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, list):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        elif k != "seconds":
            out[prefix + k] = v
    return out


def _state(run_dir):
    """(history.json as read, the checkpoint payload) of a run folder, through its top-level names."""
    history = json.loads((run_dir / "history.json").read_text())
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return history, payload


def test_a_killed_run_is_consistent_and_resumes_to_the_uninterrupted_result(tmp_path, one_thread):
    run_dir = tmp_path / "run"
    argv = ["train", "--preset", "recommended", "--out", str(run_dir), "--no-progress", "--epochs", str(EPOCHS), *_args(TINY4)]
    child = subprocess.Popen([sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from workbench.cli import main; "
                              "sys.exit(main(sys.argv[1:]))", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            try:
                if json.loads((run_dir / "history.json").read_text())["epoch"] >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        time.sleep(random.uniform(0.0, 0.05))  # somewhere in a later epoch, possibly inside a checkpoint write
        os.kill(child.pid, signal.SIGKILL)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err[-2000:]}"

    history, payload = _state(run_dir)  # the two files describe the same epoch of the same run
    assert 2 <= history["epoch"] == payload["epoch"] == len(history["history"]) <= EPOCHS
    assert [h["train_loss"] for h in history["history"]] == [h["train_loss"] for h in json.loads(payload["history"])]
    assert json.loads(payload["config"]) == history["config"]

    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    resumed = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = preset("recommended", **TINY4, **{"train.epochs": EPOCHS})
    whole = fit(cfg, progress=False)
    assert len(resumed.history) == EPOCHS
    for a, b in zip(resumed.history, whole.history):
        assert _flat(a) == pytest.approx(_flat(b), rel=1e-6)
    for (name, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert len(list(run_dir.glob(".epoch-*"))) == 1  # the killed run's leftovers were cleaned by the next write


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = preset("recommended", **TINY4, **{"train.epochs": 1})
    result = fit(cfg, progress=False, run_dir=run_dir)
    return run_dir, result


@pytest.mark.parametrize("change, needle", [
    ({"model.width": 16}, "model.width: checkpoint 8 != requested 16"),
    ({"system.L": 6}, "system.L: checkpoint 4 != requested 6"),
])
def test_resume_refuses_another_system_or_model_config(tiny_run, capsys, change, needle):
    run_dir, _ = tiny_run
    assert main(["train", "--resume", str(run_dir), "--no-progress", *_args(change)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_out_is_checked_before_training(tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(TrainingData, "simulate", no_training)
    (tmp_path / "file").write_text("x")
    assert main(["train", "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "file" / "run"), "--no-progress"]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert main(["verify", "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_checkpoint_with_nonfinite_weights_is_refused(tiny_run, tmp_path):
    _, result = tiny_run
    name, weight = next(iter(result.model.state_dict().items()))
    with torch.no_grad():
        original = weight.clone()
        weight.view(-1)[0] = math.inf
    try:
        path = save_checkpoint(tmp_path / "inf.pt", result)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    with pytest.raises(ConfigError, match=f"non-finite weights .*{name}"):
        load_checkpoint(path)


def _tamper(src, dst, edit):
    payload = torch.load(src, weights_only=True)
    edit(payload)
    torch.save(payload, dst)
    return dst


def test_a_checkpoint_of_another_architecture_or_with_missing_keys_is_refused(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    src = run_dir / "checkpoint.pt"
    key = next(iter(torch.load(src, weights_only=True)["model"]))
    missing = _tamper(src, tmp_path / "missing.pt", lambda p: p["model"].pop(key))
    with pytest.raises(ConfigError, match=f"missing keys {key}"):
        load_checkpoint(missing)

    def wider(p):
        cfg = json.loads(p["config"])
        cfg["model"]["width"] = 16
        p["config"] = json.dumps(cfg)

    with pytest.raises(ConfigError, match="shape mismatch"):
        load_checkpoint(_tamper(src, tmp_path / "wider.pt", wider))
    weights_only = {k: v for k, v in torch.load(src, weights_only=True).items() if k != "optimizer"}
    RunFolder(tmp_path / "weights_only").write(weights_only, {})
    with pytest.raises(ConfigError, match="not resumable"):
        fit(preset("recommended", **TINY4, **{"train.epochs": 2}), progress=False, run_dir=tmp_path / "weights_only", resume=True)


def _nan(field, scene):
    def edit(batch):
        getattr(batch, field)[scene].view(-1)[0] = float("nan")
    return edit


def _k0(scene):
    def edit(batch):
        batch.K[scene] = 0
        batch.mask[scene] = False
    return edit


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("edit, needle", [(_nan("y", 5), "scene 5: y has non-finite"), (_nan("H", 3), "scene 3: H has non-finite"),
                                          (_k0(6), "value 0 in scene 6")], ids=["nan-y", "nan-H", "K0"])
def test_nonfinite_or_invalid_scenes_stop_training_naming_the_scene(name, edit, needle):
    cfg = preset(name, **TINY4, **{"train.epochs": 1})
    data = TrainingData.simulate(cfg)
    edit(data.train)
    with pytest.raises(DatasetError, match=f"train split.*{needle}"):
        fit(cfg, data, progress=False)


def test_verify_defaults_to_a_short_budget_and_prints_its_time(capsys, monkeypatch):
    seen = {}

    def fake_verify(cfg, progress=True, **kw):
        seen["cfg"] = cfg
        return {"checks": [{"name": "x", "passed": True, "detail": ""}], "passed": True, "history": [], "provenance": []}

    monkeypatch.setattr(cli_train, "verify", fake_verify)
    assert main(["verify", "--preset", "recommended", "--no-progress"]) == 0
    t = seen["cfg"].train
    budget = {k.removeprefix("train."): v for k, v in cli_train.VERIFY_BUDGET.items()}
    assert {k: getattr(t, k) for k in budget} == budget and budget["n_train"] <= 64
    assert "verdict: PASS (1/1 checks) in " in capsys.readouterr().out
    assert main(["verify", "--preset", "recommended", "--no-progress", "--epochs", "7", "--n-train", "99"]) == 0
    assert (seen["cfg"].train.epochs, seen["cfg"].train.n_train) == (7, 99)


# ---------------------------------------------------------------------------------------------
# a model, a run and a config agree, or nothing starts
@pytest.mark.parametrize("build, needle", [
    ({"model.width": 16}, "model.width: model 16 != cfg 8"),
    ({"system.L": 6}, "system.L: model 6 != cfg 4"),
])
def test_fit_refuses_a_model_built_for_another_config(build, needle, monkeypatch):
    from workbench.model import build_model

    def no_training(*a, **k):
        raise AssertionError("training data was simulated before the model was checked")

    monkeypatch.setattr(TrainingData, "simulate", no_training)
    cfg = preset("recommended", **TINY4, **{"train.epochs": 1})
    other = preset("recommended", **{**TINY4, **build})
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        fit(cfg, progress=False, model=build_model(other.system, other.model))


@pytest.mark.parametrize("argv, needles", [
    (["--set", "train.lr", "0.5"], ["train.lr: checkpoint", "!= requested 0.5"]),
    (["--preset", "seed_fix3"], ["fixes.lam_gap", "model.rsamp_input", "system.N_H"]),
    (["--set", "train.batch_size", "4", "--set", "loss.k_ce", "0.5"], ["train.batch_size", "loss.k_ce"]),
])
def test_resume_refuses_changed_training_fields_naming_each(tiny_run, capsys, argv, needles):
    """Policy: a resume keeps the run's configuration except train.epochs/train.device; nothing is rewritten on refusal."""
    run_dir, _ = tiny_run
    before = (run_dir / "history.json").read_bytes()
    assert main(["train", "--resume", str(run_dir), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err and (run_dir / "history.json").read_bytes() == before


def test_resume_with_more_epochs_applies_and_records_the_change(tmp_path, one_thread):
    run_dir = tmp_path / "run"
    cfg = preset("recommended", **TINY4, **{"train.epochs": 1})
    fit(cfg, progress=False, run_dir=run_dir)
    assert main(["train", "--resume", str(run_dir), "--no-progress", "--epochs", "2"]) == 0
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["history"]) == 2 and history["config"]["train"]["epochs"] == 2
    assert history["resumes"] == [{"epoch": 1, "changed": {"train.epochs": [1, 2]}}]


LOCKER = r"""
import sys, time
from workbench.checkpoints import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_run_folder_has_one_writer_and_the_second_is_told_the_pid(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "busy"
    import shutil
    shutil.copytree(tiny_run[0], run_dir, symlinks=True)
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--resume", str(run_dir), "--no-progress", "--epochs", "2"]) == 2
        err = capsys.readouterr().err
        assert f"in use by PID {holder.pid}" in err and "Traceback" not in err, err
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): the lock went with it
    assert main(["train", "--resume", str(run_dir), "--no-progress", "--epochs", "2"]) == 0
    assert len(json.loads((run_dir / "history.json").read_text())["history"]) == 2
