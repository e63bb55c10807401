"""Real browser: JupyterLab on 127.0.0.1 (token auth), Debian's chromium driven headless by Playwright.

Every notebook, with its CI parameters written into its parameters cell, is opened and run; then one control of
its widget panel is changed the way a user would. Asserted for every panel: it shows a busy state while it
computes (the ``wb-busy`` class on the panel), its status changes, and no shown image is empty or broken. The
update time of each panel (control change to new status) is measured in the page and written, with the slowest,
the slowest cheap control and the machine's load, to runs/browser_panel_times.json; every cheap control (all but
04's *train*) must answer within :data:`CHEAP_LIMIT_S` (the quiet-machine target is 1 s; the limit allows for a
loaded 2-core CI machine). Notebook 03's headline is checked by text: switching the subspace backward from
``eigh`` to ``safe`` turns the red "gradient NaN" status into "gradient finite"; its "copy as command" line, run
headless with ``workbench report``, reproduces the panel's status numbers. 04's preset reset is checked in the page:
after another preset is chosen the knob controls hold that preset's values and none is marked changed, and a typed
value is marked. 02 is saved, closed and reopened without running: its panel's static view (the restored widget's
image; JupyterLab saves widget state through notebooks/lab-settings/overrides.json, as ``make lab``) is shown, not
"Error displaying widget". Screenshots go under runs/. Skipped locally when chromium or playwright is missing; in CI
(.ci/setup-browser.sh sets WORKBENCH_REQUIRE_BROWSER=1) a missing browser is a failure."""

from __future__ import annotations

import html
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from workbench import cli, report, ui
from workbench.params import NOTEBOOK_PARAMS

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
EXTRA = {"03_nan_gradients": {"subspace_backend": "eigh", "subspace_weight": 0.1}}
# what each panel's check does, in order: (CSS class of the widget, how, new value); "click" presses a button,
# "fill" types into a number box; the last action starts the update that is timed
ACTIONS = {
    "01_covariance_normalisation": [("wb-estimator", "select", "ls_scatter")],
    "02_eigen_spectrum": [("wb-estimator", "select", "ls_scatter")],
    "03_nan_gradients": [("wb-subspace-backend", "select", "safe")],
    "04_training": [("wb-subspace", "fill", "0.05"), ("wb-preset", "select", "seed_fix2"), ("wb-preset", "check", "seed_fix2"),
                    ("wb-subspace", "fill", "0.1"), ("wb-train", "click", None)],
    "05_localisation": [("wb-source", "select", "R_true")],
    "06_sweep": [("wb-knob", "select", "fixes.subspace_backend")],
}
CHEAP = tuple(n for n in ACTIONS if n != "04_training")  # a select that recomputes or redraws; 04 trains on a button
# quiet machine: within 1 s (README, speed table). Measured here at a load average of 5.3 on 2 cores (other jobs running):
# slowest cheap control 8.5 s (05's covariance source), so the limit is 15 s; it still fails a panel that retrains or
# recomputes everything on a cheap knob. WORKBENCH_CHEAP_LIMIT_S overrides it (e.g. 2 on a quiet machine).
CHEAP_LIMIT_S = float(os.environ.get("WORKBENCH_CHEAP_LIMIT_S", "15"))
SETTINGS = ROOT / "notebooks" / "lab-settings"  # JupyterLab's app settings of `make lab`: widget state saved with the notebook
IMAGES = "() => Array.from(document.querySelectorAll('.wb-panel img')).map(i => i.src).join('|')"
PLOTLY = "() => document.querySelectorAll('.wb-panel .js-plotly-plot .main-svg').length"


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (python package) is not installed"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no chromium at {CHROMIUM} (apt-get install chromium, or source .ci/setup-browser.sh)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_notebook(name: str, dest: Path, runs: Path) -> None:
    """The notebook with its CI parameters (and out_dir under ``runs``) written into its parameters cell."""
    nb = report.read_notebook(name)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    extra = {**NOTEBOOK_PARAMS[name].ci, **EXTRA.get(name, {}), "out_dir": str(runs / name)}
    cell.source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in extra.items())
    nbformat.write(nb, dest)


@pytest.fixture
def lab(tmp_path):
    why = _missing()
    if why:
        if os.environ.get("WORKBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required in CI but: {why}")
        pytest.skip(why)
    work = tmp_path / "lab"
    work.mkdir()
    for name in report.list_notebooks():
        _small_notebook(name.stem, work / f"{name.stem}.ipynb", tmp_path / "runs")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws"),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", f"--LabApp.app_settings_dir={SETTINGS}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, token, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


OBSERVE = """() => { window.__wbBusy = false; window.__wbObs && window.__wbObs.disconnect();
  window.__wbObs = new MutationObserver(() => { if (document.querySelector('.wb-panel.wb-busy')) window.__wbBusy = true; });
  window.__wbObs.observe(document.body, {attributes: true, subtree: true, attributeFilter: ['class']}); }"""
