"""Widget panels driven without a kernel: a control change re-runs the bound function, a preset resets the knobs,
the busy state is on while computing, an initial result is shown without computing, and nothing is shown as an
empty image."""

from __future__ import annotations

import pytest
import torch

from workbench import params as wp
from workbench import train, ui
from workbench.config import preset
from workbench.studies import pipeline


@pytest.fixture(autouse=True)
def _own_root(tmp_path, monkeypatch):
    """Relative out_dirs (the notebooks' defaults) and interactive run folders land under the test's folder, not the checkout's runs/."""
    monkeypatch.setenv("WORKBENCH_ROOT", str(tmp_path / "root"))


def test_normalisation_panel_toggles_fix1_and_loads_presets():
    panel = ui.NormalisationPanel(wp.notebook_params("01_covariance_normalisation", n_scenes=3, width=16, N_side=6, presets="seed_fix2"))
    before = panel.update()
    assert before["R_samp"]["trace"] == pytest.approx(36, rel=1e-4)  # Fix 1 on
    panel.controls["rsamp_normalise"].value = False
    after = panel.result
    assert after["R_samp"]["fro"] == pytest.approx(after["R_samp_raw"]["fro"]) and after["R_samp"]["fro"] < 1e-2 * before["R_samp"]["fro"]
    # the same function the headless cell calls, on the same scenes, gives the same numbers
    assert after == pipeline.pipeline_summary(panel.config(), panel.batch, seed=panel.params.seed)
    assert "R_blend" in panel.status.value
    panel.controls["rsamp_normalise"].value = True
    panel.controls["preset"].value = "seed_before"  # loads the preset's toggles, one recomputation
    assert panel.controls["rsamp_normalise"].value is False and panel.controls["rblend_trace_normalise"].value is True
    assert panel.result["R_blend"]["trace"] == pytest.approx(36 * (1 + panel.controls["c_eps"].value), rel=1e-4)
    panel.controls["preset"].value = "recommended"
    fx = preset("recommended").fixes
    assert (panel.controls["c_eps"].value, panel.controls["beta"].value, panel.controls["estimator"].value) == (fx.c_eps, fx.beta, fx.rsamp_estimator)
    assert panel.config().fixes == fx


def test_panels_start_from_the_config_the_notebook_ran():
    """02 under `recommended` starts at the preset's C_EPS, beta and estimator (it once showed the seed's)."""
    p = wp.notebook_params("02_eigen_spectrum", preset="recommended", n_scenes=2, width=16, N_side=6)
    panel = ui.SpectrumPanel(p)
    assert panel.config() == p.experiment()
    assert panel.config().fixes == preset("recommended").fixes


def test_spectrum_panel_c_eps_moves_the_floor_not_the_gap_and_scene_only_redraws():
    panel = ui.SpectrumPanel(wp.notebook_params("02_eigen_spectrum", n_scenes=2, width=16, N_side=6))
    a = panel.update()
    png_a = panel.image.value
    assert png_a[:8] == b"\x89PNG\r\n\x1a\n" and panel.image.layout.display is None
    panel.controls["c_eps"].value = 0.01
    b = panel.result
    assert b is not a and panel.image.value != png_a  # the figure was redrawn from the new result
    lo_a, lo_b = a.eigvals["R_blend"][:, -1], b.eigvals["R_blend"][:, -1]
    assert torch.allclose(lo_a - lo_b, torch.full_like(lo_a, 1.0 - 0.01), atol=1e-4)
    assert torch.allclose(a.gap["R_blend"], b.gap["R_blend"], rtol=1e-4, atol=1e-4)
    panel.controls["scene"].value = 1
    assert panel.result is b and "scene 1" in panel.status.value  # the spectra were not recomputed


def test_initial_result_is_shown_without_computing(monkeypatch):
    p = wp.notebook_params("02_eigen_spectrum", n_scenes=2, width=16, N_side=6)
    spec = pipeline.spectra(p.experiment(), pipeline.scene_batch(p.experiment(), 2, 0))
    monkeypatch.setattr(ui.SpectrumPanel, "compute", lambda self: pytest.fail("computed on display"))
    panel = ui.SpectrumPanel(p, initial=spec)
    panel._repr_mimebundle_()
    assert panel.result is spec and "scene 0" in panel.status.value and panel.image.value[:4] == b"\x89PNG"


