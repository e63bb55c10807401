"""The training loop, checkpoints and the seed note's checks, on tiny budgets."""

import math

import pytest
import torch

from workbench.checkpoints import load_checkpoint, save_checkpoint
from workbench.cli import main
from workbench.config import ConfigError, preset
from workbench.forward import TrainingData
from workbench.train import checks, fit, torch_threads, verify

TINY = {"model.width": 32, "model.layers": 1, "model.heads": 2, "train.n_train": 48, "train.n_val": 16,
        "train.batch_size": 16, "train.epochs": 2, "fixes.rsamp_estimator": "ls_scatter"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only spins (measured several times slower)."""
    with torch_threads(1):  # the project's own context manager, restoring the count after
        yield


@pytest.fixture(scope="module")
def tiny_run():
    cfg = preset("recommended", **TINY)
    return fit(cfg, progress=False)


def test_history_records_every_epoch_and_step(tiny_run):
    h = tiny_run.history
    assert [r["epoch"] for r in h] == [0, 1]
    assert all(r["steps"] == 3 and r["skipped_nonfinite"] == 0 for r in h)
    for r in h:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_nmse"]) and r["param_change"] > 0
        assert set(r["grad_norm"]) == {"backbone", "head"} and set(r["terms"]) == {"nmse", "k_ce", "aux", "gap", "subspace", "detect"}


def test_cosine_schedule_is_stepped_per_batch(tiny_run):
    # 2 epochs x 3 steps: after the last step the per-step cosine has reached zero
    assert tiny_run.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert 0 < tiny_run.history[0]["lr"] < tiny_run.config.train.lr


def test_epoch_schedule_is_stepped_per_epoch():
    cfg = preset("recommended", **TINY, **{"train.schedule": "step_per_epoch"})
    res = fit(cfg, progress=False)
    lr0 = cfg.train.lr
    assert [r["lr"] for r in res.history] == pytest.approx([lr0 * 0.7, lr0 * 0.7**2])


def test_checkpoint_round_trip_and_corrupt_file(tiny_run, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_run)
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_run.config and loaded.history == tiny_run.history
    scenes = TrainingData.simulate(tiny_run.config)
    b, Rs = scenes.val[:4], scenes.rsamp("val", tiny_run.config)[:4]
    torch.testing.assert_close(loaded.model(b.y, b.H, b.codes, R_samp=Rs).A, tiny_run.model(b.y, b.H, b.codes, R_samp=Rs).A)
    data = path.read_bytes()
    (tmp_path / "bad.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_nonfinite_steps_are_skipped_traced_and_never_written():
    cfg = preset("recommended", **{**TINY, "fixes.subspace_backend": "eigh", "train.epochs": 1})
    res = fit(cfg, progress=False)
    h = res.history[0]
    assert h["skipped_nonfinite"] == h["steps"] == 3
    assert h["param_change"] == 0.0  # nothing was written
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert {p["term"] for p in res.provenance} == {"subspace"}
    assert all("eigh" in p["op"].lower() for p in res.provenance)
    failed = {c["name"]: c["passed"] for c in checks(res.history, res.provenance)}
    assert failed["gradients finite"] is False and failed["weights changing"] is False


def test_verify_reports_the_four_checks_and_the_cli_exit_code(tmp_path, capsys):
    report = verify(preset("recommended", **{**TINY, "train.epochs": 3}), progress=False)
    names = [c["name"] for c in report["checks"]]
    assert names == ["loss finite and in range", "gradients finite", "training loss decreasing", "weights changing"]
    by = {c["name"]: c["passed"] for c in report["checks"]}
    assert by["gradients finite"] and by["weights changing"] and by["loss finite and in range"]
    args = ["verify", "--preset", "recommended", "--no-progress", "--out", str(tmp_path)]
    for k, v in {**TINY, "fixes.subspace_backend": "eigh", "train.epochs": 1}.items():
        args += ["--set", k, str(v) if not isinstance(v, str) else v]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL  gradients finite" in out and (tmp_path / "verify.json").is_file()


def test_cli_rejects_a_bad_override(capsys):
    assert main(["verify", "--set", "fixes.c_eps", "-1"]) == 2
    assert "fixes.c_eps" in capsys.readouterr().err


def test_rsamp_is_computed_once_per_dataset_and_estimator():
    cfg = preset("recommended", **TINY)
    data = TrainingData.simulate(cfg)
    first = data.rsamp("train", cfg)
    assert data.to("cpu").rsamp("train", cfg) is first
    other = data.rsamp("train", cfg.replace(**{"fixes.rsamp_estimator": "seed"}))
    assert other is not first and not torch.allclose(other, first)
    assert data.rsamp("val", cfg).shape[0] == cfg.train.n_val


def test_recommended_trains_without_a_skipped_step_on_a_small_array():
    """Regression: on a 6 x 6 RIS the safe subspace backward once produced NaN (the since-removed topk solver); every step must apply."""
    cfg = preset("recommended", **{**TINY, "system.N_H": 6, "system.N_V": 6, "fixes.rsamp_estimator": "beamscan",
                                   "train.n_train": 16, "train.batch_size": 8})
    res = fit(cfg, progress=False)
    assert sum(h["skipped_nonfinite"] for h in res.history) == 0, res.provenance[:2]
    assert all(math.isfinite(h["train_loss"]) for h in res.history)