BROKEN_IMAGES = """() => Array.from(document.querySelectorAll('.wb-panel img')).filter(i => i.offsetParent !== null)
  .filter(i => !i.getAttribute('src') || !i.complete || i.naturalWidth === 0).length"""


def _status(page) -> str:
    loc = page.locator(".wb-panel .wb-status")
    return loc.first.inner_text() if loc.count() else ""


def _open(page, url: str, token: str, name: str, workspace: str) -> None:
    """Open notebook ``name`` in a workspace of its own and wait for its kernel to be idle."""
    # a workspace of its own per notebook: the lab restores no other notebook's tab (whose hidden panel would
    # otherwise match the selectors below), and run-all waits until this notebook is the current one
    page.goto(f"{url}/lab/workspaces/{workspace}/tree/{name}.ipynb?token={token}")
    page.wait_for_function(f"""() => {{ const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const k = w && w.context && w.context.path === '{name}.ipynb' && w.sessionContext && w.sessionContext.session
                  && w.sessionContext.session.kernel;
        return !!k && k.status === 'idle'; }}""", timeout=120_000)


def _run_panel(page, url: str, token: str, name: str, shots: Path, seen: dict) -> float:
    """Open and run one notebook, change its panel's control, return the update time in seconds. What later checks
    need (03's command line and status) goes into ``seen``."""
    _open(page, url, token, name, f"wb-{name}")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector(".wb-panel .wb-status", timeout=300_000)
    page.wait_for_function("() => !document.querySelector('.wb-panel.wb-busy')", timeout=300_000)
    before, before_img = _status(page), page.evaluate(IMAGES)
    page.locator(".wb-panel").first.scroll_into_view_if_needed()
    *setup, last = ACTIONS[name]
    for action in setup:
        _act(page, *action)
    page.evaluate(OBSERVE)
    t0 = time.perf_counter()
    _act(page, *last)
    page.wait_for_function("() => window.__wbBusy", timeout=60_000)  # the busy state showed
    page.wait_for_function("() => !document.querySelector('.wb-panel.wb-busy')", timeout=300_000)
    seconds = time.perf_counter() - t0
    seen.setdefault("load", {})[name] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # 1-minute load at the update
    after = _status(page)
    assert after and (after != before or page.evaluate(IMAGES) != before_img), (name, before, after)  # the status or the figure
    assert page.evaluate(BROKEN_IMAGES) == 0, f"{name}: an empty or broken image is shown"
    page.screenshot(path=str(shots / f"browser_{name}.png"), full_page=False)
    if name == "03_nan_gradients":
        assert before.startswith("gradient NaN") and after.startswith("gradient finite"), (before, after)
        page.locator("button.wb-command").click()  # copy as command: the line appears in the panel's text box
        page.wait_for_function("() => (document.querySelector('.wb-out textarea') || {}).value?.startsWith('workbench report')",
                               timeout=30_000)
        seen["command"] = page.locator(".wb-out textarea").input_value().splitlines()[0]
        seen["status"] = page.locator(".wb-grad-line").inner_text()
    if name == "04_training":  # the subspace term under a seed preset: the new run skipped steps
        assert "0 steps skipped" in before and "0 steps skipped" not in after, (before, after)
    if name == "05_localisation":  # the interactive spectrum is drawn by plotly in the panel
        page.wait_for_function(PLOTLY, timeout=60_000)
        assert after.startswith("R_true"), after
    return seconds


def _check_preset(page, name: str) -> None:
    """04 after choosing preset ``name``: the knob controls show that preset's epochs, learning rate and subspace
    weight (as the notebook's config gives them) and no control is marked changed."""
    cfg = NOTEBOOK_PARAMS["04_training"].from_dict(NOTEBOOK_PARAMS["04_training"].ci).experiment(name)
    want = {"epochs": cfg.train.epochs, "lr": cfg.train.lr, "subspace": cfg.loss.subspace}
    js = f"""() => {{
        const num = (sel, attr) => {{ const e = document.querySelector(sel); return e ? parseFloat(attr ? e.value : e.textContent) : NaN; }};
        const got = {{epochs: num('.wb-epochs .widget-readout'), lr: num('.wb-lr .widget-readout'), subspace: num('.wb-subspace input', true)}};
        window.__wbPreset = {{got, changed: document.querySelectorAll('.wb-panel .wb-changed').length,
                              marks: Array.from(document.querySelectorAll('.wb-panel label')).filter(l => l.textContent.includes('●')).length}};
        return got.epochs === {want["epochs"]} && Math.abs(got.lr / {want["lr"]} - 1) < 0.05 && got.subspace === {want["subspace"]}
               && window.__wbPreset.changed === 0 && window.__wbPreset.marks === 0; }}"""
    try:
        page.wait_for_function(js, timeout=30_000)
    except Exception:  # playwright's TimeoutError: say what the page showed
        raise AssertionError(f"04 after choosing {name}: want {want} and no wb-changed mark, the page shows "
                             f"{page.evaluate('() => window.__wbPreset')}") from None


