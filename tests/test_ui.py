"""Widget panels driven without a kernel, notebook parameter validation, the committed notebooks' shape,
and the report's pure helpers."""

from __future__ import annotations

import json

import nbformat
import pytest
import torch

from workbench import plots, report, ui
from workbench.config import ConfigError, preset

NOTEBOOKS = report.list_notebooks()


# ---------------------------------------------------------------------------------------------
# notebooks as committed
def test_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= set(ui.NOTEBOOK_PARAMS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_clean_with_parameters_then_config(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert c.outputs == [] and c.execution_count is None, f"{path.name}: committed with outputs"
    assert nb.cells[0].cell_type == "markdown" and "question" in nb.cells[0].source.lower()
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and code[0] is tagged[0], "the first code cell must be the one tagged `parameters`"
    assert "config" in code[1].metadata.get("tags", []) and "notebook_params" in code[1].source
    assert "plots.save_metrics(out_dir" in "".join(c.source for c in code)
    assert any("ui." in c.source and "Panel(" in c.source for c in code), "ends with a widget panel"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in ui.NOTEBOOK_PARAMS], ids=lambda p: p.stem)
def test_notebook_parameters_match_their_dataclass(path):
    """Every declared parameter is typed and commented, and names, types and defaults equal the validating
    dataclass's (so the config cell validates exactly what papermill passes)."""
    declared = report.notebook_parameters(path)
    cls = ui.NOTEBOOK_PARAMS[path.stem]
    default = cls()
    assert set(declared) == set(default.to_dict())
    for name, d in declared.items():
        value = getattr(default, name)
        assert d["type"] == type(value).__name__, name
        assert d["help"], f"{name} has no comment"
        assert eval(d["default"]) == value, name  # noqa: S307 - our own notebook's literal
    assert set(cls.ci) <= set(declared)


# ---------------------------------------------------------------------------------------------
# parameter validation
@pytest.mark.parametrize(
    "name,values,message",
    [
        ("02_eigen_spectrum", {"c_eps": -1.0}, "02_eigen_spectrum.c_eps = -1.0 is out of range"),
        ("02_eigen_spectrum", {"estimator": "magic"}, "02_eigen_spectrum.estimator = 'magic' is not allowed"),
        ("02_eigen_spectrum", {"n_scenes": 2, "scene": 5}, "02_eigen_spectrum.scene = 5 must be < n_scenes = 2"),
        ("02_eigen_spectrum", {"c_eps_sweep": "1,x"}, "02_eigen_spectrum.c_eps_sweep = '1,x'"),
        ("01_covariance_normalisation", {"n_scenes": "many"}, "01_covariance_normalisation.n_scenes = 'many': expected an integer"),
        ("01_covariance_normalisation", {"presets": "seed_before,nope"}, "01_covariance_normalisation.presets"),
        ("03_nan_gradients", {"gap_backend": "qr"}, "03_nan_gradients.gap_backend = 'qr' is not allowed"),
        ("04_training", {"epochs": 0}, "04_training.epochs = 0 is out of range"),
        ("04_training", {"bogus": 1}, "unknown key(s) bogus"),
        ("nope", {}, "notebook = 'nope' is not known"),
    ],
)
def test_notebook_params_reject_bad_values(name, values, message):
    with pytest.raises(ConfigError) as e:
        ui.notebook_params(name, **values)
    assert message in str(e.value)


def test_params_build_the_experiment_config():
    p = ui.notebook_params("03_nan_gradients", c_eps=0.01, subspace_backend="safe", N_side=6, width=16)
    cfg = p.experiment()
    assert (cfg.fixes.c_eps, cfg.fixes.subspace_backend, cfg.system.N, cfg.model.width) == (0.01, "safe", 36, 16)
    assert cfg.fixes.rsamp_normalise == preset("seed_fix2").fixes.rsamp_normalise