def test_busy_state_while_computing():
    panel = ui.GradientPanel(wp.notebook_params("03_nan_gradients", n_scenes=1, width=16, N_side=4, subspace_backend="safe"))
    seen = {}
    compute = panel.compute

    def spy():
        seen["disabled"] = all(w.disabled for w in panel.controls.values())
        seen["busy"] = "wb-busy" in panel.widget._dom_classes and "computing" in panel.status.value
        return compute()

    panel.compute = spy
    panel.update()
    assert seen == {"disabled": True, "busy": True}
    assert not any(w.disabled for w in panel.controls.values()) and "wb-busy" not in panel.widget._dom_classes


def test_gradient_panel_backend_switch_changes_status():
    panel = ui.GradientPanel(wp.notebook_params("03_nan_gradients", n_scenes=2, width=16, N_side=6, subspace_backend="eigh"))
    bad = panel.update()
    assert not bad["ok"] and "gradient NaN" in panel.status.value
    assert any(p["term"] == "subspace" for p in bad["provenance"])
    assert panel.image.layout.display == "none"  # no figure: no (broken) image
    panel.controls["subspace_backend"].value = "safe"
    good = panel.result
    assert good["ok"] and "gradient finite" in panel.status.value
    assert good["terms"]["subspace"] == pytest.approx(bad["terms"]["subspace"], rel=1e-5)  # same value, different backward


def test_training_panel_trains_only_on_the_button_with_progress():
    p = wp.notebook_params("04_training", presets="recommended", epochs=1, n_train=4, n_val=2, batch_size=4, width=16, N_side=4)
    panel = ui.TrainingPanel(p)
    panel._repr_mimebundle_()
    assert panel.result is None and "press" in panel.status.value
    panel.controls["epochs"].value = 2  # no auto-update: training waits for the button
    assert panel.result is None
    fractions = []
    panel.progress.observe(lambda c: fractions.append(c["new"]), names="value")
    panel.button.click()
    assert len(panel.result.history) == 2 and panel.result.config.train.epochs == 2
    assert fractions[-1] == 1.0 and "final train loss" in panel.status.value and panel.progress.layout.display == "none"
    assert "0 steps skipped" in panel.status.value and panel.image.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_panel_starts_from_the_headless_run_and_shows_skipped_steps():
    """Built with the headless cell's runs, the panel shows the last preset's run without training; a subspace weight
    under a seed preset (plain eigh through a degenerate spectrum) shows skipped steps in the status."""
    from workbench import experiments
    from workbench.forward import TrainingData

    p = wp.notebook_params("04_training", presets="seed_fix2", epochs=1, n_train=8, n_val=4, batch_size=4, width=16, N_side=6)
    configs = experiments.entry_configs(p.preset_names, p.dotted_overrides())
    data = TrainingData.simulate(configs["seed_fix2"])
    runs = experiments.train_entries(configs, data, progress=False)
    panel = ui.TrainingPanel(p, data=data, initial=runs)
    assert panel.result is runs["seed_fix2"] and "seed_fix2: final train loss" in panel.status.value
    panel.controls["subspace"].value = 0.1
    panel.button.click()
    assert sum(h["skipped_nonfinite"] for h in panel.result.history) > 0
    assert "0 steps skipped" not in panel.status.value and "✘ gradients finite" in panel.status.value


def test_localisation_panel_draws_one_scene_within_a_second():
    from workbench.studies import localisation

    p = wp.notebook_params("05_localisation", n_per_snr=3, N_side=4, snrs_db="0,20", estimators="seed", presets="recommended",
                           physics_baseline=False)
    sources = localisation.localisation_sources(p.experiment(), p.estimator_names)
    panel = ui.LocalisationPanel(p, sources)
    view = panel.update()
    assert view["name"] == "R_true" and view["snr_db"] == 20.0 and "K = " in panel.status.value  # no R_pred here: the first source
    assert panel.plot.outputs and "application/vnd.plotly.v1+json" in panel.plot.outputs[0]["data"]
    assert panel.image.layout.display == "none"  # the spectrum is interactive: no (empty) image
    panel.controls["scene"].value = 2
    assert panel.result["scene"] == 2 and panel.seconds < 1.0, panel.seconds
    panel.controls["source"].value = "R_samp[seed]"
    assert panel.result["name"] == "R_samp[seed]"
    panel.controls["method"].value = "mvdr"
    assert panel.result["method"] == "mvdr"
    # the same function as the headless cell
    system = p.experiment().system
    scene = localisation.snr_scene(system, 20.0, 3, p.seed, 2, snr_index=1)  # 20 dB is the second SNR: seed + 1
    again = localisation.scene_spectrum(system, scene, "R_samp[seed]", sources["R_samp[seed]"], "mvdr", scene=2)
    assert again["estimated"] == panel.result["estimated"]


