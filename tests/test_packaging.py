"""environment.yml agrees with pyproject.toml; the console command and CI entry point work."""

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from workbench.cli import main

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONDA_TO_PIP = {"pytorch": "torch"}


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def conda():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    specs, pip = {}, []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", dep.strip())
        specs[CONDA_TO_PIP.get(m.group(1), m.group(1))] = SpecifierSet(m.group(2).replace(" ", ""))
    return env, specs, pip


def _pip_specs(pyproject):
    return {Requirement(r).name: Requirement(r).specifier for r in pyproject["dependencies"]}


def test_conda_forge_only(conda):
    env, _, _ = conda
    assert env["channels"] == ["conda-forge"]


def test_same_dependency_names(conda, pyproject):
    _, specs, _ = conda
    assert set(specs) - {"python", "pip"} == set(_pip_specs(pyproject))


def test_version_ranges_are_compatible(conda, pyproject):
    _, specs, _ = conda
    pip_specs = _pip_specs(pyproject)
    probes = ["0.1", "1.0", "1.24.0", "2.2.0", "2.3.0", "2.13.0", "2.14.9", "2.15.0", "3.0", "5.18", "10.0"]
    for name, spec in pip_specs.items():
        for v in probes:  # the same versions are admitted on both sides
            assert (v in spec) == (v in specs[name]), (name, v, str(spec), str(specs[name]))
    assert "2.13.0" in specs["torch"] and "2.13.0" in pip_specs["torch"]
    assert SpecifierSet(pyproject["requires-python"]) == specs["python"]


def test_pip_section_installs_this_package(conda):
    _, _, pip = conda
    assert any(re.fullmatch(r"(-e\s+)?\.(\[[\w,]+\])?", p.strip()) for p in pip), pip


def test_console_command_help(capsys, pyproject):
    assert pyproject["scripts"]["workbench"] == "workbench.cli:main"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: workbench" in out and "data" in out
    with pytest.raises(SystemExit) as e:
        main(["data", "generate", "--help"])
    assert e.value.code == 0 and "--force" in capsys.readouterr().out


def test_ci_runs_make_test():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in [ln for ln in lines if not ln.startswith("#")]
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert target and "pytest" in target.group(1)


def test_install_ships_every_subpackage():
    """A non-editable install (`pip install .`) must carry workbench.studies and workbench.figures too."""
    from setuptools import find_packages

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = tool.get("packages", {})
    assert isinstance(find, dict) and "find" in find, "list the packages with [tool.setuptools.packages.find], not by hand"
    shipped = set(find_packages(where=str(ROOT), include=find["find"]["include"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "workbench").rglob("__init__.py")}
    assert on_disk <= shipped, sorted(on_disk - shipped)
    assert {"workbench.studies", "workbench.figures"} <= on_disk
