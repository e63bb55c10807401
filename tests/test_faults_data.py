"""Datasets are what they claim: an edited manifest, invalid scenes and an empty file list are refused on load and by
`data check`, naming the scene; `--force` replaces a dataset crash-safely (real kill -9 at every step) and never
deletes a file it did not write; leftovers of a crashed write are cleaned by the next write."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

from workbench import data
from workbench.cli import main
from workbench.config import SystemConfig
from workbench.data import MANIFEST_FILE, DatasetError, generate, load_dataset, read_manifest, save_dataset
from workbench.physics import simulate

SMALL = SystemConfig(L=4, N_H=4, N_V=4, M=4, K_max=3)


@pytest.fixture
def ds(tmp_path):
    return generate(SMALL, 10, tmp_path / "data" / "small", seed=3, progress=False, chunk=4)


def rewrite_consistently(ds, tensors):
    """Replace a dataset's scene file by ``tensors`` and make the manifest agree (size, SHA-256, digest): a dataset
    whose checksums are all right but whose content is not, as a buggy or hostile writer would leave it."""
    path = data.scenes_file(ds)
    m = json.loads((ds / MANIFEST_FILE).read_text())
    with open(path, "wb") as f:  # the raw format of data.layout, for whatever tensors were given
        offset, m["tensors"] = 0, {}
        for name, t in tensors.items():
            m["tensors"][name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "offset": offset}
            b = t.numpy().astype("u1" if t.dtype == torch.bool else t.numpy().dtype).tobytes()
            f.write(b)
            offset += len(b)
    m["files"] = {path.name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}}
    m["digest"] = data.manifest_digest(m)
    (ds / MANIFEST_FILE).write_text(json.dumps(m))


def _check_fails(ds, capsys, *needles):
    """Both loading and `workbench data check` refuse the dataset with a message holding every needle."""
    with pytest.raises(DatasetError) as e:
        load_dataset(ds)
    assert main(["data", "check", str(ds)]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in str(e.value) and needle in err, (needle, str(e.value))


@pytest.mark.parametrize("field, value", [("carrier_hz", 2e9), ("N_H", 3), ("snr_db_max", 30.0)])
def test_an_edited_manifest_config_is_detected(ds, capsys, field, value):
    m = json.loads((ds / MANIFEST_FILE).read_text())
    m["config"][field] = value
    (ds / MANIFEST_FILE).write_text(json.dumps(m))
    _check_fails(ds, capsys, "manifest.json was altered")


def _with_nan(name, scene):
    def edit(t):
        t[name][scene].view(-1)[0] = float("nan")
    return edit


def _set_K(scene, k):
    def edit(t):
        t["K"][scene] = k
        t["mask"][scene] = torch.arange(SMALL.K_max) < k
    return edit


@pytest.mark.parametrize("edit, needles", [
    (_with_nan("y", 3), ["scene 3", "y has non-finite"]),
    (_with_nan("H", 5), ["scene 5", "H has non-finite"]),
    (_with_nan("r", 2), ["scene 2", "r has non-finite"]),
    (_set_K(4, 0), ["value 0 in scene 4", "K_min = 1"]),
    (_set_K(6, SMALL.K_max + 1), [f"value {SMALL.K_max + 1} in scene 6", "K_max = 3"]),
    (lambda t: t["mask"][7].fill_(False), ["scene 7", "mask"]),
], ids=["nan-y", "nan-H", "nan-r", "K0", "K-too-large", "mask"])
def test_invalid_scenes_are_refused_naming_the_scene(ds, capsys, edit, needles):
    tensors = data._read_raw(ds, data.scenes_file(ds), read_manifest(ds)["tensors"])
    edit(tensors)
    rewrite_consistently(ds, tensors)
    _check_fails(ds, capsys, f"dataset '{ds}'", *needles)


def test_an_empty_file_list_is_refused(ds, capsys):
    m = json.loads((ds / MANIFEST_FILE).read_text())
    m["files"] = {}
    (ds / MANIFEST_FILE).write_text(json.dumps(m))
    _check_fails(ds, capsys, "lists no scene file")


def test_tampered_file_with_matching_manifest_fails_on_content(ds):
    """A consistent checksum is not enough: the content must be the scene tensors (weights_only load)."""
    rewrite_consistently(ds, {"y": torch.zeros(3)})
    with pytest.raises(DatasetError, match="expected"):
        load_dataset(ds)


def test_an_invalid_batch_is_never_written(tmp_path):
    batch = simulate(SMALL, 4, seed=1)
    batch.K[2] = 0
    with pytest.raises(DatasetError, match="value 0 in scene 2"):
        save_dataset(batch, SMALL, 1, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_force_never_deletes_files_it_did_not_write(ds):
    (ds / "notes.txt").write_text("mine")
    old = data.scenes_file(ds)
    generate(SMALL, 5, ds, seed=9, progress=False, force=True)
    assert (ds / "notes.txt").read_text() == "mine" and len(load_dataset(ds)) == 5
    assert sorted(p.name for p in ds.iterdir()) == sorted(["notes.txt", MANIFEST_FILE, data.scenes_file(ds).name]) and not old.exists()


# ---------------------------------------------------------------------------------------------
# crashes: a child process writes with a hook that kills it (SIGKILL) right before a chosen file-system step
CHILD = r"""
import os, shutil, signal, sys
from workbench import data
from workbench.config import SystemConfig

