import json
import os

import pytest
import torch

from workbench import data as data_module
from workbench.cli import main
from workbench.config import ConfigError, SystemConfig
from workbench.data import (
    MANIFEST_FILE,
    DatasetError,
    chunk_seed,
    dataset_system,
    generate,
    load_dataset,
    read_manifest,
    save_dataset,
    scenes_file,
)
from workbench.physics import simulate

SMALL = SystemConfig(L=4, N_H=4, N_V=4, M=4, K_max=3)


@pytest.fixture
def ds(tmp_path):
    path = generate(SMALL, 10, tmp_path / "data" / "small", seed=3, progress=False, chunk=4)
    return path


def test_round_trip_and_manifest(ds):
    batch = load_dataset(ds, system=SMALL)
    m = read_manifest(ds)
    assert m["n"] == 10 and m["seed"] == 3 and m["config"] == SMALL.to_dict() and m["version"]
    (info,) = m["files"].values()
    assert len(info["sha256"]) == 64 and m["created"] and scenes_file(ds).name == f"scenes-{info['sha256'][:16]}.bin"
    assert dataset_system(ds) == SMALL
    # chunk i is simulate(seed=chunk_seed(seed, i)): regenerate and compare every tensor, R_true included
    ref = simulate(SMALL, 4, seed=chunk_seed(3, 0))
    for name, t in ref.tensors().items():
        got = getattr(batch, name)[:4]
        if t.is_floating_point() or t.is_complex():
            assert torch.allclose(got, t, rtol=1e-5, atol=1e-6 * t.abs().max().item()), name
        else:
            assert torch.equal(got, t), name
    assert len({chunk_seed(3, i) for i in range(3)}) == 3 and chunk_seed(3, 0) != chunk_seed(4, 0)
    assert sorted(p.name for p in ds.parent.iterdir()) == ["small"]  # no temporary folders left behind


def test_refuses_to_overwrite_without_force(ds):
    before = scenes_file(ds).read_bytes()
    with pytest.raises(DatasetError, match="already holds a dataset.*--force"):
        generate(SMALL, 5, ds, seed=9, progress=False)
    assert scenes_file(ds).read_bytes() == before
    generate(SMALL, 5, ds, seed=9, progress=False, force=True)
    assert read_manifest(ds)["n"] == 5 and len(load_dataset(ds)) == 5
    assert sorted(p.name for p in ds.parent.iterdir()) == ["small"]
    assert sorted(p.name for p in ds.iterdir()) == sorted([MANIFEST_FILE, scenes_file(ds).name])  # the old scene file is gone


def test_force_keeps_the_old_dataset_when_the_new_one_fails(ds, monkeypatch):
    before = scenes_file(ds).read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(data_module, "_write_chunk", boom)
    with pytest.raises(OSError, match="disk full"):
        save_dataset(simulate(SMALL, 2), SMALL, 0, ds, force=True)
    assert scenes_file(ds).read_bytes() == before and len(load_dataset(ds)) == 10
    assert sorted(p.name for p in ds.parent.iterdir()) == ["small"] and len(list(ds.iterdir())) == 2


def test_never_replaces_something_that_is_not_a_dataset(tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a workbench dataset"):
        save_dataset(simulate(SMALL, 2), SMALL, 0, other, force=True)
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        save_dataset(simulate(SMALL, 2), SMALL, 0, tmp_path / "file", force=True)


def test_corrupt_file_fails_checksum(ds):
    data = bytearray(scenes_file(ds).read_bytes())
    data[len(data) // 2] ^= 0xFF
    scenes_file(ds).write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset(ds)


def test_truncated_file_fails(ds):
    data = scenes_file(ds).read_bytes()
    scenes_file(ds).write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(ds)


def test_mismatched_config_fails_naming_the_field(ds):
    with pytest.raises(DatasetError, match="L: dataset 4 != expected 8"):
        load_dataset(ds, system=SMALL.replace(L=8))


def test_bad_or_missing_manifest(ds, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (ds / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json is corrupt"):
        load_dataset(ds)
    (ds / MANIFEST_FILE).write_text(json.dumps({"format": 1}))
    with pytest.raises(DatasetError, match="lacks config"):
        load_dataset(ds)
    os.remove(ds / MANIFEST_FILE)
    with pytest.raises(DatasetError, match="missing"):
        load_dataset(ds)


def test_bad_generate_arguments(tmp_path):
    with pytest.raises(DatasetError, match="n = 0"):
        generate(SMALL, 0, tmp_path / "x", progress=False)
    with pytest.raises(DatasetError, match="system"):
        generate({"L": 4}, 2, tmp_path / "x", progress=False)
    assert issubclass(DatasetError, ConfigError)


def test_cli_generate_check_and_refuse(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["data", "generate", "--n", "6", "--out", out, "--seed", "2", "--quiet", "--chunk", "4",
            "--config", json.dumps(SMALL.to_dict()), "--set", "snr_db_min", "10"]
    assert main(args) == 0
    assert read_manifest(out)["config"]["snr_db_min"] == 10.0 and read_manifest(out)["config"]["M"] == 4
    assert "wrote" in capsys.readouterr().out
    assert main(["data", "check", out]) == 0
    assert "OK, 6 scenes" in capsys.readouterr().out
    # refuses to overwrite, naming the path and the flag; exit status 2
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a dataset" in err and "--force" in err
    assert main(args + ["--force"]) == 0
    # a config file, and a mismatching check
    cfg = tmp_path / "exp.json"
    cfg.write_text(json.dumps({"system": SMALL.to_dict()}))
    assert main(["data", "check", out, "--config", str(cfg)]) == 2
    assert "snr_db_min: dataset 10.0 != expected -5.0" in capsys.readouterr().err
    # a bad field fails before anything is written
    assert main(["data", "generate", "--n", "2", "--out", str(tmp_path / "bad"), "--set", "L", "0"]) == 2
    assert "system.L = 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["data", "generate", "--n", "2", "--out", str(tmp_path / "bad"), "--set", "antennas", "3"]) == 2
    assert "antennas" in capsys.readouterr().err