# ---------------------------------------------------------------------------------------------
# panels without a kernel: set a control, the bound function re-runs, the result changes
def test_normalisation_panel_toggles_fix1():
    panel = ui.NormalisationPanel(ui.notebook_params("01_covariance_normalisation", n_scenes=3, width=16, N_side=6, presets="seed_fix2"))
    before = panel.update()
    assert before["R_samp"]["trace"] == pytest.approx(36, rel=1e-4)  # Fix 1 on
    panel.controls["rsamp_normalise"].value = False
    after = panel.result
    assert after["R_samp"]["fro"] == pytest.approx(after["R_samp_raw"]["fro"]) and after["R_samp"]["fro"] < 1e-2 * before["R_samp"]["fro"]
    # the same function the headless cell calls, on the same scenes, gives the same numbers
    assert after == plots.pipeline_summary(panel.config(), panel.batch, seed=panel.params.seed)
    assert "R_blend" in panel.status.value
    panel.controls["rsamp_normalise"].value = True
    panel.controls["preset"].value = "seed_before"  # loads the preset's toggles, one recomputation
    assert panel.controls["rsamp_normalise"].value is False and panel.controls["rblend_trace_normalise"].value is True
    assert panel.result["R_blend"]["trace"] == pytest.approx(36 * (1 + panel.controls["c_eps"].value), rel=1e-4)


def test_spectrum_panel_c_eps_moves_the_floor_not_the_gap():
    panel = ui.SpectrumPanel(ui.notebook_params("02_eigen_spectrum", n_scenes=2, width=16, N_side=6))
    a = panel.update()
    png_a = panel.image.value
    assert png_a[:8] == b"\x89PNG\r\n\x1a\n"
    panel.controls["c_eps"].value = 0.01
    b = panel.result
    assert b is not a and panel.image.value != png_a  # the figure was redrawn from the new result
    lo_a, lo_b = a.eigvals["R_blend"][:, -1], b.eigvals["R_blend"][:, -1]
    assert torch.allclose(lo_a - lo_b, torch.full_like(lo_a, 1.0 - 0.01), atol=1e-4)
    assert torch.allclose(a.gap["R_blend"], b.gap["R_blend"], rtol=1e-4, atol=1e-4)
    panel.controls["scene"].value = 1
    assert "R_true: rank" in panel.status.value


def test_gradient_panel_backend_switch_changes_status():
    panel = ui.GradientPanel(ui.notebook_params("03_nan_gradients", n_scenes=2, width=16, N_side=6, subspace_backend="eigh"))
    bad = panel.update()
    assert not bad["ok"] and "gradient NaN" in panel.status.value
    assert any(p["term"] == "subspace" for p in bad["provenance"])
    panel.controls["subspace_backend"].value = "safe"
    good = panel.result
    assert good["ok"] and "gradient finite" in panel.status.value
    assert good["terms"]["subspace"] == pytest.approx(bad["terms"]["subspace"], rel=1e-5)  # same value, different backward


def test_training_panel_button_runs_verify():
    panel = ui.TrainingPanel(ui.notebook_params("04_training", presets="recommended", epochs=1, n_train=4, n_val=2, batch_size=4, width=16,
                                                N_side=4))
    assert panel.result is None
    panel.controls["epochs"].value = 2  # no auto-update: training waits for the button
    assert panel.result is None
    panel.button.click()
    assert len(panel.result["history"]) == 2 and len(panel.result["checks"]) == 4
    assert "final train loss" in panel.status.value


def test_localisation_panel_method_switch():
    panel = ui.LocalisationPanel(ui.notebook_params("05_localisation", n_per_snr=1, N_side=4, snrs_db="20", estimators="seed"))
    a = panel.update()
    assert a["method"] == "music" and a["snr_db"] == [20.0] and "sqrt(CRB)" in panel.status.value
    panel.controls["method"].value = "mvdr"
    assert panel.result["method"] == "mvdr" and panel.result is not a
    panel.controls["snr_db"].value = 0.0
    assert panel.result["snr_db"] == [0.0]


