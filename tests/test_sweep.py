"""Optuna sweeps: the search space, the objective (pruning, non-finite provenance), resuming, and workers
sharing one study on SQLite and on a real PostgreSQL server (WORKBENCH_PG_URL, see .ci/setup-postgres.sh)."""

import json
import signal
import subprocess
import time

import optuna
import pytest
from optuna.trial import TrialState

from workbench import figures, search_space, sweep
from workbench.cli import main
from workbench.config import ConfigError
from workbench.figures import sweeps as fig_sweeps
from workbench.studies import sweeps

optuna.logging.set_verbosity(optuna.logging.WARNING)

TINY_FIXED = {"model.width": 32, "model.layers": 1, "model.heads": 2, "train.device": "cpu", "train.batch_size": 32}
TINY = {"train.epochs": 2, "train.n_train": 64, "train.n_val": 32}
SPACE = {"preset": "seed_fix2", "fixed": TINY_FIXED,
         "params": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                    "fixes.qr_retraction": [True, False],
                    "fixes.subspace_backend": ["eigh", "safe"],
                    "loss.subspace": [0.0, 0.1]}}
GOOD = {"fixes.qr_retraction": True, "fixes.subspace_backend": "safe"}


def _space(**overrides):
    return search_space.load_space(SPACE, overrides={**TINY, **overrides})


# ---------------------------------------------------------------------------------------------
# search space and bad input: all fail before a storage is touched or a trial starts
@pytest.mark.parametrize("params, words", [
    ({"fixes.not_a_knob": [1, 2]}, ["'fixes.not_a_knob'", "searchable", "fixes.c_eps"]),
    ({"system.M": [8, 16]}, ["'system.M'", "searchable"]),
    ({}, ["empty"]),
    ({"fixes.c_eps": {"type": "float", "low": 1.0, "high": 0.1}}, ["fixes.c_eps", "low = 1.0 > high = 0.1"]),
    ({"fixes.c_eps": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, ["fixes.c_eps", "log"]),
    ({"fixes.beta": {"type": "float", "low": 0.0, "high": 2.0}}, ["fixes.beta", "2.0", "out of range"]),
    ({"fixes.gap_backend": ["eigh", "qr"]}, ["fixes.gap_backend", "'qr'", "'eigvalsh'"]),
    ({"train.lr": {"type": "float", "low": 1e-4}}, ["train.lr", "'high'"]),
])
def test_bad_space_file_fails_before_any_trial(tmp_path, params, words):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"params": params}))
    db = tmp_path / "optuna.db"
    with pytest.raises(ConfigError) as e:
        sweep.run_sweep(path, trials=2, epochs=1, n_train=8, n_val=8, storage=f"sqlite:///{db}", verbose=False)
    for w in words:
        assert w in str(e.value)
    assert not db.exists()  # nothing was created, so no trial can have started


