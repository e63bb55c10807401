"""Every notebook executed headless with papermill (CI parameters), asserting on the metrics.json it wrote
against independent recomputations and identities; bad parameters fail in the config cell, naming the field.

The runs go through :func:`workbench.report.run_notebook`, the code path of ``workbench report``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nbformat
import pytest
import torch

from workbench import cli, report
from workbench import params as wp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NB = report.NOTEBOOK_DIR


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _run(name: str, root: Path) -> tuple[report.NotebookRun, dict]:
    run = report.run_notebook(report.notebook_path(name), root, ci=True)
    assert run.status == "ok", f"{name} failed in cell {run.cell}: {run.error}"
    metrics = json.loads((Path(run.out_dir) / "metrics.json").read_text())
    assert metrics["params"]["out_dir"] == str(root / name)
    return run, metrics


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _explained(out: Path, m: dict, numbers: list[str]) -> None:
    """The notebook's conclusion quotes numbers of its own run, and every saved figure has a title and labelled axes."""
    assert m["conclusion"].startswith("- ")
    missing = [n for n in numbers if n not in m["conclusion"]]
    assert not missing, (missing, m["conclusion"])
    figs = json.loads((out / "figures.json").read_text())
    assert [f["file"] for f in figs] and {f["file"] for f in figs} == {p.name for p in out.glob("*.png")}
    for f in figs:
        assert f["title"], f
        for a in f["axes"]:
            assert a["xlabel"] and a["ylabel"], f


# ---------------------------------------------------------------------------------------------
def test_01_covariance_normalisation(runs_root):
    run, m = _run("01_covariance_normalisation", runs_root)
    assert _png(Path(run.out_dir) / "norms.png")
    params = wp.notebook_params("01_covariance_normalisation", **m["params"])
    system = params.experiment().system
    N = system.N
    rows = {r["preset"]: r for r in m["rows"]}
    assert set(rows) == set(params.preset_names)
    # independent recomputation of the raw and normalised R_samp norms (same scenes, same seed)
    from workbench.covariance import hermitise, trace_normalise
    from workbench.estimators import sample_covariance
    from workbench.physics import simulate

    b = simulate(system, params.n_scenes, seed=params.seed)
    raw = sample_covariance(b.y, b.G, "seed", system.ridge, b.noise_var)  # the full G: an independent path
    raw_fro = float(torch.linalg.matrix_norm(raw).double().quantile(0.5))
    norm_fro = float(torch.linalg.matrix_norm(trace_normalise(hermitise(raw))).double().quantile(0.5))
    for name, r in rows.items():
        fx = r["config"]
        assert r["R_samp_raw"]["fro"] == pytest.approx(raw_fro, rel=1e-3)
        if fx["rsamp_normalise"]:  # Fix 1: trace N exactly
            assert r["R_samp"]["trace"] == pytest.approx(N, rel=1e-4)
            assert r["R_samp"]["fro"] == pytest.approx(norm_fro, rel=1e-3)
        else:
            assert r["R_samp"]["fro"] == pytest.approx(raw_fro, rel=1e-3)
        K_max = system.K_max
        if fx["qr_retraction"]:  # R_pred = Q Q^H is a rank-K_max projector: trace K_max
            assert r["R_pred"]["trace"] == pytest.approx(K_max, rel=1e-4)
            assert r["R_pred"]["rank"] == K_max
        # tr R_blend = (1-b) tr R_pred + b tr R_samp + C_EPS N, or N + C_EPS N when the blend is renormalised
        # (medians add up here because both traces are the same in every scene)
        if fx["rblend_trace_normalise"]:
            expected = N + fx["c_eps"] * N
        elif fx["qr_retraction"] and fx["rsamp_normalise"]:
            expected = (1 - fx["beta"]) * K_max + fx["beta"] * N + fx["c_eps"] * N
        else:
            expected = None
        if expected is not None:
            assert r["R_blend"]["trace"] == pytest.approx(expected, rel=1e-4), name
        assert r["R_blend"]["rank"] == N  # loading makes it full rank (the seed's "rank 144")
    # the seed-note comparison measures the same R_samp as the table (two code paths)
    cmp = {(c["preset"], c["metric"]): c for c in m["seed_comparison"]}
    if ("seed_fix2", "R_samp_fro") in cmp:  # seed_table runs the notebook's own system
        assert cmp[("seed_fix2", "R_samp_fro")]["measured"] == pytest.approx(rows["seed_fix2"]["R_samp"]["fro"], rel=1e-4)
        assert cmp[("seed_fix2", "R_samp_fro")]["seed_note"] == 41.03
    assert {r["preset"] for r in m["seed_table"]} == set(params.preset_names)
    _explained(Path(run.out_dir), m, [f"{rows['seed_fix2']['R_blend']['fro']:.3g}", f"{m['seed_table'][0]['oracle_nmse']['median']:.3g}"])


