"""Scenes of one's own (workbench.scenes_io): small .npz, .mat and .h5 files written by the test, good and bad,
through ``workbench data import`` into a dataset that ``train --data`` and TrainingData.from_dataset use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench import scenes_io
from workbench.cli import main
from workbench.config import ConfigError, preset
from workbench.data import load_dataset
from workbench.forward import TrainingData
from workbench.physics import simulate

SYSTEM = preset("recommended").system.replace(N_H=3, N_V=3, M=4, L=6, K_max=2)


def _fields(n=6, seed=0) -> dict:
    b = simulate(SYSTEM, n, seed=seed)
    out = {k: getattr(b, k).numpy() for k in ("y", "H", "codes", "K", "phi", "theta", "r", "power", "noise_var", "snr_db")}
    out.update(N_H=SYSTEM.N_H, N_V=SYSTEM.N_V, carrier_hz=SYSTEM.carrier_hz)
    return out


def _write(path, fields):
    if path.suffix == ".npz":
        np.savez(path, **fields)
    elif path.suffix == ".mat":
        from scipy.io import savemat

        savemat(path, fields)
    else:
        import h5py

        with h5py.File(path, "w") as f:
            for k, v in fields.items():
                f[k] = v
    return path


@pytest.mark.parametrize("suffix", [".npz", ".mat", ".h5"])
def test_good_file_reads_and_imports(tmp_path, suffix, capsys):
    fields = _fields()
    path = _write(tmp_path / f"scenes{suffix}", fields)
    scenes = scenes_io.read_scene_file(path)
    assert scenes.truth and len(scenes) == 6
    s = scenes.system
    assert (s.L, s.M, s.N_H, s.N_V, s.K_max) == (SYSTEM.L, SYSTEM.M, 3, 3, 2)
    assert torch.equal(scenes.tensors["y"], torch.from_numpy(fields["y"]))
    assert scenes.tensors["y"].dtype == torch.complex64 and scenes.tensors["K"].dtype == torch.int64

    out = tmp_path / "data" / "mine"
    assert main(["data", "import", str(path), "--out", str(out)]) == 0
    assert "--data" in capsys.readouterr().out
    batch = load_dataset(out)  # the ordinary dataset checks pass
    assert len(batch) == 6 and torch.equal(batch.K, torch.from_numpy(fields["K"]))
    meta = json.loads((out / "import.json").read_text())
    assert meta["truth"] and meta["n"] == 6 and meta["source"].endswith(path.name)


def test_truth_free_file_reads_but_import_needs_the_truth(tmp_path, capsys):
    fields = {k: v for k, v in _fields().items() if k not in scenes_io.TRUTH + ("snr_db",)}
    path = _write(tmp_path / "x.npz", fields)
    assert not scenes_io.read_scene_file(path).truth
    assert main(["data", "import", str(path), "--out", str(tmp_path / "d")]) == 2
    assert "need the truth" in capsys.readouterr().err and not (tmp_path / "d").exists()


@pytest.mark.parametrize("suffix", [".npz", ".mat", ".h5"])
@pytest.mark.parametrize("break_it,field", [
    (lambda f: f.update(H=f["H"][:, :3, :]), "H: has shape (6, 3, 9), expected [6,4,?]"),  # a wrong shape
    (lambda f: f["y"].__setitem__((2, 0, 0), np.nan), "y: scene 2 has non-finite"),  # NaN
    (lambda f: f.pop("codes"), "codes: missing"),  # a missing field
    (lambda f: f.pop("phi"), "phi: missing"),  # part of the truth
    (lambda f: f.update(codes=f["codes"] * 2), "codes: scene 0: entries are not unit-modulus"),
    (lambda f: f.update(N_V=4), "N_H, N_V: N_H * N_V"),
    (lambda f: f.pop("N_H"), "N_H: missing"),
    (lambda f: f.update(noise_var=-f["noise_var"]), "noise_var: must be > 0"),
    (lambda f: f.update(K=f["K"] + 5), "K: values within"),
])
def test_bad_files_name_the_field(tmp_path, suffix, break_it, field):
    fields = _fields()
    break_it(fields)
    path = _write(tmp_path / f"bad{suffix}", fields)
    with pytest.raises(ConfigError, match="scene file") as e:
        scenes_io.read_scene_file(path)
    assert field in str(e.value)


def test_unknown_suffix_and_unreadable_file(tmp_path):
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ConfigError, match="unknown suffix"):
        scenes_io.read_scene_file(tmp_path / "x.csv")
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="cannot be read"):
        scenes_io.read_scene_file(tmp_path / "x.npz")


def test_training_data_from_dataset_splits_deterministically(tmp_path):
    path = _write(tmp_path / "s.npz", _fields(n=10))
    out = scenes_io.import_scenes(path, tmp_path / "ds")
    cfg = TrainingData.dataset_config(out, preset("recommended").replace(**{"train.n_train": 6, "train.n_val": 3, "train.device": "cpu"}))
    assert cfg.system == scenes_io.read_scene_file(path).system
    a, b = TrainingData.from_dataset(out, cfg), TrainingData.from_dataset(out, cfg)
    assert len(a.train) == 6 and len(a.val) == 3 and torch.equal(a.train.y, b.train.y) and torch.equal(a.val.y, b.val.y)
    rows = lambda t: {tuple(x.flatten().tolist()[:4]) for x in t.y}  # noqa: E731
    assert not rows(a.train) & rows(a.val)  # disjoint
    with pytest.raises(ConfigError, match="fewer than train.n_train"):
        TrainingData.from_dataset(out, cfg.replace(**{"train.n_train": 9}))
    with pytest.raises(ConfigError, match="another system config"):
        TrainingData.from_dataset(out, cfg.replace(**{"system.L": 7}))


def test_train_cli_takes_data_and_writes_a_manifest(tmp_path):
    path = _write(tmp_path / "s.npz", _fields(n=12))
    ds = scenes_io.import_scenes(path, tmp_path / "ds")
    out = tmp_path / "run"
    assert main(["train", "--data", str(ds), "--out", str(out), "--epochs", "1", "--n-train", "8", "--set", "train.n_val", "4",
                 "--set", "train.batch_size", "4", "--set", "model.width", "16", "--set", "model.heads", "1", "--set", "model.layers", "1",
                 "--set", "train.device", "cpu", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "train" and m["status"] == "ok" and m["parameters"]["data"] == str(ds)
    assert m["parameters"]["config"]["system"]["L"] == SYSTEM.L and (out / "checkpoint.pt").exists()
