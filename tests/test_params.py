"""Notebook sources and parameters: every notebook is a percent-format source that jupytext turns into a clean
notebook, has the uniform structure, declares exactly its parameter dataclass's fields, and its config cell gives
the chosen preset plus the explicit overrides; running a notebook in the lab leaves git clean."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import jupytext
import nbformat
import pytest
import torch

from workbench import params as wp
from workbench import report
from workbench.config import ConfigError, preset

NB = report.NOTEBOOK_DIR
SOURCES = sorted(NB.glob("*.py"))
NAMES = [p.stem for p in SOURCES]


def _code(path: Path) -> list:
    return [c for c in jupytext.read(path).cells if c.cell_type == "code"]


def test_every_notebook_has_a_parameter_class():
    assert set(NAMES) == set(wp.NOTEBOOK_PARAMS)
    assert report.list_notebooks() == SOURCES  # the report runs the sources (a generated .ipynb beside one is not counted twice)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_source_makes_a_clean_notebook(path):
    """The percent-format source round-trips through jupytext to a valid notebook without outputs, on the python3 kernel."""
    nb = report.read_notebook(path)
    nbformat.validate(nb)
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code")
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert jupytext.writes(nb, fmt="py:percent") == path.read_text()  # the source is in jupytext's canonical form


def test_running_a_notebook_in_the_lab_leaves_git_clean(tmp_path):
    """With the project's .gitignore and jupytext pairing, saving an executed notebook (outputs and execution counts,
    as JupyterLab does) rewrites its .py identically and leaves the generated .ipynb ignored: git status stays clean."""
    import shutil
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    shutil.copy(NB.parent / ".gitignore", tmp_path / ".gitignore")
    (tmp_path / "notebooks").mkdir()
    shutil.copy(NB / "jupytext.toml", tmp_path / "notebooks" / "jupytext.toml")
    src = tmp_path / "notebooks" / "02_eigen_spectrum.py"
    shutil.copy(NB / "02_eigen_spectrum.py", src)
    git("add", ".")
    git("-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-q", "-m", "sources")
    nb = jupytext.read(src)
    for i, c in enumerate(c for c in nb.cells if c.cell_type == "code"):
        c.execution_count = i + 1
        c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {i}\n")]
    config = jupytext.config.load_jupytext_configuration_file(str(tmp_path / "notebooks" / "jupytext.toml"))
    formats = jupytext.formats.long_form_multiple_formats(",".join(config.formats) if isinstance(config.formats, list) else config.formats)
    assert {f["extension"] for f in formats} == {".ipynb", ".py"}
    for fmt in formats:  # what jupytext's contents manager writes on save: every paired format
        jupytext.write(nb, src.with_suffix(fmt["extension"]), fmt=fmt)
    assert "output 0" in src.with_suffix(".ipynb").read_text()
    assert git("status", "--porcelain") == ""


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_uniform_structure(path):
    """A question, the parameters cell first, one config cell reading it, cells that save metrics, a panel last."""
    cells = jupytext.read(path).cells
    code = [c for c in cells if c.cell_type == "code"]
    assert cells[0].cell_type == "markdown" and "**Question.**" in cells[0].source
    assert code[0].metadata.get("tags") == ["parameters"]
    assert code[1].metadata.get("tags") == ["config"] and f'wp.from_cell("{path.stem}", globals())' in code[1].source
    assert "save_metrics(out, metrics)" in "".join(c.source for c in code)
    assert code[-1].source.startswith("ui.") and "Panel(" in code[-1].source, "ends with a widget panel"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_parameters_cell_matches_the_dataclass(path):
    """Every declared parameter is annotated and commented, and its name, annotation and default are the
    dataclass field's (so the config cell validates exactly what papermill passes)."""
    cls = wp.NOTEBOOK_PARAMS[path.stem]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    source = _code(path)[0].source
    declared = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.AnnAssign), f"{path.name}: every parameter needs a type annotation: {ast.unparse(node)}"
        declared[node.target.id] = (ast.unparse(node.annotation), ast.literal_eval(node.value))
    assert list(declared) == list(fields)
    for line in source.splitlines():
        assert "  # " in line, f"{path.name}: parameter without a comment: {line}"
    for name, (annotation, default) in declared.items():
        assert annotation == fields[name].type, name
        assert default == fields[name].default, name
    assert set(cls.ci) <= set(declared)
    assert report.notebook_parameters(path).keys() == declared.keys()  # the report reads the same


def _run_config_cell(path: Path, tmp_path: Path, **injected) -> dict:
    """Execute the parameters cell, papermill-style injected values, then the config cell; return the namespace."""
    code = _code(path)
    ns: dict = {}
    exec(code[0].source, ns)  # noqa: S102 - our own notebook's cells
    ns.update(injected, out_dir=str(tmp_path / path.stem))
    exec(code[1].source, ns)  # noqa: S102
    return ns


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