def test_cli_reports_bad_space_and_unreachable_storage(tmp_path, capsys):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"fixes.c_epsilon": [0.1]}))
    assert main(["sweep", "--space", str(path), "--storage", f"sqlite:///{tmp_path}/x.db"]) == 2
    assert "unknown knob(s) 'fixes.c_epsilon'" in capsys.readouterr().err
    # a closed local port: refused at once; the password never appears in the message
    url = "postgresql+psycopg2://someone:s3cret@127.0.0.1:1/nodb"
    assert main(["sweep", "--storage", url, "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the study storage" in err and "127.0.0.1:1" in err and "s3cret" not in err
    with pytest.raises(ConfigError, match="expected an SQLAlchemy URL"):
        sweep.open_storage("redis://localhost/0")
    with pytest.raises(ConfigError, match="no such file"):
        search_space.load_space(tmp_path / "missing.json")


def test_space_maps_trial_values_onto_the_config(tmp_path):
    space = _space()
    assert space.base.fixes.rblend_trace_normalise is False and space.base.model.width == 32  # preset + fixed
    values = {"train.lr": 3e-3, "fixes.qr_retraction": False, "fixes.subspace_backend": "eigh", "loss.subspace": 0.1}
    drawn = space.suggest(optuna.trial.FixedTrial(values))
    assert drawn == values
    cfg = space.config(drawn)
    assert (cfg.train.lr, cfg.fixes.qr_retraction, cfg.fixes.subspace_backend, cfg.loss.subspace) == (3e-3, False, "eigh", 0.1)
    assert search_space.SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    yaml = pytest.importorskip("yaml")
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({"params": {"fixes.c_eps": {"type": "float", "low": 0.01, "high": 1.0, "log": True}}}))
    d = search_space.load_space(p).params["fixes.c_eps"]
    assert (d.low, d.high, d.log) == (0.01, 1.0, True)
    assert set(search_space.load_space(None).params) == set(search_space.DEFAULT_SPACE)


# ---------------------------------------------------------------------------------------------
# the objective: per-epoch reports, the pruner, non-finite trials with provenance
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pruned_study(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('sweep')}/optuna.db"
    s = sweep.create_study(_space(), url, "prune", pruner="median", pruner_startup=2)
    s.enqueue_trial({"train.lr": 1e-3, **GOOD, "loss.subspace": 0.1})
    s.enqueue_trial({"train.lr": 2e-3, **GOOD, "loss.subspace": 0.0})
    # no QR retraction of the factor: a much worse val_nmse at epoch 0 (measured), pruned by the median rule
    s.enqueue_trial({"train.lr": 1e-3, "fixes.qr_retraction": False, "fixes.subspace_backend": "safe", "loss.subspace": 0.1})
    # eigenvector gradients through a degenerate spectrum: non-finite steps
    s.enqueue_trial({"train.lr": 1e-3, "fixes.qr_retraction": True, "fixes.subspace_backend": "eigh", "loss.subspace": 0.1})
    ran = sweep.run_worker(url, "prune", 4, heartbeat=2, verbose=False)
    assert ran == [0, 1, 2, 3]
    return sweep.load_study(url, "prune")


def test_completed_trials_report_the_unweighted_val_nmse_every_epoch(pruned_study):
    for t in pruned_study.trials[:2]:
        assert t.state == TrialState.COMPLETE
        assert sorted(t.intermediate_values) == [0, 1]
        epochs = t.user_attrs["epochs"]
        assert [e["val_nmse"] for e in epochs] == [t.intermediate_values[0], t.intermediate_values[1]]
        assert t.value == t.intermediate_values[1]  # the objective is the last epoch's val_nmse


def test_median_pruner_prunes_a_bad_configuration(pruned_study):
    t = pruned_study.trials[2]
    assert t.state == TrialState.PRUNED and t.user_attrs["pruned_reason"] == "pruner"
    assert list(t.intermediate_values) == [0]  # stopped after the first epoch
    first = sorted(x.intermediate_values[0] for x in pruned_study.trials[:2])
    assert t.intermediate_values[0] > sum(first) / 2  # worse than the median at that step


def test_nonfinite_trial_is_pruned_with_its_provenance(pruned_study):
    t = pruned_study.trials[3]
    assert t.state == TrialState.PRUNED and t.user_attrs["pruned_reason"] == "nonfinite"
    assert t.user_attrs["nonfinite_steps"] > 0 and t.user_attrs["provenance_count"] >= len(t.user_attrs["provenance"]) > 0
    prov = t.user_attrs["provenance"]
    json.dumps(prov)  # plain JSON
    assert {(p["term"], p["op"]) for p in prov} == {("subspace", "LinalgEighBackward0")}
    assert sweep.summarize(pruned_study)["nonfinite"] == 1


def test_outcome_fractions_and_figures(pruned_study):
    fractions = sweeps.outcome_fractions(pruned_study)
    rows = {(r["param"], r["value"]): r for r in fractions}
    eigh = rows[("fixes.subspace_backend", "eigh")]
    assert eigh["n"] == 1 and eigh["nonfinite"] == 1.0
    safe = rows[("fixes.subspace_backend", "safe")]
    assert safe["n"] == 3 and safe["complete"] == pytest.approx(2 / 3) and safe["pruned"] == pytest.approx(1 / 3)
    for r in rows.values():
        assert r["complete"] + r["pruned"] + r["nonfinite"] + r["failed"] == pytest.approx(1.0)
    fig = fig_sweeps.outcomes_plotly(fractions)
    assert len(fig.data) == 4 * 4  # 4 outcomes x 4 knobs
    assert len(fig_sweeps.history_plotly(pruned_study).data) >= 1
    par = fig_sweeps.parallel_plotly(sweeps.parallel_rows(pruned_study))
    assert {"val_nmse", "train.lr", "loss.subspace", "outcome"} <= {d.label for d in par.data[0].dimensions}


# ---------------------------------------------------------------------------------------------
def test_rerunning_the_command_resumes_the_study(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    kw = dict(trials=2, epochs=1, n_train=32, n_val=16, storage=url, study="resume", preset_name="seed_fix2",
              overrides=TINY_FIXED, pruner="none", verbose=False)
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    s = sweep.run_sweep(space, **kw)
    first = [(t.number, t.value, t.params) for t in s.trials]
    assert len(first) == 2
    sweep.run_sweep(space, **kw)  # the same command again: nothing left to do
    assert len(sweep.load_study(url, "resume").trials) == 2
    s = sweep.run_sweep(space, **{**kw, "trials": 3})
    assert [(t.number, t.value, t.params) for t in s.trials[:2]] == first and len(s.trials) == 3
    with pytest.raises(ConfigError, match="different search space"):
        sweep.run_sweep({"train.lr": [1e-3]}, **kw)


def test_devices_start_one_worker_per_gpu_that_sees_only_its_own(tmp_path, monkeypatch):
    started = []

    class Finished:
        def wait(self):
            return 0

    def spawn(url, study, trials, *, worker, env=None, threads=None, **kw):
        started.append((worker, (env or {}).get("CUDA_VISIBLE_DEVICES"), env.get("PATH") if env else None))
        return Finished()

    monkeypatch.setattr(sweep, "spawn_worker", spawn)
    kw = dict(trials=1, epochs=1, n_train=32, n_val=16, storage=f"sqlite:///{tmp_path}/optuna.db", study="gpus", preset_name="seed_fix2",
              overrides=TINY_FIXED, pruner="none", verbose=False)
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    sweep.run_sweep(space, devices=["0", "2"], **kw)
    import os

    assert started == [(0, "0", os.environ.get("PATH")), (1, "2", os.environ.get("PATH"))]  # the rest of the environment is kept
    started.clear()
    sweep.run_sweep(space, workers=2, **{**kw, "study": "cpus"})  # plain workers: no device is pinned
    assert [d for _, d, _ in started] == [None, None]
    with pytest.raises(ConfigError, match="one worker per device"):
        sweep.run_sweep(space, workers=2, devices=["0"], **kw)


def test_join_with_devices_is_refused(tmp_path, capsys):
    assert main(["sweep", "--join", "--devices", "0", "--storage", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "--devices with --join" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("text", ["0,x", "0,0", "", "-1", "cuda:0"])
def test_bad_devices_are_refused_naming_the_flag(text):
    with pytest.raises(ConfigError, match="--devices"):
        sweep.parse_devices(text)


def test_devices_all_without_cuda_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        sweep.parse_devices("all")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert sweep.parse_devices("all") == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------
# workers sharing one study; one of them killed mid-trial


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/optuna.db"


def _ran(stdout: str) -> list[int]:
    return [int(line.split()[3]) for line in stdout.splitlines() if line.startswith("[worker ")]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_workers_share_a_study_and_survive_a_killed_worker(backend, request):
    url = request.getfixturevalue("pg_url" if backend == "postgres" else "sqlite_url")
    target = 6
    space = search_space.load_space({**SPACE, "params": {"train.lr": SPACE["params"]["train.lr"]}}, overrides={**TINY, **GOOD})
    sweep.create_study(space, url, "shared", pruner="none")
    kw = dict(heartbeat=1, grace=3, threads=1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = sweep.spawn_worker(url, "shared", target, worker=0, **kw)
    other = sweep.spawn_worker(url, "shared", target, worker=1, **kw)
    study = sweep.load_study(url, "shared", heartbeat=None)
    killed = None
    deadline = time.monotonic() + 90
    try:
        while killed is None and time.monotonic() < deadline:  # kill worker 0 in its second trial
            mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker", {}).get("index") == 0]
            running = [t for t in mine if t.state == TrialState.RUNNING and t.params]  # past suggest: training
            if running and len(mine) >= 2 and victim.poll() is None:
                victim.send_signal(signal.SIGKILL)
                killed = running[0].number
            time.sleep(0.1)
        assert killed is not None, "worker 0 never reached a second trial"
        out_victim = victim.communicate(timeout=10)[0]
        out_other, err_other = other.communicate(timeout=90)
    finally:
        for p in (victim, other):
            if p.poll() is None:
                p.kill()
    assert other.returncode == 0, err_other[-2000:]
    trials = sweep.load_study(url, "shared", heartbeat=None).trials
    by_number = {t.number: t for t in trials}
    assert sorted(by_number) == list(range(len(trials)))  # no trial recorded twice or lost
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # the killed trial was failed by its stale heartbeat and re-run, with the same params, by worker 1
    assert by_number[killed].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == by_number[killed].params and retry[0].user_attrs["worker"]["index"] == 1
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == target  # counting and claiming a trial happen under one lock: never more than asked
    # every finished trial was logged by exactly one worker, and both workers did some of them
    logged = _ran(out_victim) + _ran(out_other)
    assert sorted(logged) == sorted(t.number for t in finished)
    assert _ran(out_victim) and _ran(out_other)
    assert {t.user_attrs["worker"]["index"] for t in finished} == {0, 1}
    # the study is still usable: one more trial
    sweep.run_worker(url, "shared", len(finished) + 1, heartbeat=1, verbose=False)
    assert sweep.progress_counts(sweep.load_study(url, "shared", heartbeat=None))["done"] == len(finished) + 1


# ---------------------------------------------------------------------------------------------
# the study views on a hand-made study (no training)
def _hand_study(values: list[tuple[str, float | None, dict, str | None]]):
    """In-memory study from (state, value or last intermediate, params, pruned_reason) without training."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    dists = {"fixes.subspace_backend": CategoricalDistribution(["eigh", "safe"]), "train.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    s = optuna.create_study(direction="minimize")
    for state, value, params, reason in values:
        attrs = {"pruned_reason": reason} if reason else {}
        if reason == "nonfinite":
            attrs |= {"provenance": [{"term": "subspace", "op": "LinalgEighBackward0"}], "provenance_count": 3, "nonfinite_steps": 2}
        inter = {0: value} if value is not None else {}
        s.add_trial(create_trial(state=TrialState[state], value=value if state == "COMPLETE" else None, params=params, distributions=dists,
                                 user_attrs=attrs, intermediate_values=inter))
    return s


def test_sweep_views_on_a_hand_made_study():
    eigh, safe = {"fixes.subspace_backend": "eigh", "train.lr": 1e-3}, {"fixes.subspace_backend": "safe", "train.lr": 1e-3}
    s = _hand_study([("PRUNED", None, eigh, "nonfinite"), ("COMPLETE", 0.5, safe, None)])
    imp, note = sweeps.sweep_importances(s)
    assert imp is None and "at least 2 completed trials" in note and "has 1" in note
    s = _hand_study([("PRUNED", None, eigh, "nonfinite"), ("COMPLETE", 0.5, safe, None), ("COMPLETE", 0.4, safe, None),
                     ("PRUNED", 0.9, {**safe, "train.lr": 5e-3}, "pruner")])
    imp, note = sweeps.sweep_importances(s)
    assert imp is None and "no knob varies" in note  # both completed trials have the same params
    s.add_trial(_hand_study([("COMPLETE", 0.3, {**safe, "train.lr": 2e-4}, None)]).trials[0])
    imp, note = sweeps.sweep_importances(s)
    assert set(imp) == {"train.lr"} == set(sweeps.varying_params(s)) and sum(imp.values()) == pytest.approx(1.0)
    m = sweeps.sweep_metrics(s)
    assert m["states"]["COMPLETE"] == 3 and m["states"]["PRUNED"] == 2 and m["best"]["value"] == 0.3 and m["best"]["number"] == 4
    assert [r["number"] for r in m["nonfinite"]] == [0] and m["nonfinite"][0]["ops"] == ["subspace:LinalgEighBackward0"]
    rows = sweeps.parallel_rows(s)
    assert [(r["outcome"], r["value"]) for r in rows] == [("nonfinite", None), ("complete", 0.5), ("complete", 0.4), ("pruned", 0.9),
                                                          ("complete", 0.3)]
    fig = fig_sweeps.parallel_plotly(rows)
    dims = {d.label: d for d in fig.data[0].dimensions}
    assert list(dims) == ["fixes.subspace_backend", "train.lr", "val_nmse", "outcome"]
    assert dims["val_nmse"].values[0] > 0.9 and dims["val_nmse"].ticktext[-1] == "none"  # no value: above the largest
    assert [dims["outcome"].ticktext[int(v)] for v in dims["outcome"].values] == [r["outcome"] for r in rows]
    for f in (fig_sweeps.parallel_figure(rows), fig_sweeps.outcomes_figure(m["outcome_fractions"], "fixes.subspace_backend"),
              fig_sweeps.history_figure(s),
              fig_sweeps.importances_figure(s, list(imp))):
        assert figures.png_bytes(f)[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_train_on_a_dataset(tiny_dataset):
    """notebook 06's data=: a worker's trials take the dataset's scenes (TrainingData.from_dataset), one worker only."""
    from workbench import experiments
    from workbench.config import preset
    from workbench.forward import TrainingData

    cfg = TrainingData.dataset_config(tiny_dataset, preset("recommended", **{"train.n_train": 8, "train.n_val": 4, "train.device": "cpu"}))
    data = sweep.TrialData(tiny_dataset).for_config(cfg)
    assert experiments.scenes_digest(data) == experiments.scenes_digest(TrainingData.from_dataset(tiny_dataset, cfg))
    assert experiments.scenes_digest(data) != experiments.scenes_digest(sweep.TrialData().for_config(cfg))
    with pytest.raises(ConfigError, match="workers = 1"):
        sweep.run_sweep(None, trials=1, workers=2, data=tiny_dataset)