def test_02_eigen_spectrum(runs_root):
    run, m = _run("02_eigen_spectrum", runs_root)
    out = Path(run.out_dir)
    assert _png(out / "spectrum.png") and _png(out / "loading.png")
    assert "plotly" in (out / "spectrum.html").read_text()[:5000].lower() and (out / "plotly.min.js").exists()
    c_eps = m["fixes"]["c_eps"]  # the preset's value unless the notebook was given one
    N = wp.notebook_params("02_eigen_spectrum", **m["params"]).experiment().system.N
    # R_true = sum_k p_k a_k a_k^H has rank K in every scene
    assert m["rank"]["R_true"] == m["K"]
    ev = m["scene"]["eigvals"]
    for name, values in ev.items():
        assert all(a >= b - 1e-6 * abs(values[0]) for a, b in zip(values, values[1:])), f"{name} not descending"
    # R_blend = convex blend of PSD matrices + C_EPS I: every eigenvalue >= C_EPS
    assert min(ev["R_blend"]) >= c_eps * (1 - 1e-4) - 1e-5
    assert m["rank"]["R_blend"] == [N] * len(m["K"])
    # loading shifts the floor by exactly the change of C_EPS and leaves the gap unchanged
    sweep = m["loading_sweep"]
    assert len(sweep) == len(wp.notebook_params("02_eigen_spectrum", **m["params"]).c_eps_values)
    for a, b in zip(sweep, sweep[1:]):
        assert b["gap"] == pytest.approx(a["gap"], rel=1e-4, abs=1e-4)
        assert b["lower_min"] - a["lower_min"] == pytest.approx(b["c_eps"] - a["c_eps"], abs=1e-3)
        assert b["lower_max"] - a["lower_max"] == pytest.approx(b["c_eps"] - a["c_eps"], abs=1e-3)
    k = m["scene"]["K"]
    _explained(out, m, [f"{ev['R_blend'][k - 1] - ev['R_blend'][k]:.3g}", f"{sweep[0]['gap']:.4g}"])