def _act(page, cls: str, how: str, value) -> None:
    if how == "check":
        _check_preset(page, value)
    elif how == "select":
        page.locator(f".{cls} select").select_option(value)
    elif how == "fill":
        # A preset chosen just before resets this control from the kernel; if that reset arrives after the fill it
        # overwrites the typed value. The kernel marks a value it took that differs from the preset (wb-changed): wait
        # for the mark with the value still in the box, and type again if the reset won the race.
        box = page.locator(f".{cls} input")
        for _ in range(5):
            box.fill(value)
            box.press("Enter")
            try:
                page.wait_for_selector(f".{cls}.wb-changed", timeout=5_000)
            except Exception:  # playwright's TimeoutError
                continue
            page.wait_for_timeout(500)
            if box.input_value() == value and page.locator(f".{cls}.wb-changed").count():
                return
        raise AssertionError(f"{cls}: the kernel did not take the value {value!r}")
    else:
        page.locator(f"button.{cls}").click()


STATIC_VIEW = """() => { const out = Array.from(document.querySelectorAll('.jp-OutputArea-output'));
  const img = out.some(o => o.querySelector('.wb-panel img[src]') || o.querySelector('.wb-static'));
  return img ? 'shown' : (document.body.innerText.includes('Error displaying widget') ? 'error' : ''); }"""


def _reopen(page, url: str, token: str, name: str, shots: Path) -> None:
    """``name`` was run and saved: open it again (a new kernel, nothing run) and check that its panel's static view
    (an image where the panel was) is shown, not "Error displaying widget"."""
    _open(page, url, token, name, f"wb-{name}-reopened")
    page.wait_for_function(STATIC_VIEW, timeout=60_000)
    page.locator(".jp-OutputArea-output .wb-panel img[src], .jp-OutputArea-output .wb-static").first.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / f"browser_{name}_reopened.png"), full_page=False)
    assert page.evaluate(STATIC_VIEW) == "shown" and "Error displaying widget" not in page.inner_text("body")
    assert page.evaluate(BROKEN_IMAGES) == 0


def _save(page) -> None:
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => { const w = window.jupyterapp.shell.currentWidget; return w && w.context && !w.context.model.dirty; }",
                           timeout=30_000)


def test_every_panel_in_a_real_browser(lab):
    from playwright.sync_api import sync_playwright

    url, token, tmp = lab
    shots = ROOT / "runs"
    shots.mkdir(exist_ok=True)
    times, seen = {}, {}
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
                                                    viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        try:
            for name in ACTIONS:
                times[name] = _run_panel(page, url, token, name, shots, seen)
                if name == "02_eigen_spectrum":
                    _save(page)
                page.evaluate("() => window.jupyterapp.commands.execute('kernelmenu:shutdown')")
            _reopen(page, url, token, "02_eigen_spectrum", shots)
            page.evaluate("() => window.jupyterapp.commands.execute('kernelmenu:shutdown')")
        except Exception:
            page.screenshot(path=str(shots / "browser_failure.png"))
            raise
        finally:
            ctx.close()
    slowest = max(times, key=times.get)
    cheap = {n: times[n] for n in CHEAP}
    slowest_cheap = max(cheap, key=cheap.get)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    (shots / "browser_panel_times.json").write_text(json.dumps(
        {"seconds": times, "slowest": slowest, "slowest_cheap": slowest_cheap, "cheap_limit_s": CHEAP_LIMIT_S, "quiet_target_s": 1.0,
         "load_1min_at_each_update": seen["load"], "load_average_1_5_15_min_at_end": load, "cpus": os.cpu_count()}, indent=2) + "\n")
    assert set(times) == set(NOTEBOOK_PARAMS)
    assert cheap[slowest_cheap] <= CHEAP_LIMIT_S, (f"{slowest_cheap}: a cheap control took {cheap[slowest_cheap]:.2f} s "
                                                   f"(limit {CHEAP_LIMIT_S} s, load {load}); all: {times}")
    # 03's "copy as command", run headless: the report reproduces the panel's status, number for number
    args = shlex.split(seen["command"])
    assert args[:4] == ["workbench", "report", "--only", "03_nan_gradients"], seen["command"]
    assert cli.main([*args[1:], "--out", str(tmp / "cmd"), "--run", "r", "--no-progress"]) == 0
    m = json.loads((tmp / "cmd" / "r" / "03_nan_gradients" / "metrics.json").read_text())
    assert m["params"]["subspace_backend"] == "safe" and m["report"]["ok"]
    assert html.unescape(ui.GradientPanel.status_text(m["report"])) == seen["status"], (seen["status"], m["report"]["grad_norm"])