KNOBS = ("fixes.", "loss.")  # what presets set; sizes (system, model, train) are each notebook's own


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
@pytest.mark.parametrize("preset_name", ["seed_before", "seed_fix2", "recommended"])
def test_config_cell_gives_the_preset_plus_explicit_overrides(path, preset_name, tmp_path):
    """With only the preset chosen, every fix and loss knob is the preset's (or the notebook's explicit, non-None
    default); a knob passed explicitly wins and changes nothing else."""
    cls = wp.NOTEBOOK_PARAMS[path.stem]
    names = {f.name for f in dataclasses.fields(cls)}
    chooser = {"preset": preset_name} if "preset" in names else {"presets": preset_name} if "presets" in names else {}
    explicit_default = {k for f in dataclasses.fields(cls) if f.default is not None and f.name in wp.CONFIG_KEYS
                        for k in wp.CONFIG_KEYS[f.name] if k.startswith(KNOBS)}
    knob = next((f.name for f in dataclasses.fields(cls) if f.default is None and f.name in ("c_eps", "lr")), None)
    for extra in ({}, {knob: 0.5} if knob else {}):
        ns = _run_config_cell(path, tmp_path, **chooser, **extra)
        configs = ns.get("configs") or {"": ns["params"].experiment()}
        for cfg in configs.values():
            name = preset_name if chooser else "recommended"
            want, have = _flat(preset(name).to_dict()), _flat(cfg.to_dict())
            changed = {k for k in want if want[k] != have[k] and k.startswith(KNOBS)}
            set_here = {k for k in explicit_default} | {k for e in extra for k in wp.CONFIG_KEYS[e]}
            assert changed <= set_here, f"{path.stem} under {name}: {sorted(changed - set_here)} differ from the preset"
            for e, v in extra.items():
                assert all(have[k] == v for k in wp.CONFIG_KEYS[e])


# ---------------------------------------------------------------------------------------------
# validation
@pytest.mark.parametrize(
    "name,values,message",
    [
        ("02_eigen_spectrum", {"c_eps": -1.0}, "02_eigen_spectrum.c_eps: fixes.c_eps = -1.0 is out of range"),
        ("02_eigen_spectrum", {"estimator": "magic"}, "02_eigen_spectrum.estimator: fixes.rsamp_estimator = 'magic' is not allowed"),
        ("02_eigen_spectrum", {"n_scenes": 2, "scene": 5}, "02_eigen_spectrum.scene = 5 must be < n_scenes = 2"),
        ("02_eigen_spectrum", {"c_eps_sweep": "1,x"}, "02_eigen_spectrum.c_eps_sweep = '1,x'"),
        ("02_eigen_spectrum", {"c_eps": "big"}, "02_eigen_spectrum.c_eps = 'big': expected a number"),
        ("02_eigen_spectrum", {"preset": "seed_fix9"}, "02_eigen_spectrum.preset = 'seed_fix9' is not allowed"),
        ("01_covariance_normalisation", {"n_scenes": "many"}, "01_covariance_normalisation.n_scenes = 'many': expected an integer"),
        ("01_covariance_normalisation", {"presets": "seed_before,nope"}, "01_covariance_normalisation.presets"),
        ("01_covariance_normalisation", {"N_side": 2}, "01_covariance_normalisation.N_side = 2 is out of range: allowed [3, 64]"),
        ("03_nan_gradients", {"gap_backend": "qr"}, "03_nan_gradients.gap_backend: fixes.gap_backend = 'qr' is not allowed"),
        ("04_training", {"epochs": 0}, "04_training.epochs = 0 is out of range"),
        ("04_training", {"lr": -1.0}, "04_training.lr: train.lr = -1.0 is out of range"),
        ("04_training", {"bogus": 1}, "unknown key(s) bogus"),
        ("05_localisation", {"snrs_db": "0,x"}, "05_localisation.snrs_db = '0,x'"),
        ("nope", {}, "notebook = 'nope' is not allowed"),
    ],
)
def test_notebook_params_reject_bad_values(name, values, message):
    with pytest.raises(ConfigError) as e:
        wp.notebook_params(name, **values)
    assert message in str(e.value)


def test_every_advertised_size_is_accepted_by_the_config():
    """The smallest RIS side a notebook accepts builds a valid config under every preset (K_max <= N - 1)."""
    for name, cls in wp.NOTEBOOK_PARAMS.items():
        lo = next(f for f in dataclasses.fields(cls) if f.name == "N_side").metadata["range"][0]
        p = wp.notebook_params(name, N_side=lo)
        assert p.experiment().system.N == lo * lo