def test_03_nan_gradients(runs_root):
    run, m = _run("03_nan_gradients", runs_root)
    assert _png(Path(run.out_dir) / "gradients.png")
    p = wp.notebook_params("03_nan_gradients", **m["params"])
    cfg = p.experiment()
    # eigenvalue-only gradients are finite under heavy degeneracy; eigh's eigenvectors are not; `safe` is
    deg = {(r["term"], r["backend"]): r for r in m["degeneracy"]}
    assert deg[("gap", "eigh")]["degenerate"] >= cfg.system.N - cfg.system.K_max
    for b in ("eigh", "eigvalsh", "svd", "exact"):
        assert deg[("gap", b)]["grad_finite"], b
    assert not deg[("subspace", "eigh")]["grad_finite"]
    assert deg[("subspace", "safe")]["grad_finite"]
    # independent value of the always-active hinge (margin 1e3) from plain eigvalsh on the same matrices
    from workbench.covariance import diagonal_load, trace_normalise
    from workbench.studies.pipeline import scene_batch

    batch = scene_batch(cfg, p.n_scenes, p.seed)
    R = diagonal_load(trace_normalise(batch.R_true), cfg.fixes.c_eps)
    ev = torch.linalg.eigvalsh(diagonal_load(R, cfg.fixes.eps_psd)).flip(-1).double()
    K = batch.K
    gap = ev.gather(1, (K - 1)[:, None])[:, 0] - ev.gather(1, K[:, None])[:, 0]
    assert deg[("gap", "eigvalsh")]["value"] == pytest.approx(float((1e3 - gap).sum()), rel=1e-6)
    # float64 finite differences agree with autograd for the exact backends; SVD = eigh; the flip inverts the hinge
    fd = {r["backend"]: r for r in m["fd_check"]}
    for b in ("eigh", "eigvalsh", "svd", "exact"):
        assert fd[b]["rel_err"] < 1e-4, (b, fd[b])
        assert fd[b]["gap"] == pytest.approx(fd[b]["gap_eigvalsh"], rel=1e-6)
    assert fd["svd"]["autograd"] == pytest.approx(fd["eigh"]["autograd"], rel=1e-8)
    assert fd["svd_flipped"]["gap"] <= 1e-6  # gap between the smallest eigenvalues: never positive
    assert fd["svd_flipped"]["hinge"] >= cfg.fixes.gap_margin * (1 - 1e-5)
    if fd["eigh"]["gap_eigvalsh"] > cfg.fixes.gap_margin:
        assert fd["eigh"]["hinge"] == 0.0
    # in the network: the eigh subspace term's gradient is NaN and its provenance names eigh's backward
    rows = {(r["kind"], r["backend"]): r for r in m["backends"]}
    bad = rows[("subspace", "eigh")]
    assert not bad["term_finite"] and any("Eigh" in p["op"] for p in bad["provenance"] if p["term"] == "subspace")
    assert rows[("subspace", "safe")]["term_finite"] and all(math.isfinite(v) for v in rows[("subspace", "safe")]["grad_norm"].values())
    c = m["conclusions"]
    assert "safe" in c["subspace_backends_finite_in_network"] and "eigh" not in c["subspace_backends_finite_in_network"]
    _explained(Path(run.out_dir), m, [f"{deg[('gap', 'eigh')]['degenerate']:.0f} smallest eigenvalues", "LinalgEighBackward0"])
    gap_rows = [r for r in m["backends"] if r["kind"] == "gap"]
    if all(r["hinge_active"] is False for r in gap_rows):  # an inactive hinge is said to be inactive, with its zero gradient
        assert "hinge is inactive" in m["conclusion"] and all(v == 0.0 for r in gap_rows if r["backend"] != "svd_flipped"
                                                              for v in r["term_grad_norm"].values())


def test_04_training(runs_root):
    run, m = _run("04_training", runs_root)
    out = Path(run.out_dir)
    assert _png(out / "training.png")
    p = wp.notebook_params("04_training", **m["params"])
    assert set(m["runs"]) == set(p.preset_names)
    names = {"loss finite and in range", "gradients finite", "training loss decreasing", "weights changing"}
    rows = {r["preset"]: r for r in m["rows"]}
    for name, r in m["runs"].items():
        assert len(r["history"]) == p.epochs and names <= set(rows[name])
        assert rows[name]["weights changing"] == all(h["param_change"] > 0 for h in r["history"]), name
        assert rows[name]["skipped steps"] == sum(h["skipped_nonfinite"] for h in r["history"])
        assert (out / name / "checkpoint.pt").exists()  # a run folder per preset, for notebook 05
    # an independent training of the last preset on the same scenes reproduces the notebook's history
    from workbench import experiments, forward, train

    name = p.preset_names[-1]
    data = forward.TrainingData.simulate(p.experiment(p.preset_names[0]))
    assert experiments.scenes_digest(data) == m["scenes_digest"]
    res = train.fit(p.experiment(name), data, progress=False)
    hist = m["runs"][name]["history"]
    assert [h["train_loss"] for h in hist] == pytest.approx([h["train_loss"] for h in res.history], rel=1e-3, nan_ok=True)
    assert hist[-1]["val_nmse"] == pytest.approx(res.history[-1]["val_nmse"], rel=1e-3, nan_ok=True)
    _explained(out, m, [f"{rows[name]['final val NMSE']:.3g}"])