def test_localisation_panel_computes_one_scene_on_one_thread(monkeypatch):
    """One scene is many tiny linear-algebra calls: the panel runs them on LocalisationPanel.THREADS (1) threads, and
    restores the caller's count afterwards."""
    from workbench.studies import localisation

    p = wp.notebook_params("05_localisation", n_per_snr=2, N_side=4, snrs_db="20", estimators="seed", presets="recommended",
                           physics_baseline=False)
    seen = []
    real = localisation.scene_spectrum

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(localisation, "scene_spectrum", spy)
    before = torch.get_num_threads()
    with train.torch_threads(2):
        panel = ui.LocalisationPanel(p, localisation.localisation_sources(p.experiment(), p.estimator_names))
        panel.update()
        assert torch.get_num_threads() == 2
    assert seen == [ui.LocalisationPanel.THREADS] == [1] and torch.get_num_threads() == before


def test_panel_shows_invalid_combination():
    panel = ui.GradientPanel(wp.notebook_params("03_nan_gradients", n_scenes=1, width=16, N_side=4, subspace_weight=0.0))
    panel.update()
    panel.controls["lam_gap"].value = -1.0
    assert "invalid" in panel.status.value and "lam_gap" in panel.error
    assert not any(w.disabled for w in panel.controls.values())


