# Everything installs into a project-local virtual environment the first time a target needs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first: on the project machines this pin resolves to a CPU wheel on local disk in seconds.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install notebooks lab report test test-gpu lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

notebooks: $(STAMP)  ## the .ipynb of every notebook from its percent-format .py source (jupytext keeps the pair in sync)
	$(VENV)/bin/jupytext --sync notebooks/*.py

lab: notebooks  ## JupyterLab on localhost (token auth on), rooted at the checkout and opened on notebooks/; widget state is saved with a notebook (notebooks/lab-settings)
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --no-browser --ServerApp.root_dir=. --ServerApp.default_url=/lab/tree/notebooks \
		--LabApp.app_settings_dir=notebooks/lab-settings \
		$(if $(filter 0,$(shell id -u)),--allow-root,)

report: $(STAMP)  ## every notebook headless into runs/, with an index page
	$(VENV)/bin/workbench report

lint: $(STAMP)
	$(PY) -m ruff check workbench tests benchmarks notebooks

test: $(STAMP)  ## lint, then the whole test suite
	$(PY) -m ruff check workbench tests benchmarks notebooks
	$(PY) -m pytest -q

test-gpu: $(STAMP)  ## the CUDA tests only (CPU/CUDA equality, compare on the device); skipped without a CUDA device
	$(PY) -m pytest -q -m cuda

bench: $(STAMP)
	$(PY) benchmarks/bench_simulate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