target, mode = sys.argv[1], sys.argv[2]
calls = 0
replace = os.replace

def hooked(f):
    def wrapped(*a, **kw):
        global calls
        calls += 1
        last = mode == "rename-into-place" and f is replace and os.path.abspath(a[1]) == os.path.abspath(target)
        if last or (mode != "rename-into-place" and calls == int(mode)):
            os.kill(os.getpid(), signal.SIGKILL)
        return f(*a, **kw)
    return wrapped

os.replace, os.rename, os.unlink, os.rmdir, shutil.rmtree = (hooked(f) for f in (os.replace, os.rename, os.unlink, os.rmdir, shutil.rmtree))
system = SystemConfig(L=4, N_H=4, N_V=4, M=4, K_max=3)
data.generate(system, 6, target, seed=7, force=True, progress=False, chunk=4)
"""


def _spawn(target, mode):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(mode)], stderr=subprocess.PIPE, text=True)


def test_a_crash_at_any_step_leaves_the_old_or_the_new_dataset_and_the_next_write_cleans_up(ds, tmp_path):
    """kill -9 before the k-th rename/unlink of a --force replacement (each distinct step), and before a new dataset's final
    rename: the path then holds the complete old or new dataset (never neither, never a mix), and the next write
    leaves nothing but the dataset behind."""
    steps = (1, 2, 3, 4)  # every rename/unlink of a replacement (here: new file in place, tmp removal, manifest switch, old file removal)
    copies = {k: shutil.copytree(ds, tmp_path / f"k{k}" / "small") for k in steps}
    fresh = tmp_path / "fresh" / "small"
    fresh.parent.mkdir()
    children = [(k, _spawn(copies[k], k)) for k in steps] + [("fresh", _spawn(fresh, "rename-into-place"))]
    for k, p in children:
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, -9), (k, err[-2000:])
    killed = {k for k, p in children if p.returncode == -9}
    assert {1, 3, "fresh"} <= killed  # the crashes did happen
    outcomes = set()
    for k in steps:
        batch = load_dataset(copies[k])  # complete and verified: the old one or the new one
        m = read_manifest(copies[k])
        assert (len(batch), m["seed"]) in {(10, 3), (6, 7)}, k
        outcomes.add(len(batch))
    assert outcomes == {10, 6}  # early crashes keep the old dataset, late ones have the new one
    assert not fresh.exists() and list(fresh.parent.glob(".small.*.tmp"))  # the crashed new write left its temporary folder
    for target in [*copies.values(), fresh]:
        generate(SMALL, 4, target, seed=1, progress=False, force=True, chunk=4)
        assert sorted(p.name for p in target.parent.iterdir()) == ["small"], target  # temporary folders removed
        assert sorted(p.name for p in target.iterdir()) == sorted([MANIFEST_FILE, data.scenes_file(target).name]), target
        assert len(load_dataset(target)) == 4