def test_panel_shows_invalid_combination():
    panel = ui.GradientPanel(ui.notebook_params("03_nan_gradients", n_scenes=1, width=16, N_side=4, subspace_weight=0.0))
    panel.update()
    panel.controls["lam_gap"].value = -1.0
    assert "invalid" in panel.status.value and "lam_gap" in panel.error


# ---------------------------------------------------------------------------------------------
# report helpers
def test_select_and_parse_value():
    assert [p.stem for p in report.select(NOTEBOOKS, ["03"])] == ["03_nan_gradients"]
    with pytest.raises(ConfigError, match="no such notebook"):
        report.select(NOTEBOOKS, ["99"])
    assert report.parse_value("1e-3") == 1e-3 and report.parse_value("true") is True and report.parse_value("eigh") == "eigh"


def test_unknown_parameter_fails_before_running(tmp_path):
    with pytest.raises(ConfigError, match="not a parameter"):
        report.run_report(NOTEBOOKS[:1], tmp_path, {"no_such_param": 1}, progress=False)
    assert not any(tmp_path.iterdir())


def test_write_index_links_everything(tmp_path):
    run = report.NotebookRun(name="x", status="failed", out_dir=str(tmp_path / "x"), notebook="x.ipynb", parameters={"a": 1}, seconds=3.0,
                             cell_seconds=[0.5, 1.0], error="ConfigError: bad", cell=3, cell_source="[config] p = 1",
                             figures=["f.png"], pages=["s.html"], metrics="metrics.json")
    page = report.write_index([run], tmp_path).read_text()
    for needle in ("x/x.ipynb", "x/f.png", "x/s.html", "x/metrics.json", "failed in cell 3", "ConfigError: bad"):
        assert needle in page
    data = json.loads((tmp_path / "index.json").read_text())
    assert data[0]["kernel_seconds"] == pytest.approx(1.5)


# ---------------------------------------------------------------------------------------------
# 06: sweep parameters, the study views on a hand-made study, and the panel
@pytest.mark.parametrize(
    "values,message",
    [
        ({"storage": "redis://localhost/0"}, "06_sweep.storage = 'redis://localhost/0'"),
        ({"space": '{"fixes.nope": [1, 2]}'}, "06_sweep.space: search space: unknown knob(s) 'fixes.nope'"),
        ({"space": "{not json"}, "06_sweep.space = '{not json': not valid JSON"),
        ({"space": "no/such/space.json"}, "06_sweep.space = 'no/such/space.json': neither a JSON object nor an existing space file"),
        ({"space": '{"params": {}}'}, "06_sweep.space: search space is empty"),
        ({"enqueue": '{"fixes.c_eps": 0.1}'}, "06_sweep.enqueue"),
        ({"enqueue": '[{"fixes.c_eps": 5.0}]'}, "06_sweep.enqueue: fixes.c_eps = 5.0 is outside the search space"),
        ({"enqueue": '[{"system.M": 8}]'}, "06_sweep.enqueue: knob 'system.M' is not searched"),
        ({"trials": 0}, "06_sweep.trials = 0 is out of range"),
        ({"pruner": "hyperband"}, "06_sweep.pruner = 'hyperband' is not allowed"),
        ({"study": ""}, "06_sweep.study = ''"),
    ],
)
def test_sweep_params_reject_bad_values(values, message):
    with pytest.raises(ConfigError) as e:
        ui.notebook_params("06_sweep", **values)
    assert message in str(e.value)