def test_sweep_panel_knob_and_more_trials(tmp_path):
    p = wp.notebook_params("06_sweep", **{**wp.SweepParams.ci, "trials": 2}, out_dir=str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 6x6 RIS and width 16: more threads only add contention
    try:
        _sweep_panel_checks(p)
    finally:
        torch.set_num_threads(threads)


def _sweep_panel_checks(p):
    from workbench import sweep
    from workbench.studies.sweeps import outcome_fractions

    sweep.run_sweep(p.search_space, trials=p.trials, study=p.study, storage=p.storage_url, seed=p.seed, pruner=p.pruner,
                    enqueue=p.enqueued, verbose=False)
    panel = ui.SweepPanel(p)
    res = panel.update()
    assert res["summary"]["counts"]["done"] == 2 and "2 finished" in panel.status.value and "1 non-finite" in panel.status.value
    panel.controls["knob"].value = "fixes.subspace_backend"  # the same function as the headless cell, filtered to one knob
    assert panel.result["rows"] == [r for r in outcome_fractions(panel.study()) if r["param"] == "fixes.subspace_backend"]
    assert panel.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    panel.controls["more"].value = 1
    assert panel.result["summary"]["counts"]["done"] == 2  # the count alone runs nothing
    panel.button.click()
    assert panel.result["summary"]["counts"]["done"] == 3 and panel.controls["knob"].value == "fixes.subspace_backend"
    assert sum(panel.result["states"].values()) == 3
    # the action is a run of its own beside the study, with a manifest and the trials it added
    import json

    from workbench import runs

    m = runs.read_run(panel.last_run)
    assert m["kind"] == "panel" and m["status"] == "ok" and m["study"] == p.study and panel.last_run.parent == p.out_path / "panels"
    added = json.loads((panel.last_run / "metrics.json").read_text())
    assert added["added"] == [2] and added["before"]["counts"]["done"] == 2 and added["after"]["counts"]["done"] == 3
    assert runs.run_metrics(panel.last_run)["after.counts.done"] == 3


# ---------------------------------------------------------------------------------------------
# panels that behave; results out of panels
def _training_params():
    return wp.notebook_params("04_training", presets="seed_fix2,recommended", epochs=1, n_train=4, n_val=2, batch_size=4, width=16, N_side=4)


def test_training_preset_resets_every_knob_and_marks_changed_controls():
    """Choosing seed_fix2 after recommended (with a subspace weight typed in) takes seed_fix2's weight, lr and epochs;
    a control changed since carries wb-changed and a ●."""
    p = _training_params()
    panel = ui.TrainingPanel(p)
    panel.controls["subspace"].value = 0.05
    assert panel.changed() == ["subspace"] and panel.controls["subspace"].description.startswith("●")
    panel.controls["preset"].value = "seed_fix2"
    want = p.experiment("seed_fix2")
    assert panel.controls["subspace"].value == want.loss.subspace
    assert panel.controls["lr"].value == pytest.approx(want.train.lr) and panel.controls["epochs"].value == want.train.epochs
    assert panel.config() == want and panel.changed() == [] and not panel.controls["subspace"].description.startswith("●")
    panel.controls["lr"].value = 1e-2
    assert panel.changed() == ["lr"] and "wb-changed" in panel.controls["lr"]._dom_classes
    panel.controls["lr"].value = want.train.lr
    assert panel.changed() == []


def test_training_stop_ends_after_the_current_epoch():
    panel = ui.TrainingPanel(_training_params())
    panel.controls["epochs"].value = 3
    report = panel.report_progress

    def stop_at_first_epoch(fraction, text):
        report(fraction, text)
        if fraction > 0:
            panel.request_stop()  # what the stop button does

    panel.report_progress = stop_at_first_epoch
    assert panel.stop_button.disabled
    panel.button.click()
    assert len(panel.result.history) == 1 and "stopped after epoch 1 of 3" in panel.status.value
    assert panel.stop_button.disabled  # enabled only while training


def test_all_skipped_run_draws_no_step_applied():
    from workbench.figures.training import training_figure

    hist = [{"epoch": 0, "train_loss": float("nan"), "terms": {"nmse": float("nan")}, "val_nmse": 1.0, "grad_norm": {"backbone": float("nan")},
             "param_change": 0.0, "steps": 3, "skipped_nonfinite": 3, "skipped_scaler": 0, "step_loss": [None] * 3}]
    fig = training_figure({"seed_fix2": hist})
    assert any("no step applied" in t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def test_panel_mimebundle_keeps_a_static_view():
    import base64

    p = wp.notebook_params("02_eigen_spectrum", n_scenes=2, width=16, N_side=6)
    spec = pipeline.spectra(p.experiment(), pipeline.scene_batch(p.experiment(), 2, 0))
    panel = ui.SpectrumPanel(p, initial=spec)
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<img src='data:image/png;base64," in bundle["text/html"] and "scene 0" in bundle["text/html"]


def test_panel_saves_its_figure_in_every_format(tmp_path):
    p = wp.notebook_params("02_eigen_spectrum", n_scenes=2, width=16, N_side=6, out_dir=str(tmp_path))
    spec = pipeline.spectra(p.experiment(), pipeline.scene_batch(p.experiment(), 2, 0))
    panel = ui.SpectrumPanel(p, initial=spec)
    magic = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}
    for fmt, head in magic.items():
        path = panel.save_figure(fmt)
        assert path.startswith(str(tmp_path)) and open(path, "rb").read()[:len(head)] == head
    panel.fmt.value = "svg"
    panel.save_button.click()
    assert "saved" in panel.output_line.value and len(list(tmp_path.glob("panel_02_eigen_spectrum_*.svg"))) == 2


def test_panel_command_names_its_view():
    import shlex

    p = wp.notebook_params("04_training", presets="seed_fix2,recommended", epochs=1, n_train=4, n_val=2, batch_size=4, width=16, N_side=4)
    panel = ui.TrainingPanel(p)
    panel.controls["subspace"].value = 0.05
    args = shlex.split(panel.command())
    assert args[:4] == ["workbench", "report", "--only", "04_training"]
    pairs = dict(zip(args[5::3], args[6::3]))
    assert pairs["presets"] == "recommended" and pairs["subspace_weight"] == "0.05" and pairs["n_train"] == "4" and "out_dir" not in pairs
    panel.command_button.click()
    assert panel.output_line.value.startswith("workbench report --only 04_training")


@pytest.mark.slow
def test_panel_command_run_headless_reproduces_the_panel(tmp_path):
    """02's panel after moving C_EPS and the scene: its command, parsed back and run headless, gives the panel's numbers."""
    import json
    import shlex

    from workbench.config import parse_value
    from workbench.report import NOTEBOOK_DIR, run_notebook

    p = wp.notebook_params("02_eigen_spectrum", **wp.SpectrumParams.ci)
    panel = ui.SpectrumPanel(p)
    panel.controls["c_eps"].value = 0.01
    panel.controls["scene"].value = 1
    spec = panel.result
    args = shlex.split(panel.command())
    assert args[:4] == ["workbench", "report", "--only", "02_eigen_spectrum"] and args[4::3] == ["-p"] * len(args[4::3])
    params = {k: parse_value(v) for k, v in zip(args[5::3], args[6::3])}
    run = run_notebook(NOTEBOOK_DIR / "02_eigen_spectrum.py", tmp_path, params)
    assert run.status == "ok", run.error
    m = json.loads((tmp_path / "02_eigen_spectrum" / "metrics.json").read_text())
    assert m["scene"]["index"] == 1
    for name, ev in m["scene"]["eigvals"].items():
        assert ev == pytest.approx(spec.eigvals[name][1].tolist(), rel=1e-5, abs=1e-6), name
    assert m["summary"]["R_blend"]["gap"] == pytest.approx(spec.summary()["R_blend"]["gap"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# interactive runs have an identity: a run folder of their own with a manifest, never a headless report's
def test_training_panel_action_is_a_run_of_its_own(tmp_path):
    from workbench import runs

    p = wp.notebook_params("04_training", presets="recommended", epochs=1, n_train=4, n_val=2, batch_size=4, width=16, N_side=4,
                           out_dir=str(tmp_path / "lab04"))
    panel = ui.TrainingPanel(p)
    panel.button.click()
    first = panel.last_run
    assert first.parent == tmp_path / "lab04" / "panels" and first.name.startswith("train-")
    m = runs.read_run(first)
    assert m["kind"] == "panel" and m["status"] == "ok" and m["seconds"] > 0 and m["stopped"] is False
    assert m["parameters"]["notebook"] == "04_training" and m["parameters"]["action"] == "train"
    assert m["parameters"]["command"] == panel.command() and m["parameters"]["parameters"]["epochs"] == 1
    assert (first / "checkpoint.pt").exists() and str(first) in panel.status.value  # fit's run folder, named in the status
    assert runs.run_metrics(first)["final.val_nmse"] == pytest.approx(panel.result.history[-1]["val_nmse"])
    panel.controls["epochs"].value = 2
    panel.button.click()
    second = panel.last_run
    assert second != first and len(panel.result.history) == 2
    assert [r["path"] for r in runs.list_runs(tmp_path / "lab04")] == [str(first), str(second)]
    rows = {(sec, k): (a, b) for sec, k, a, b in runs.diff_runs(first, second, only_different=True)["rows"]}
    assert rows[("parameters", "parameters.epochs")] == (1, 2) and ("metrics", "final.epoch") in rows


def _fake_report(folder, name):
    """A headless report's folders as `workbench report` writes them before a notebook runs."""
    from workbench import runs

    runs.start_run(folder, "report", folder.name)
    runs.start_run(folder / name, "notebook", name)
    return folder / name


def test_panel_actions_never_write_into_a_headless_report(tmp_path):
    out = _fake_report(tmp_path / "report-x", "04_training")
    p = wp.notebook_params("04_training", presets="recommended", epochs=1, n_train=4, n_val=2, batch_size=4, width=16, N_side=4,
                           out_dir=str(out))
    panel = ui.TrainingPanel(p)
    panel.button.click()
    assert panel.last_run.parent == tmp_path / "root" / "runs" / "panels" / "04_training"
    assert sorted(q.name for q in out.iterdir()) == ["manifest.json"]  # the report's folder is untouched


def test_sweep_panel_refuses_a_headless_reports_study(tmp_path):
    out = _fake_report(tmp_path / "report-y", "06_sweep")
    p = wp.notebook_params("06_sweep", **{**wp.SweepParams.ci, "trials": 2}, out_dir=str(out))
    panel = ui.SweepPanel(p)
    panel.button.click()
    assert "not run" in panel.output_line.value and "headless report" in panel.output_line.value
    assert panel.last_run is None and not (out / "optuna.db").exists() and not (tmp_path / "root" / "runs").exists()