def test_params_build_the_experiment_config():
    p = wp.notebook_params("03_nan_gradients", c_eps=0.01, subspace_backend="safe", N_side=6, width=16)
    cfg = p.experiment()
    assert (cfg.fixes.c_eps, cfg.fixes.subspace_backend, cfg.system.N, cfg.model.width, cfg.model.layers) == (0.01, "safe", 36, 16, 1)
    assert cfg.fixes.rsamp_normalise == preset("seed_fix2").fixes.rsamp_normalise
    assert cfg.loss.subspace == 0.1  # the notebook's explicit default


def test_from_cell_reads_the_namespace_and_names_what_is_missing():
    ns = {f.name: f.default for f in dataclasses.fields(wp.SpectrumParams)}
    assert wp.from_cell("02_eigen_spectrum", {**ns, "unrelated": 1}) == wp.SpectrumParams()
    del ns["scene"]
    with pytest.raises(ConfigError, match="does not define scene"):
        wp.from_cell("02_eigen_spectrum", ns)


def test_relative_out_dir_lands_under_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as in JupyterLab, whose kernels start in notebooks/
    p = wp.notebook_params("02_eigen_spectrum", out_dir="runs/test_out_dir_probe")
    try:
        assert p.out_path == wp.project_root() / "runs" / "test_out_dir_probe" and p.out_path.is_dir()
        assert not (tmp_path / "runs").exists()
    finally:
        p.out_path.rmdir()
    assert wp.notebook_params("02_eigen_spectrum", out_dir=str(tmp_path / "abs")).out_path == tmp_path / "abs"


# ---------------------------------------------------------------------------------------------
# 06: sweep parameters
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
        wp.notebook_params("06_sweep", **values)
    assert message in str(e.value)


def test_sweep_params_build_space_and_storage(tmp_path):
    p = wp.notebook_params("06_sweep", **wp.SweepParams.ci, out_dir=str(tmp_path / "o"))
    space = p.search_space
    assert set(space.params) == {"fixes.subspace_backend", "loss.subspace", "train.lr"}
    assert (space.base.system.N, space.base.model.width, space.base.train.epochs, space.base.fixes.qr_retraction) == (36, 16, 1, True)
    assert p.storage_url == f"sqlite:///{(tmp_path / 'o' / 'optuna.db').resolve()}"
    from workbench import search_space

    assert set(wp.notebook_params("06_sweep").search_space.params) == set(search_space.DEFAULT_SPACE)


# ---------------------------------------------------------------------------------------------
# data: a dataset folder's scenes and system in every notebook
@pytest.mark.parametrize("name", sorted(wp.NOTEBOOK_PARAMS))
def test_data_gives_the_datasets_system(name, tiny_dataset):
    from workbench.data import dataset_system

    p = wp.notebook_params(name, **{**wp.NOTEBOOK_PARAMS[name].ci, "data": str(tiny_dataset)})
    system = dataset_system(tiny_dataset)
    assert (system.N_H, system.N_V) == (5, 4)
    for preset_name in p.preset_names:  # the dataset's system replaces N_side under every preset the notebook runs
        assert p.experiment(preset_name).system == system
    assert all(p.dotted_overrides()[f"system.{k}"] == v for k, v in system.to_dict().items())
    assert wp.notebook_params(name, **wp.NOTEBOOK_PARAMS[name].ci).experiment().system != system  # without data: the notebook's sizes


@pytest.mark.parametrize("name", sorted(wp.NOTEBOOK_PARAMS))
def test_bad_data_is_refused_naming_data(name, tmp_path):
    (tmp_path / "empty").mkdir()
    for bad, why in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "manifest.json is missing")):
        with pytest.raises(ConfigError, match=rf"{name}\.data = .*{why}"):
            wp.notebook_params(name, data=str(bad))


def test_relative_data_is_under_the_checkout(tiny_dataset, monkeypatch):
    monkeypatch.setenv("WORKBENCH_ROOT", str(tiny_dataset.parent))
    p = wp.notebook_params("02_eigen_spectrum", data="tiny")
    assert p.data_path == tiny_dataset and p.experiment().system.N == 20


def test_data_scenes_are_the_datasets(tiny_dataset):
    """01-03 take the dataset's first n_scenes scenes; more than it holds is refused naming n_scenes."""
    from workbench.data import load_dataset
    from workbench.studies import pipeline

    p = wp.notebook_params("02_eigen_spectrum", n_scenes=6, data=str(tiny_dataset))
    batch = pipeline.scene_batch(p.experiment(), p.n_scenes, p.seed, p.data_path)
    assert torch.equal(batch.y, load_dataset(tiny_dataset).y[:6])
    with pytest.raises(ConfigError, match="n_scenes = 41"):
        pipeline.scene_batch(p.experiment(), 41, p.seed, p.data_path)