def test_sweep_params_build_space_and_storage(tmp_path):
    p = ui.notebook_params("06_sweep", **ui.SweepParams.ci, out_dir=str(tmp_path / "o"))
    space = p.search_space
    assert set(space.params) == {"fixes.subspace_backend", "loss.subspace", "train.lr"}
    assert (space.base.system.N, space.base.model.width, space.base.train.epochs, space.base.fixes.qr_retraction) == (36, 16, 1, True)
    assert p.storage_url == f"sqlite:///{(tmp_path / 'o' / 'optuna.db').resolve()}"
    from workbench import sweep

    assert set(ui.notebook_params("06_sweep").search_space.params) == set(sweep.DEFAULT_SPACE)


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
    imp, note = plots.sweep_importances(s)
    assert imp is None and "at least 2 completed trials" in note and "has 1" in note
    s = _hand_study([("PRUNED", None, eigh, "nonfinite"), ("COMPLETE", 0.5, safe, None), ("COMPLETE", 0.4, safe, None),
                     ("PRUNED", 0.9, {**safe, "train.lr": 5e-3}, "pruner")])
    imp, note = plots.sweep_importances(s)
    assert imp is None and "no knob varies" in note  # both completed trials have the same params
    s.add_trial(_hand_study([("COMPLETE", 0.3, {**safe, "train.lr": 2e-4}, None)]).trials[0])
    imp, note = plots.sweep_importances(s)
    assert set(imp) == {"train.lr"} == set(plots.varying_params(s)) and sum(imp.values()) == pytest.approx(1.0)
    m = plots.sweep_metrics(s)
    assert m["states"]["COMPLETE"] == 3 and m["states"]["PRUNED"] == 2 and m["best"]["value"] == 0.3 and m["best"]["number"] == 4
    assert [r["number"] for r in m["nonfinite"]] == [0] and m["nonfinite"][0]["ops"] == ["subspace:LinalgEighBackward0"]
    rows = plots.parallel_rows(s)
    assert [(r["outcome"], r["value"]) for r in rows] == [("nonfinite", None), ("complete", 0.5), ("complete", 0.4), ("pruned", 0.9),
                                                          ("complete", 0.3)]
    fig = plots.parallel_plotly(rows)
    dims = {d.label: d for d in fig.data[0].dimensions}
    assert list(dims) == ["fixes.subspace_backend", "train.lr", "val_nmse", "outcome"]
    assert dims["val_nmse"].values[0] > 0.9 and dims["val_nmse"].ticktext[-1] == "none"  # no value: above the largest
    assert [dims["outcome"].ticktext[int(v)] for v in dims["outcome"].values] == [r["outcome"] for r in rows]
    for f in (plots.parallel_figure(rows), plots.outcomes_figure(m["outcome_fractions"], "fixes.subspace_backend"), plots.history_figure(s),
              plots.importances_figure(s, list(imp))):
        assert ui._png(f)[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_panel_knob_and_more_trials(tmp_path):
    p = ui.notebook_params("06_sweep", **{**ui.SweepParams.ci, "trials": 2}, out_dir=str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 6x6 RIS and width 16: more threads only add contention
    try:
        _sweep_panel_checks(p)
    finally:
        torch.set_num_threads(threads)


def _sweep_panel_checks(p):
    from workbench import sweep

    p.run(verbose=False)
    panel = ui.SweepPanel(p)
    res = panel.update()
    assert res["summary"]["counts"]["done"] == 2 and "2 finished" in panel.status.value and "1 non-finite" in panel.status.value
    panel.controls["knob"].value = "fixes.subspace_backend"  # the same function as the headless cell, filtered to one knob
    assert panel.result["rows"] == [r for r in sweep.outcome_fractions(panel.study()) if r["param"] == "fixes.subspace_backend"]
    assert panel.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    panel.controls["more"].value = 1
    assert panel.result["summary"]["counts"]["done"] == 2  # the count alone runs nothing
    panel.button.click()
    assert panel.result["summary"]["counts"]["done"] == 3 and panel.controls["knob"].value == "fixes.subspace_backend"
    assert sum(panel.result["states"].values()) == 3