def test_05_localisation(runs_root):
    """Run after 04 in the same folder: 05 reuses 04's networks (same CI sizes) and localises from each of them, from
    R_true, the R_samp estimators and the physics baseline."""
    run, m = _run("05_localisation", runs_root)
    out = Path(run.out_dir)
    assert _png(out / "localisation.png") and (out / "spectrum.html").exists()
    p = wp.notebook_params("05_localisation", **m["params"])
    res = m["localisation"]
    expected = {"R_true", *(f"R_samp[{e}]" for e in p.estimator_names), "physics[ML]", *(f"{n}:R_pred" for n in p.preset_names)}
    expected |= {"localiser:R_pred"} if p.localiser else set()
    assert res["snr_db"] == p.snr_values and set(res["covariances"]) == expected
    assert all(m["models"][n]["reused"] for n in p.preset_names), m["models"]  # notebook 04's runs (the localiser is trained here)
    if p.localiser:  # the learned localiser beside the ML fit, on the same scenes, and its detections on one scene
        rows = m["localiser"]["rows"]
        assert {r["estimator"] for r in rows} == {"localiser", "ML fit", "ML fit + RELAX"} and {r["snr_db"] for r in rows} == {max(p.snr_values)}
        assert _png(out / "localiser_scene.png") and len(m["localiser_scene"]["true"]) == m["localiser_scene"]["K"]
        assert _png(out / "localiser_frontier.png")  # the count's frontier with the perfect search (oracle) beside the fits
        assert {f["estimator"] for f in m["localiser"]["frontier"]} == {"ML fit", "ML fit + RELAX", "ML fit from the truth"}
    assert set(res["k_source"].values()) == {"own", "mdl"} and res["k_source"]["physics[ML]"] == "own"
    # the exact, noise-free covariance with the true K: MUSIC finds every source (to refinement accuracy)
    true = res["covariances"]["R_true"]
    assert all(f == 1.0 for f in true["f1"])
    assert max(true["rmse_phi_deg"]) < 0.1 and max(true["rmse_theta_deg"]) < 0.1
    # the Cramer-Rao bound falls with SNR (it scales like 1/SNR at high SNR)
    lo, hi = res["snr_db"].index(min(res["snr_db"])), res["snr_db"].index(max(res["snr_db"]))
    if res["snr_db"][hi] - res["snr_db"][lo] >= 10:
        assert res["sqrt_crb"]["phi_deg"][hi] < res["sqrt_crb"]["phi_deg"][lo]
    spec = m["spectrum"]
    assert spec["name"] == p.spectrum_source and spec["snr_db"] == max(p.snr_values) and len(spec["true"]) == spec["K"]
    ratio = res["covariances"]["R_true"]["rmse_phi_deg"][hi] / res["sqrt_crb"]["phi_deg"][hi]
    _explained(out, m, [f"{ratio:.3g}"])


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,params,field",
    [
        ("02_eigen_spectrum", {"c_eps": -1.0}, "c_eps = -1.0 is out of range"),
        ("01_covariance_normalisation", {"n_scenes": "many"}, "01_covariance_normalisation.n_scenes = 'many': expected an integer"),
        ("03_nan_gradients", {"gap_backend": "qr"}, "03_nan_gradients.gap_backend: fixes.gap_backend = 'qr' is not allowed"),
    ],
)
def test_bad_parameter_fails_in_config_cell(tmp_path, name, params, field):
    run = report.run_notebook(report.notebook_path(name), tmp_path, params, ci=True)
    assert run.status == "failed"
    assert run.error.startswith("ConfigError") and field in run.error
    executed = nbformat.read(Path(run.out_dir) / run.notebook, as_version=4)
    assert "config" in executed.cells[run.cell].metadata.get("tags", [])  # failed exactly in the config cell
    assert not (Path(run.out_dir) / "metrics.json").exists()


