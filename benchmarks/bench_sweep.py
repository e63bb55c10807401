"""Sweep scaling: trials per minute with 1 and 2 worker processes, and the study-storage overhead per trial
(PostgreSQL versus the embedded SQLite default). Prints a markdown table.

    .venv/bin/python benchmarks/bench_sweep.py [--quick] [--pg-url URL]

Throughput is measured from the study's own timestamps (first trial start to last trial end), so the
workers' interpreter start-up is excluded. The storage overhead runs a trivial objective in-process
(suggest one float, report two epochs, return) with heartbeats on, as in a real sweep, so what remains is
the storage's own cost per trial. PostgreSQL rows need WORKBENCH_PG_URL (or --pg-url), e.g. from
`source .ci/setup-postgres.sh`; the benchmark creates and drops its own database. The machine is shared:
compare numbers within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench import search_space, sweep  # noqa: E402

SPACE = {"preset": "seed_fix2",
         "fixed": {"model.width": 32, "model.layers": 1, "model.heads": 2, "train.device": "cpu", "train.batch_size": 32,
                   "fixes.subspace_backend": "safe"},
         "params": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}


def throughput(url: str, workers: int, trials: int, epochs: int) -> dict:
    space = search_space.load_space(SPACE, overrides={"train.epochs": epochs, "train.n_train": 64, "train.n_val": 32})
    name = f"bench_w{workers}"
    sweep.create_study(space, url, name, pruner="none")
    threads = 1  # one torch thread per worker: on a shared 2-core machine 2 threads each thrash (measured: 70 s vs 2 s per trial)
    t0 = time.perf_counter()
    procs = [sweep.spawn_worker(url, name, trials, worker=i, threads=threads, stdout=open(os.devnull, "w")) for i in range(workers)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    done = [t for t in sweep.load_study(url, name, heartbeat=None).trials if t.datetime_complete]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    per_trial = sum(t.duration.total_seconds() for t in done) / len(done)
    return {"workers": workers, "trials": len(done), "span_s": span, "wall_s": wall, "per_min": 60 * len(done) / span,
            "trial_s": per_trial, "codes": codes}


def storage_overhead(url: str, trials: int) -> float:
    """Seconds per trial of a trivial objective: the storage's own cost."""
    space = search_space.load_space({"params": {"fixes.c_eps": {"type": "float", "low": 1e-3, "high": 1.0, "log": True}}})
    name = f"overhead_{uuid.uuid4().hex[:6]}"
    sweep.create_study(space, url, name, pruner="median")

    def trivial(trial, cfg):
        for epoch in range(2):
            trial.report(cfg.fixes.c_eps, epoch)
            trial.should_prune()
        return cfg.fixes.c_eps

    sweep.run_worker(url, name, 2, heartbeat=10, objective=trivial, verbose=False)  # warm the connection pool
    t0 = time.perf_counter()
    sweep.run_worker(url, name, 2 + trials, heartbeat=10, objective=trivial, verbose=False)
    return (time.perf_counter() - t0) / trials


def _pg_database(base: str):
    import sqlalchemy as sa

    name = f"wb_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop():
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return sa.make_url(base).set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials")
    ap.add_argument("--pg-url", default=os.environ.get("WORKBENCH_PG_URL"))
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_trials, n_overhead, epochs = (4, 15, 1) if args.quick else (10, 50, 2)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = f"sqlite:///{tmp}/optuna.db"
        rows = [throughput(sqlite, w, n_trials, epochs) for w in (1, 2)]
        print(f"## Sweep throughput (SQLite; tiny trials: width 32, 1 layer, n_train 64, n_val 32, {epochs} epoch(s); "
              f"1 torch thread per worker; {os.cpu_count()} cores)\n")
        print("| workers | trials | span (s) | trials / min | mean trial (s) | speed-up |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['workers']} | {r['trials']} | {r['span_s']:.1f} | {r['per_min']:.1f} | {r['trial_s']:.2f} | "
                  f"{r['per_min'] / rows[0]['per_min']:.2f}x |")
        backends = [("SQLite file (default)", sqlite, None)]
        if args.pg_url:
            url, drop = _pg_database(args.pg_url)
            backends.append(("PostgreSQL 127.0.0.1", url, drop))
        print(f"\n## Study-storage overhead per trial (trivial objective, 2 reports, heartbeats on, {n_overhead} trials)\n")
        print("| storage | ms / trial | share of a tiny 1-worker trial |")
        print("|---|---:|---:|")
        try:
            for label, url, _ in backends:
                ms = 1e3 * storage_overhead(url, n_overhead)
                print(f"| {label} | {ms:.1f} | {ms / 1e3 / rows[0]['trial_s']:.1%} |")
        finally:
            for _, _, drop in backends:
                if drop:
                    drop()
        if not args.pg_url:
            print("\n(PostgreSQL row skipped: set WORKBENCH_PG_URL or --pg-url; `source .ci/setup-postgres.sh` starts a server)")


if __name__ == "__main__":
    main()
