"""Limits are checked before the work and respected during it: `data generate` streams (memory flat in n), refuses an
`--n` that would not fit the free disk before simulating, and every file and folder the workbench writes follows the
user's umask."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from workbench import data
from workbench.cli import main
from workbench.config import SystemConfig
from workbench.data import DatasetError, generate, load_dataset

SMALL = SystemConfig(L=4, N_H=4, N_V=4, M=4, K_max=3)

PEAK = r"""
import resource, sys
from workbench import data
from workbench.config import SystemConfig
system = SystemConfig(L=8, N_H=4, N_V=4, M=4, K_max=3)
data.generate(system, 256, sys.argv[1] + "-warm", seed=1, progress=False, chunk=256)  # imports, allocator warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data.generate(system, int(sys.argv[2]), sys.argv[1], seed=2, progress=False, chunk=256)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after)
"""


def _peak_kib(out, n):
    r = subprocess.run([sys.executable, "-c", PEAK, str(out), str(n)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(int, r.stdout.split())
    return before, after


def test_generate_memory_is_flat_in_n(tmp_path):
    """Peak RSS growth of `generate` at n and 8n (separate processes, chunk 256, after a warm-up write): within 1.5x
    (plus 8 MiB of allocator noise). Holding every scene (~4.6 KB each with R_true) would add ~150 MB at 8n."""
    n = 4096
    b1, a1 = _peak_kib(tmp_path / "n", n)
    b8, a8 = _peak_kib(tmp_path / "n8", 8 * n)
    grow1, grow8 = a1 - b1, a8 - b8
    assert grow8 <= 1.5 * grow1 + 8 * 1024, (grow1, grow8, a1, a8)
    assert a8 <= 1.5 * a1, (a1, a8)
    assert len(load_dataset(tmp_path / "n8")) == 8 * n


def test_generate_refuses_an_n_that_does_not_fit_the_disk_before_simulating(tmp_path, monkeypatch, capsys):
    def no_simulation(*a, **k):
        raise AssertionError("simulated before checking the disk")

    monkeypatch.setattr(data, "simulate", no_simulation)
    need = data.dataset_bytes(SMALL, 1000)
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(need, need // 2, need // 2))
    with pytest.raises(DatasetError, match=r"n = 1000: the dataset needs .* on disk but only .* is free"):
        generate(SMALL, 1000, tmp_path / "big", progress=False)
    assert not any(tmp_path.iterdir())  # nothing created, not even the temporary folder


def test_cli_refuses_a_huge_n_at_once_saying_how_much_is_needed(tmp_path, capsys):
    t = time.monotonic()
    assert main(["data", "generate", "--n", "100000000", "--out", str(tmp_path / "huge"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs" in err and "TB" in err and "--n" in err, err
    assert time.monotonic() - t < 20 and not any(tmp_path.iterdir())


def test_a_live_writers_temporary_folder_is_not_cleaned_by_another_write(tmp_path):
    """A writer holds a flock on its temporary folder; another write to the same path skips it (and a dead writer's is removed)."""
    import fcntl

    target = tmp_path / "d"
    live = tmp_path / ".d.live.tmp"
    live.mkdir()
    (live / ".scenes.x.tmp").write_bytes(b"partial")
    dead = tmp_path / ".d.dead.tmp"
    dead.mkdir()
    (dead / ".scenes.y.tmp").write_bytes(b"partial")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        generate(SMALL, 3, target, seed=1, progress=False)
        assert live.exists() and not dead.exists()
    finally:
        os.close(fd)


UMASK = r"""
import os, sys
os.umask(int(sys.argv[2], 8))
from pathlib import Path
from workbench import data, io
from workbench.checkpoints import RunFolder
from workbench.config import SystemConfig
root = Path(sys.argv[1])
data.generate(SystemConfig(L=4, N_H=4, N_V=4, M=4, K_max=3), 3, root / "ds", seed=1, progress=False)
data.generate(SystemConfig(L=4, N_H=4, N_V=4, M=4, K_max=3), 2, root / "ds", seed=2, progress=False, force=True)
RunFolder(root / "run").write({"epoch": 1}, {"epochs": []})
io.atomic_write_json(root / "x.json", {"a": 1})
"""


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002])
def test_files_and_folders_follow_the_umask(tmp_path, umask):
    r = subprocess.run([sys.executable, "-c", UMASK, str(tmp_path), oct(umask)[2:]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    paths = [tmp_path / "ds", tmp_path / "x.json", *(tmp_path / "ds").iterdir(), *(tmp_path / "run").rglob("*")]
    assert len(paths) > 6
    for p in paths:
        if p.is_symlink():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (want_dir if p.is_dir() else want_file), (p, oct(mode))
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