def test_report_cli_failure_names_notebook_and_cell(tmp_path, capsys):
    # the report validates -p against the notebook's parameter class before anything is written or removed
    rc = cli.main(["report", "--only", "02", "--ci", "-p", "c_eps", "-1", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "c_eps = -1.0" in err and "02_eigen_spectrum" in err
    assert not any(tmp_path.iterdir())
    # a notebook that fails in its kernel is named with its cell as the user sees it: the line of the notebook's
    # source where the config cell starts
    run = report.run_notebook(report.notebook_path("02_eigen_spectrum"), tmp_path, {"c_eps": -1.0}, ci=True)
    assert run.status == "failed" and run.cell_source.startswith("[config]")
    line = int(re.search(r"02_eigen_spectrum\.py line (\d+)", run.where).group(1))
    assert report.notebook_path("02_eigen_spectrum").read_text().splitlines()[line - 1] == '# %% tags=["config"]'

    assert (tmp_path / "02_eigen_spectrum" / "02_eigen_spectrum.ipynb").exists()  # partial output kept
    index = report.write_index([run], tmp_path).read_text()
    assert "02_eigen_spectrum" in index and "failed" in index


# ---------------------------------------------------------------------------------------------
# 06: the sweep, re-read from its SQLite file with optuna directly
def test_06_sweep(runs_root):
    import optuna
    from optuna.trial import TrialState

    run, m = _run("06_sweep", runs_root)
    out = Path(run.out_dir)
    p = wp.notebook_params("06_sweep", **m["params"])
    for name in ("history", "parallel", "outcomes"):
        assert _png(out / f"{name}.png")
        assert "plotly" in (out / f"{name}.html").read_text()[:5000].lower()
    # the default storage is a file under out_dir, never runs/optuna.db
    db = out / "optuna.db"
    assert m["storage"] == f"sqlite:///{db}" and db.exists()
    trials = optuna.load_study(study_name=p.study, storage=f"sqlite:///{db}").get_trials()
    assert m["states"] == {s.name: sum(t.state == s for t in trials) for s in TrialState}
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    assert len(finished) >= p.trials and m["progress"]["done"] == len(finished)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = min(complete, key=lambda t: t.value)
        assert m["best"] == {"number": best.number, "value": best.value, "params": best.params}
    else:
        assert m["best"] is None
    # the queued bad configuration ran first and was pruned as non-finite, its provenance naming eigh's backward
    queued = p.enqueued
    assert trials[0].params == queued[0] and queued[0]["fixes.subspace_backend"] == "eigh" and queued[0]["loss.subspace"] > 0
    assert trials[0].state == TrialState.PRUNED and trials[0].user_attrs["pruned_reason"] == "nonfinite"
    nonfinite = {r["number"]: r for r in m["nonfinite"]}
    assert set(nonfinite) == {t.number for t in trials if t.user_attrs.get("pruned_reason") == "nonfinite"}
    assert nonfinite[0]["ops"] == ["subspace:LinalgEighBackward0"] and nonfinite[0]["nonfinite_steps"] > 0
    assert trials[1].params == queued[1] and trials[1].state == TrialState.COMPLETE  # the safe backward: finite
    # the fraction of non-finite trials per subspace backend, recounted from the trials
    rows = {r["value"]: r for r in m["outcome_fractions"] if r["param"] == "fixes.subspace_backend"}
    for backend, r in rows.items():
        group = [t for t in finished if t.params["fixes.subspace_backend"] == backend]
        assert r["n"] == len(group)
        assert r["nonfinite"] == pytest.approx(sum(t.user_attrs.get("pruned_reason") == "nonfinite" for t in group) / len(group))
    assert rows["eigh"]["nonfinite"] > 0 and rows["safe"]["complete"] > 0
    # importances: over the knobs that vary among the completed trials, or a note saying why there are none
    varying = {k for k in complete[0].params if len({repr(t.params[k]) for t in complete}) > 1} if complete else set()
    if m["importances"] is None:
        assert not (out / "importances.png").exists() and ("at least 2" in m["importances_note"] or "varies" in m["importances_note"])
        assert len(complete) < 2 or not varying
    else:
        assert set(m["importances"]) == varying and sum(m["importances"].values()) == pytest.approx(1.0)
        assert _png(out / "importances.png")
    _explained(out, m, [f"{len(finished)} finished trials"] + ([f"{m['best']['value']:.4g}"] if m["best"] else []))
    for r in m["outcome_fractions"]:  # small groups carry their caveat
        assert ("only" in r["caveat"]) == (r["n"] < 3)


def test_06_bad_space_fails_in_config_cell(tmp_path):
    run = report.run_notebook(report.notebook_path("06_sweep"), tmp_path, {"space": '{"fixes.c_epsilon": [0.1, 1.0]}'}, ci=True)
    assert run.status == "failed" and run.error.startswith("ConfigError")
    assert "06_sweep.space" in run.error and "'fixes.c_epsilon'" in run.error
    executed = nbformat.read(Path(run.out_dir) / run.notebook, as_version=4)
    assert "config" in executed.cells[run.cell].metadata.get("tags", [])
    assert not (Path(run.out_dir) / "optuna.db").exists()  # failed before any study was created


def test_report_cli_takes_negative_numbers_and_writes_a_results_page(tmp_path):
    """`workbench report --only 05 -p snrs_db -10,0 --ci`: the negative list is a value, the run uses it, and the
    index is a results page (the conclusion, captioned figures, the parameters the notebook actually used)."""
    assert cli.main(["report", "--only", "05", "-p", "snrs_db", "-10,0", "--ci", "--out", str(tmp_path), "--run", "r1", "--no-progress"]) == 0
    m = json.loads((tmp_path / "r1" / "05_localisation" / "metrics.json").read_text())  # each report is a run folder of its own
    assert m["params"]["snrs_db"] == "-10,0" and m["localisation"]["snr_db"] == [-10.0, 0.0]
    page = (tmp_path / "r1" / "index.html").read_text()
    assert "class='conclusion'" in page and "<figcaption>" in page and "n_per_snr" in page  # a default the run used, not only -p's


# ---------------------------------------------------------------------------------------------
# data: a dataset folder (workbench data generate on a 5 x 4 RIS) instead of simulated scenes
def test_02_runs_on_a_dataset_and_uses_its_system(tmp_path, tiny_dataset):
    from workbench.data import load_dataset

    run = report.run_notebook(report.notebook_path("02_eigen_spectrum"), tmp_path, {"data": str(tiny_dataset)}, ci=True)
    assert run.status == "ok", run.error
    m = json.loads((Path(run.out_dir) / "metrics.json").read_text())
    p = wp.notebook_params("02_eigen_spectrum", **m["params"])
    assert m["params"]["data"] == str(tiny_dataset) and p.experiment().system.N == 20  # the dataset's 5 x 4, not N_side 12
    assert all(len(v) == 20 for v in m["scene"]["eigvals"].values())
    scenes = load_dataset(tiny_dataset)[:p.n_scenes]
    assert m["K"] == scenes.K.tolist()  # the dataset's first n_scenes scenes
    assert m["rank"]["R_true"] == scenes.K.tolist()  # rank(R_true) = K of those scenes


def test_04_report_with_data_trains_on_the_dataset(tmp_path, tiny_dataset):
    """`workbench report --only 04 -p data PATH`: every preset trains on the dataset's scenes (its system, its split)."""
    from workbench import experiments
    from workbench.forward import TrainingData

    assert cli.main(["report", "--only", "04", "--ci", "-p", "data", str(tiny_dataset), "--out", str(tmp_path), "--run", "r",
                     "--no-progress"]) == 0
    m = json.loads((tmp_path / "r" / "04_training" / "metrics.json").read_text())
    p = wp.notebook_params("04_training", **m["params"])
    cfg = p.experiment(p.preset_names[0])
    assert cfg.system.N_H == 5 and cfg.system.N_V == 4
    assert m["scenes_digest"] == experiments.scenes_digest(TrainingData.from_dataset(tiny_dataset, cfg))
    assert m["scenes_digest"] != experiments.scenes_digest(TrainingData.simulate(cfg))


def test_report_refuses_a_bad_data_path_naming_data(tmp_path, capsys):
    rc = cli.main(["report", "--only", "03", "--ci", "-p", "data", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "03_nan_gradients.data" in capsys.readouterr().err and not (tmp_path / "out").exists()
