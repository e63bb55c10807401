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
