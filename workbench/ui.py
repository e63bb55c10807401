"""Widget panels: the notebooks' interactive views, bound to the same functions the headless cells call.

Owns: ipywidgets controls, their layout, the busy state, what a panel caches between updates, and where a panel
action's run folder goes (:meth:`Panel.action_run`). Must not: validate parameters (:mod:`workbench.params`), measure
(:mod:`workbench.studies`), draw (:mod:`workbench.figures`) or write manifests itself (:mod:`workbench.runs` does).

Interactive runs have an identity: an action that computes a result (04's *train*, 06's *run more trials*) writes
into a run folder of its own, ``<out_dir>/panels/<action>-<UTC time>/``, with a ``manifest.json`` (kind "panel": the
notebook, the action, the notebook parameters that reproduce it and the ``workbench report`` command), so
``workbench runs`` lists it and ``workbench runs diff`` compares it. It never writes into a headless report's folders:
when ``out_dir`` is one (:func:`workbench.runs.report_of`), the run folder goes under ``runs/panels/<notebook>/``, and
06 refuses to add trials to the report's Optuna study.

A panel is built from a notebook's validated parameters and, where the headless cell already computed it,
that cell's result: displaying a panel never recomputes. Its controls start from the config the headless run
used (the preset plus the notebook's explicit overrides); choosing another preset resets them to that
preset's values. While a panel computes, its controls are disabled, its status says "computing..." and its
root carries the CSS class ``wb-busy``; long computations show a progress bar. What does not depend on a cheap
knob (the scenes, each estimator's raw R_samp, the untrained network) is cached on the panel, so a cheap
knob answers within a second. Panels work without a kernel: tests set ``control.value`` and read
``panel.result`` / ``panel.status.value`` / ``panel.image.value``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import json
import shlex
import time
from typing import Any

import ipywidgets as widgets

from . import figures
from .config import PRESETS, ConfigError, ExperimentConfig
from .figures import fmt
from .params import GradientParams, LocalisationParams, NormalisationParams, SpectrumParams, SweepParams, TrainingParams

PANEL_DPI = 144  # figures in panels: sharp on high-density screens, scaled to the panel's width


def _html(v: Any, digits: int = 3, *, show_nonfinite: bool = False) -> str:
    """:func:`workbench.figures.fmt` (the package's one number formatter) with HTML escaping, for status lines and
    tables; ``show_nonfinite=True`` for a measured norm, loss or gradient (NaN / inf written as such)."""
    return html.escape(fmt(v, digits, show_nonfinite=show_nonfinite))


def plotly_bundle(fig) -> dict:
    """A plotly figure as a mimetype bundle: JupyterLab's plotly extension renders it; the text fallback keeps
    headless runs quiet."""
    return {"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/plain": f"<plotly figure: {fig.layout.title.text}>"}


def show(fig) -> None:
    """Display a plotly figure (:func:`plotly_bundle`). plotly's own ``show`` may pick the "browser" renderer
    in a kernel and block."""
    from IPython.display import display

    display(plotly_bundle(fig), raw=True)


def _dropdown(options, value, description):
    return widgets.Dropdown(options=list(options), value=value, description=description, style={"description_width": "initial"},
                            layout=widgets.Layout(width="auto"))


def _log_slider(value, description, lo=-6, hi=2):
    return widgets.FloatLogSlider(value=max(value, 10.0**lo), base=10, min=lo, max=hi, step=0.25, description=description,
                                  continuous_update=False, readout_format=".2g", style={"description_width": "initial"},
                                  layout=widgets.Layout(width="320px"))


def _checkbox(value, description):
    return widgets.Checkbox(value=value, description=description, indent=False, layout=widgets.Layout(width="auto"))


def _float_text(value, description):
    return widgets.FloatText(value=value, description=description, style={"description_width": "initial"}, layout=widgets.Layout(width="200px"))


# ---------------------------------------------------------------------------------------------
class Panel:
    """Controls + a status line + an optional progress bar + a figure.

    Subclasses define ``compute()`` (calls workbench functions, returns the result), ``describe(result)``
    (HTML for the status line) and optionally ``figure(result)`` (a matplotlib figure, shown as a PNG).
    ``update()`` runs them with the busy state on; every control's ``value`` change calls it (sliders on
    release), unless the panel is built with ``auto=False`` (then a button runs it). ``knobs`` maps control
    names to dotted config keys: with a ``preset`` control, choosing a preset resets them to its values, and a control
    the user changed since carries the CSS class ``wb-changed`` and a "●" before its description.

    Results out: ``notebook`` names the panel's notebook and ``param_of`` maps controls to that notebook's parameters
    (:mod:`workbench.params`; a control absent from it is named a notebook field of the same name, or has none):
    :meth:`command` is the ``workbench report`` line that reproduces the view, :meth:`save_figure` writes the figure
    as PNG, SVG or PDF into the notebook's ``out_dir``. A long action checks :attr:`stop_requested` (the *stop*
    button sets it) between epochs or trials. Displayed, a panel carries a static PNG and HTML of its last view
    besides the widget, for frontends that render those when the widget's model is absent (nbconvert's HTML, notebook
    viewers). JupyterLab renders only the widget mimetype ("Error displaying widget" when its model is missing), so
    ``make lab`` saves widget state with the notebook (notebooks/lab-settings) and a reopened notebook restores the
    panel's last view (tests/test_browser.py)."""

    knobs: dict[str, str] = {}
    notebook: str = ""
    param_of: dict[str, str | None] = {}
    long_action = False  # a stop button for training / trials

    def __init__(self, controls: dict[str, widgets.Widget], initial: Any = None, auto: bool = True, buttons: tuple = ()):
        self.controls = controls
        for name, w in controls.items():
            w.add_class(f"wb-{name.replace('_', '-')}")  # a stable handle for the browser test and user CSS
        self.status = widgets.HTML(value="").add_class("wb-status")
        self.progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, layout=widgets.Layout(display="none", width="320px"))
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%", display="none"))
        self.result: Any = None
        self.last_run = None  # the run folder of the last action (action_run)
        self.error: str | None = None
        self.seconds: float | None = None
        self.stop_requested = False
        self._hold = False
        self._descriptions = {k: getattr(w, "description", "") for k, w in controls.items()}
        self._baseline = self.values()
        for name, w in controls.items():
            if name == "preset" and self.knobs:
                w.observe(self._load_preset, names="value")
            elif auto and hasattr(w, "value"):
                w.observe(self.update, names="value")
            if name != "preset" and hasattr(w, "value"):
                w.observe(self._mark_changed, names="value")
        self.fmt = widgets.Dropdown(options=list(figures.FORMATS), value="png", layout=widgets.Layout(width="80px")).add_class("wb-save-format")
        self.save_button = widgets.Button(description="save figure", icon="download").add_class("wb-save")
        self.save_button.on_click(lambda _: self._save_clicked())
        self.command_button = widgets.Button(description="copy as command", icon="terminal").add_class("wb-command")
        self.command_button.on_click(lambda _: self._command_clicked())
        self.stop_button = widgets.Button(description="stop", icon="stop", button_style="danger", disabled=True).add_class("wb-stop")
        self.stop_button.on_click(lambda _: self.request_stop())
        self.output_line = widgets.Textarea(value="", layout=widgets.Layout(width="100%", height="3.2em", display="none")).add_class("wb-out")
        actions = [self.fmt, self.save_button, self.command_button, *([self.stop_button] if self.long_action else [])]
        row = widgets.HBox([*controls.values(), *buttons], layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        extra = widgets.HBox(actions, layout=widgets.Layout(flex_flow="row wrap", align_items="center")).add_class("wb-actions")
        self.widget = widgets.VBox([row, extra, self.output_line, widgets.HBox([self.status, self.progress]), self.image]).add_class("wb-panel")
        if initial is not None:
            self.show_result(initial)

    # -- what a subclass provides -------------------------------------------------------------
    def compute(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def figure(self, result: Any):
        """A matplotlib figure of ``result``, or None."""
        return None

    def describe(self, result: Any) -> str:
        return ""

    # -- machinery ----------------------------------------------------------------------------
    def values(self) -> dict[str, Any]:
        return {k: w.value for k, w in self.controls.items() if hasattr(w, "value")}

    def knob_values(self) -> dict[str, Any]:
        """{dotted config key: control value} for the panel's knobs."""
        return {key: self.controls[name].value for name, key in self.knobs.items()}

    def _load_preset(self, change) -> None:
        """Reset every knob control to the chosen preset's values (one recomputation, not one per control); the
        "changed" marks are cleared: the preset is the new baseline."""
        cfg = self.base_config(change["new"])
        self._hold = True
        try:
            for name, key in self.knobs.items():
                section, field = key.split(".")
                self.controls[name].value = getattr(getattr(cfg, section), field)
        finally:
            self._hold = False
        self._baseline = self.values()
        for name in self.controls:
            self._mark(name, False)
        if not getattr(self, "manual", False):
            self.update()

    def _mark_changed(self, change) -> None:
        name = next((k for k, w in self.controls.items() if w is change["owner"]), None)
        if name is not None and not self._hold:
            self._mark(name, change["new"] != self._baseline.get(name))

    def _mark(self, name: str, on: bool) -> None:
        """Show whether control ``name`` differs from the preset's (or the starting) value: class ``wb-changed`` and a ●."""
        w = self.controls[name]
        if on:
            w.add_class("wb-changed")
        else:
            w.remove_class("wb-changed")
        if self._descriptions.get(name):
            w.description = ("● " if on else "") + self._descriptions[name]

    def changed(self) -> list[str]:
        """The controls the user changed since the preset (or the start)."""
        return [k for k, w in self.controls.items() if "wb-changed" in w._dom_classes]

    # -- results out ---------------------------------------------------------------------------
    def notebook_parameters(self) -> dict[str, Any]:
        """The parameters of :attr:`notebook` that reproduce this view: the panel's parameters that differ from the
        notebook's defaults (sizes, seed; not ``out_dir``), then each mapped control's value."""
        out = {}
        for f in dataclasses.fields(self.params):
            default = f.default if f.default is not dataclasses.MISSING else None
            v = getattr(self.params, f.name)
            if f.name != "out_dir" and v != default:
                out[f.name] = v
        fields = {f.name for f in dataclasses.fields(self.params)}
        for name, w in self.controls.items():
            target = self.param_of.get(name, name if name in fields else None)
            if target is not None and hasattr(w, "value"):
                out[target] = w.value
        return out

    def unmapped_controls(self) -> list[str]:
        fields = {f.name for f in dataclasses.fields(self.params)}
        return [n for n in self.controls if self.param_of.get(n, n if n in fields else None) is None]

    def command(self) -> str:
        """The ``workbench report --only NAME -p key value ...`` line that reproduces this view (values as JSON where
        JSON, strings as themselves: how ``-p`` reads them)."""
        def text(v):
            return v if isinstance(v, str) else json.dumps(v)

        parts = ["workbench", "report", "--only", self.notebook]
        for k, v in self.notebook_parameters().items():
            if v is not None:
                parts += ["-p", k, text(v)]
        return shlex.join(parts)

    def figure_now(self):
        """A fresh figure of the current result (matplotlib), or None."""
        return None if self.result is None else self.figure(self.result)

    def save_figure(self, fmt: str = "png", folder=None) -> str:
        """Write the current view's figure as ``fmt`` (png, svg, pdf) into ``folder`` (default: the notebook's out_dir)
        as ``panel_<notebook>_<n>.<fmt>``; returns the path."""
        from pathlib import Path

        from .config import check_choice

        check_choice("figure format", fmt, figures.FORMATS)
        fig = self.figure_now()
        if fig is None:
            raise ConfigError("save figure: this view has no figure yet")
        folder = Path(folder) if folder is not None else self.params.out_path
        n = 1 + len(list(folder.glob(f"panel_{self.notebook}_*.{fmt}")))
        return figures.save_figure(fig, folder / f"panel_{self.notebook}_{n}.{fmt}")

    def run_root(self):
        """The folder a panel action's run folders go into: ``<out_dir>/panels``, or ``runs/panels/<notebook>`` under
        :func:`~workbench.params.project_root` when ``out_dir`` belongs to a headless report."""
        from .params import project_root
        from .runs import report_of

        out = self.params.out_path
        return project_root() / "runs" / "panels" / self.notebook if report_of(out) is not None else out / "panels"

    @contextlib.contextmanager
    def action_run(self, action: str, device: Any = None, **extra: Any):
        """A new run folder ``<run_root>/<action>-<UTC time>`` for one action, with its manifest (:func:`workbench.runs.start_run`,
        kind "panel"; status "ok" or "failed", its seconds and whether it was stopped, when the block ends). Yields the
        folder; :attr:`last_run` is it."""
        from .runs import finish_run, new_run_dir, start_run

        folder = new_run_dir(self.run_root(), action)
        start_run(folder, "panel", f"{self.notebook}/{folder.name}", {"notebook": self.notebook, "action": action,
                                                                       "parameters": self.notebook_parameters(),
                                                                       "command": self.command()}, device=device, **extra)
        self.last_run = folder
        t0, status = time.perf_counter(), "failed"
        try:
            yield folder
            status = "ok"
        finally:
            finish_run(folder, status, time.perf_counter() - t0, stopped=self.stop_requested)

    def _save_clicked(self) -> None:
        try:
            path = self.save_figure(self.fmt.value)
            self._say(f"saved {path}")
        except (ConfigError, OSError) as e:
            self._say(f"not saved: {e}")

    def _command_clicked(self) -> None:
        line = self.command()
        missing = self.unmapped_controls()
        self._say(line + (f"\n# no notebook parameter for: {', '.join(missing)}" if missing else ""))

    def _say(self, text: str) -> None:
        self.output_line.value = text
        self.output_line.layout.display = None

    def request_stop(self) -> None:
        """Ask the running long action to stop after its current epoch or trial."""
        self.stop_requested = True

    def base_config(self, preset_name: str) -> ExperimentConfig:
        """The notebook's config for ``preset_name`` (its sizes and fixed values on top of the preset)."""
        return self.params.experiment(preset_name)

    def config(self) -> ExperimentConfig:
        """The config the controls describe: the chosen preset with the knob controls' values."""
        name = self.controls["preset"].value if "preset" in self.controls else None
        return self.base_config(name).replace(**self.knob_values())

    def busy(self, on: bool, text: str = "computing...") -> None:
        """Disable the controls and say so while computing; restore them afterwards."""
        for w in self.controls.values():
            w.disabled = on
        for b in getattr(self, "buttons", ()):
            b.disabled = on
        self.stop_button.disabled = not on
        if on:
            self.widget.add_class("wb-busy")
            self.status.value = f"<span class='wb-busy-text' style='color:#666'>{html.escape(text)}</span>"
        else:
            self.widget.remove_class("wb-busy")
            self.progress.layout.display = "none"

    def report_progress(self, fraction: float, text: str) -> None:
        """Show the progress bar at ``fraction`` with ``text`` in the status line (long computations)."""
        self.progress.layout.display = None
        self.progress.value = max(0.0, min(1.0, fraction))
        self.status.value = f"<span class='wb-busy-text' style='color:#666'>{html.escape(text)}</span>"

    def show_result(self, result: Any) -> None:
        """Show a result (computed here or passed in) in the status line and the figure."""
        self.result, self.error = result, None
        self.status.value = self.describe(result)
        fig = self.figure(result)
        if fig is not None:
            from matplotlib.layout_engine import ConstrainedLayoutEngine

            fits = isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)  # fits its canvas: no tight box, one draw less
            self.image.value = figures.png_bytes(fig, PANEL_DPI, tight=not fits)
            self.image.layout.display = None

    def update(self, change=None) -> Any:
        if self._hold:
            return self.result
        t0 = time.perf_counter()
        self.busy(True)
        try:  # busy until the figure is drawn too: a panel that looks idle shows its final status and figure
            result = self.compute()
            self.show_result(result)
            self.seconds = time.perf_counter() - t0
        except ConfigError as e:  # a bad control combination: show it, keep the last result
            self.error = str(e)
            self.status.value = f"<span class='wb-error' style='color:#b00'>invalid: {html.escape(str(e))}</span>"
        finally:
            self.busy(False)
        return self.result

    def static_html(self) -> str:
        """The last view as static HTML: the status line and the figure (a notebook reopened without a kernel)."""
        img = (f"<img src='data:image/png;base64,{base64.b64encode(self.image.value).decode()}' style='max-width:100%'>"
               if self.image.value else "")
        return f"<div class='wb-static'>{self.status.value}{img}</div>"

    def _repr_mimebundle_(self, **kwargs):
        if self.result is None and self.error is None and not getattr(self, "manual", False):
            self.update()  # nothing was passed in: compute once, for a panel built on its own
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle = dict(bundle[0]) if isinstance(bundle, tuple) else dict(bundle or {})
        if self.image.value:
            bundle["image/png"] = base64.b64encode(self.image.value).decode()
        bundle["text/html"] = self.static_html()
        return bundle


class _Cache:
    """What a panel keeps between updates: the scenes, each architecture's model; each estimator's raw R_samp is the
    scenes' own R_samp cache (:func:`workbench.forward.rsamp_cache`)."""

    def __init__(self, params, cfg: ExperimentConfig, n_scenes: int):
        from .studies.pipeline import scene_batch

        self.params, self.batch = params, scene_batch(cfg, n_scenes, params.seed, params.data_path)
        self._models: dict[str, Any] = {}

    def raw(self, cfg: ExperimentConfig):
        from .forward import rsamp_cache

        return rsamp_cache(self.batch).raw(cfg.fixes.rsamp_estimator, cfg.system)

    def model(self, cfg: ExperimentConfig):
        from .model import build_model

        key = cfg.model.to_json()
        if key not in self._models:
            self._models[key] = build_model(cfg.system, cfg.model, seed=self.params.seed)
        return self._models[key]


# ---------------------------------------------------------------------------------------------
class NormalisationPanel(Panel):
    """01: toggle Fix 1 / Fix 2, C_EPS, beta and the estimator; see the norms, traces and ranks of R_samp,
    R_pred, R_blend (:func:`workbench.studies.pipeline.pipeline_summary`, the function behind the headless table)."""

    notebook = "01_covariance_normalisation"
    param_of = {"preset": "presets"}  # the toggles are the panel's own: 01 runs every preset as it is
    knobs = {"rsamp_normalise": "fixes.rsamp_normalise", "rblend_trace_normalise": "fixes.rblend_trace_normalise",
             "c_eps": "fixes.c_eps", "beta": "fixes.beta", "estimator": "fixes.rsamp_estimator"}

    def __init__(self, params: NormalisationParams, preset_name: str | None = None, initial: dict | None = None):
        self.params = params
        name = preset_name or params.preset_names[0]
        cfg = params.experiment(name)
        self.cache = _Cache(params, cfg, params.n_scenes)
        self.batch = self.cache.batch
        fx = cfg.fixes
        from .estimators import ESTIMATORS  # the registries import torch: not at module import

        controls = {
            "preset": _dropdown(PRESETS, name, "preset"),
            "rsamp_normalise": _checkbox(fx.rsamp_normalise, "Fix 1: normalise R_samp"),
            "rblend_trace_normalise": _checkbox(fx.rblend_trace_normalise, "trace-normalise R_blend (Fix 2 turns it off)"),
            "c_eps": _log_slider(fx.c_eps, "C_EPS"),
            "beta": widgets.FloatSlider(value=fx.beta, min=0, max=1, step=0.05, description="beta", continuous_update=False),
            "estimator": _dropdown(ESTIMATORS, fx.rsamp_estimator, "R_samp estimator"),
        }
        super().__init__(controls, initial)

    def compute(self) -> dict:
        from .studies.pipeline import pipeline_summary

        cfg = self.config()
        return pipeline_summary(cfg, self.batch, seed=self.params.seed, R_samp_raw=self.cache.raw(cfg), model=self.cache.model(cfg))

    def describe(self, result: dict) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{_html(v['fro'], show_nonfinite=True)}</td><td>{_html(v['trace'], show_nonfinite=True)}</td>"
                       f"<td>{v['rank']:.0f}</td></tr>" for k, v in result.items())
        return ("<table class='wb-table'><tr><th>matrix (median over scenes)</th><th>‖·‖_F</th><th>trace</th><th>rank</th></tr>"
                f"{rows}</table>")

    def figure(self, result: dict):
        from .figures.pipeline import norms_figure

        return norms_figure([{"preset": self.controls["preset"].value, **result}])


class SpectrumPanel(Panel):
    """02: C_EPS, beta, estimator, preset and scene; redraws the spectra (:func:`workbench.studies.pipeline.spectra`).
    Moving the scene only redraws: the spectra of all scenes are computed once per config."""

    notebook = "02_eigen_spectrum"
    knobs = {"c_eps": "fixes.c_eps", "beta": "fixes.beta", "estimator": "fixes.rsamp_estimator"}

    def __init__(self, params: SpectrumParams, initial=None):
        self.params = params
        cfg = params.experiment()
        self.cache = _Cache(params, cfg, params.n_scenes)
        self.batch = self.cache.batch
        self._spectra: dict[str, Any] = {}
        from .estimators import ESTIMATORS

        controls = {
            "preset": _dropdown(PRESETS, params.preset, "preset"),
            "c_eps": _log_slider(cfg.fixes.c_eps, "C_EPS"),
            "beta": widgets.FloatSlider(value=cfg.fixes.beta, min=0, max=1, step=0.05, description="beta", continuous_update=False),
            "estimator": _dropdown(ESTIMATORS, cfg.fixes.rsamp_estimator, "R_samp estimator"),
            "scene": widgets.IntSlider(value=params.scene, min=0, max=params.n_scenes - 1, description="scene", continuous_update=False),
        }
        if initial is not None:
            self._spectra[cfg.to_json()] = initial
        super().__init__(controls, initial)

    def compute(self):
        from .studies.pipeline import spectra

        cfg = self.config()
        key = cfg.to_json()
        if key not in self._spectra:
            self._spectra = {key: spectra(cfg, self.batch, seed=self.params.seed, R_samp_raw=self.cache.raw(cfg), model=self.cache.model(cfg))}
        return self._spectra[key]

    def describe(self, spec) -> str:
        s = self.controls["scene"].value
        rows = "".join(f"<tr><td>{n}</td><td>{int(spec.rank[n][s])}</td><td>{_html(float(spec.cond[n][s]), show_nonfinite=True)}</td>"
                       f"<td>{_html(float(spec.gap[n][s]), show_nonfinite=True)}</td></tr>" for n in spec.eigvals)
        return (f"<b>scene {s}, K = {int(spec.K[s])}</b><table class='wb-table'><tr><th>matrix</th><th>rank</th><th>cond</th>"
                f"<th>gap λ_K − λ_K+1</th></tr>{rows}</table>")

    def figure(self, spec):
        from .figures.pipeline import spectrum_figure

        return spectrum_figure(spec, self.controls["scene"].value)


class GradientPanel(Panel):
    """03: choose the eigen backends, the weights and C_EPS; one real forward/backward
    (:func:`workbench.diagnostics.gradient_report`, as in the headless table) and its gradient status."""

    notebook = "03_nan_gradients"
    knobs = {"gap_backend": "fixes.gap_backend", "subspace_backend": "fixes.subspace_backend", "lam_gap": "fixes.lam_gap",
             "subspace_weight": "loss.subspace", "c_eps": "fixes.c_eps"}

    def __init__(self, params: GradientParams, initial: dict | None = None):
        self.params = params
        cfg = params.experiment()
        self.cache = _Cache(params, cfg, params.n_scenes)
        self.batch = self.cache.batch
        from .spectral import GAP_BACKENDS, SUBSPACE_BACKENDS

        controls = {
            "preset": _dropdown(PRESETS, params.preset, "preset"),
            "gap_backend": _dropdown(GAP_BACKENDS, cfg.fixes.gap_backend, "gap backend"),
            "subspace_backend": _dropdown(SUBSPACE_BACKENDS, cfg.fixes.subspace_backend, "subspace backend"),
            "lam_gap": _float_text(cfg.fixes.lam_gap, "lam_gap"),
            "subspace_weight": _float_text(cfg.loss.subspace, "subspace weight"),
            "c_eps": _log_slider(cfg.fixes.c_eps, "C_EPS"),
        }
        super().__init__(controls, initial)
        self.status.add_class("wb-grad-status")

    def compute(self) -> dict:
        from .diagnostics import gradient_report

        cfg = self.config()
        return gradient_report(cfg, self.batch, self.cache.model(cfg), seed=self.params.seed)

    @staticmethod
    def status_text(report: dict) -> str:
        """One line: 'gradient finite' or 'gradient NaN' with where it came from."""
        gn = ", ".join(f"{g} {_html(v, show_nonfinite=True)}" for g, v in report["grad_norm"].items())
        if report["ok"]:
            return f"gradient finite (norm: {gn})"
        origin = "; ".join(f"{p['term']} via {p['op']} -> {','.join(p['groups'])}" for p in report["provenance"] if p.get("in_total", True))
        return f"gradient NaN ({gn}); from {origin or 'unknown'}"

    def describe(self, report: dict) -> str:
        colour = "#070" if report["ok"] else "#b00"
        rows = "".join(
            f"<tr><td>{t}</td><td>{_html(report['terms'][t], show_nonfinite=True)}</td><td>{_html(report['weights'].get(t, 0))}</td>"
            + "".join(f"<td>{_html(v, show_nonfinite=True)}</td>" for v in report["term_grad_norm"][t].values()) + "</tr>"
            for t in report["term_grad_norm"]
        )
        groups = "".join(f"<th>‖∇ {g}‖</th>" for g in report["grad_norm"])
        return (f"<b class='wb-grad-line' style='color:{colour}'>{html.escape(self.status_text(report))}</b>"
                f"<table class='wb-table'><tr><th>term</th><th>value</th><th>weight</th>{groups}</tr>{rows}</table>")


class TrainingPanel(Panel):
    """04: pick a preset, epochs, learning rate and subspace weight, press *train*: the headless cell's training
    (:func:`workbench.train.fit` on the same scenes) with a progress bar per epoch, the seed note's four checks and
    the curves. Nothing trains on display: the panel starts from the headless run of the chosen preset."""

    manual = True
    long_action = True
    notebook = "04_training"
    param_of = {"preset": "presets", "subspace": "subspace_weight"}
    knobs = {"epochs": "train.epochs", "lr": "train.lr", "subspace": "loss.subspace"}  # a preset sets all three

    def __init__(self, params: TrainingParams, data=None, initial: dict | None = None):
        self.params = params
        name = params.preset_names[-1]
        cfg = params.experiment(name)
        controls = {
            "preset": _dropdown(params.preset_names, name, "preset"),
            "epochs": widgets.IntSlider(value=cfg.train.epochs, min=1, max=max(50, cfg.train.epochs), description="epochs",
                                        continuous_update=False),
            "lr": _log_slider(cfg.train.lr, "learning rate", -5, 0),
            "subspace": _float_text(cfg.loss.subspace, "subspace weight"),
        }
        self.button = widgets.Button(description="train", button_style="primary", icon="play").add_class("wb-train")
        self.button.on_click(lambda _: self.update())
        self.buttons = (self.button,)
        self._data = {} if data is None else {data.key: data}
        super().__init__(controls, None, auto=False, buttons=self.buttons)
        if initial and name in initial:
            self.show_result(initial[name])
        else:
            self.status.value = "press <b>train</b> to run a short training under the chosen preset"

    def config(self) -> ExperimentConfig:
        v = self.values()
        return self.params.experiment(v["preset"]).replace(**{"train.epochs": v["epochs"], "train.lr": v["lr"], "loss.subspace": v["subspace"]})

    def compute(self):
        from .forward import TrainingData
        from .train import fit

        cfg = self.config()
        key = TrainingData.key_of(cfg)
        if key not in self._data:
            self._data = {key: TrainingData.load(cfg, self.params.data_path)}
        epochs = cfg.train.epochs

        def on_epoch(record: dict) -> bool:
            self.report_progress((record["epoch"] + 1) / epochs, f"training: epoch {record['epoch'] + 1}/{epochs}, "
                                                                 f"val NMSE {_html(record['val_nmse'], show_nonfinite=True)}")
            return self.stop_requested  # True stops fit after this epoch

        self.stop_requested = False
        self.report_progress(0.0, f"training: epoch 0/{epochs}")
        with self.action_run("train", device=self._data[key].device) as folder:
            run = fit(cfg, data=self._data[key], progress=False, on_epoch=on_epoch, run_dir=folder)
        run.extra["panel_run"] = str(folder)
        return run

    def describe(self, run) -> str:
        from .train import checks

        last = run.history[-1]
        skipped = sum(h["skipped_nonfinite"] for h in run.history)
        marks = " ".join(f"{'✔' if c['passed'] else '✘'} {html.escape(c['name'])}" for c in checks(run.history, run.provenance))
        n, total = len(run.history), run.config.train.epochs
        stopped = f" (stopped after epoch {n} of {total})" if n < total else ""
        saved = f"<br><small class='wb-run'>run folder: {html.escape(run.extra['panel_run'])}</small>" if run.extra.get("panel_run") else ""
        return (f"{html.escape(self.controls['preset'].value)}{stopped}: final train loss {_html(last['train_loss'], show_nonfinite=True)}, "
                f"validation NMSE {_html(last['val_nmse'], show_nonfinite=True)}, {skipped} steps skipped; {marks}{saved}")

    def figure(self, run):
        from .figures.training import training_figure

        return training_figure({self.controls["preset"].value: run.history})


class LocalisationPanel(Panel):
    """05: choose a covariance source, the SNR, the scene and the method; draws that scene's spectrum as an
    interactive plotly figure (:func:`workbench.studies.localisation.scene_spectrum`, as the headless cell) and
    lists its true and estimated sources. ``sources``: the headless cell's sources (trained networks included), so
    nothing is trained or re-estimated for the rest of the scenes; one scene answers within a second."""

    notebook = "05_localisation"
    param_of = {"source": "spectrum_of", "snr_db": None}  # the notebook's spectrum is at its highest SNR

    def __init__(self, params: LocalisationParams, sources: dict | None = None, initial: dict | None = None):
        from .studies.localisation import localisation_sources

        self.params = params
        self.sources = sources if sources is not None else localisation_sources(params.experiment(), params.estimator_names)
        snrs = params.snr_values
        name = initial["name"] if initial else params.spectrum_source
        name = name if name in self.sources else next(iter(self.sources))
        controls = {
            "source": _dropdown(list(self.sources), name, "covariance"),
            "snr_db": _dropdown(snrs, initial["snr_db"] if initial else max(snrs), "SNR (dB)"),
            "scene": widgets.IntSlider(value=initial["scene"] if initial else params.scene, min=0, max=params.n_per_snr - 1,
                                       description="scene", continuous_update=False),
            "method": _dropdown(("music", "mvdr"), params.method, "method"),
        }
        self.plot = widgets.Output(layout=widgets.Layout(min_height="460px"))
        super().__init__(controls, None)
        self.widget.children = (*self.widget.children, self.plot)
        if initial is not None:
            self.show_result(initial)

    def save_figure(self, fmt: str = "html", folder=None) -> str:
        """The interactive spectrum as a standalone HTML page (plotly; static formats need kaleido) in ``folder``
        (default: the notebook's out_dir); returns the path."""
        from pathlib import Path

        from .figures.localisation import spectrum_plotly

        if self.result is None:
            raise ConfigError("save figure: this view has no figure yet")
        folder = Path(folder) if folder is not None else self.params.out_path
        n = 1 + len(list(folder.glob(f"panel_{self.notebook}_*.html")))
        return figures.save_html(spectrum_plotly(self.result), folder / f"panel_{self.notebook}_{n}.html")

    # One scene is hundreds of tiny linear-algebra calls (RAP-MUSIC, its refinements): a second thread only adds
    # synchronisation, and on a loaded machine its waits dominate (3 scenes: 12.9 s at 2 threads, 2.4 s at 1, load 4.8).
    THREADS = 1

    def compute(self) -> dict:
        from .studies.localisation import scene_spectrum, snr_scene
        from .train import torch_threads

        v, p = self.values(), self.params
        system = p.experiment().system
        with torch_threads(self.THREADS):
            batch = snr_scene(system, v["snr_db"], p.n_per_snr, p.seed, v["scene"], snr_index=p.snr_values.index(v["snr_db"]))
            return scene_spectrum(system, batch, v["source"], self.sources[v["source"]], v["method"], p.use_true_k, scene=v["scene"])

    def show_result(self, view: dict) -> None:
        from .figures.localisation import spectrum_plotly

        super().show_result(view)
        # set the output directly rather than capturing a display() call: capture needs a frontend to route it,
        # and papermill's output-widget handling waited forever on a clear_output inside the capture
        self.plot.outputs = ({"output_type": "display_data", "data": plotly_bundle(spectrum_plotly(view)), "metadata": {}},)

    def describe(self, view: dict) -> str:
        def row(kind: str, p: dict) -> str:
            return f"<tr><td>{kind}</td><td>{_html(p['phi_deg'])}</td><td>{_html(p['theta_deg'])}</td><td>{_html(p['r_m'])}</td></tr>"

        rows = "".join(row("true", p) for p in view["true"]) + "".join(row("estimated", p) for p in view["estimated"])
        return (f"<b>{html.escape(view['name'])}</b>, scene {view['scene']} at {_html(view['snr_db'])} dB: K = {view['K']}, localised with "
                f"K = {view['K_used']} ({view['method'].upper()})<table class='wb-table'><tr><th></th><th>φ (°)</th><th>θ (°)</th>"
                f"<th>r (m)</th></tr>{rows}</table>")


class SweepPanel(Panel):
    """06: choose the knob whose outcome fractions are shown (:func:`workbench.studies.sweeps.outcome_fractions`, as
    the headless cell), and run more trials on the same study (:func:`workbench.sweep.run_sweep`, as the headless cell)."""

    notebook = "06_sweep"
    long_action = True
    param_of = {"knob": None, "more": None}

    def __init__(self, params: SweepParams, initial: dict | None = None):
        self.params = params
        knobs = list(params.search_space.params)
        controls = {
            "knob": _dropdown(["(all)", *knobs], "(all)", "knob"),
            "more": widgets.BoundedIntText(value=2, min=1, max=1000, description="more trials", style={"description_width": "initial"},
                                           layout=widgets.Layout(width="160px")),
        }
        self.button = widgets.Button(description="run more trials", button_style="primary", icon="play").add_class("wb-run-more")
        self.button.on_click(lambda _: self.run_more())
        self.buttons = (self.button,)
        super().__init__(controls, None, buttons=self.buttons)
        controls["more"].unobserve(self.update, names="value")  # changing the count alone recomputes nothing

    def study(self):
        from . import sweep

        return sweep.load_study(self.params.storage_url, self.params.study)

    def run_more(self) -> Any:
        """Run ``more`` trials beyond those already finished on the notebook's study, then redraw. The action is a run
        of its own (:meth:`Panel.action_run`: its manifest, and a ``metrics.json`` with the study's counts and best
        trial before and after and the trials it added). Refused when the study is a headless report's (the
        default storage under a report's ``out_dir``): a report's study holds only what the report ran."""
        from . import sweep
        from .io import save_metrics
        from .runs import report_of

        p, more = self.params, self.controls["more"].value
        report = report_of(p.out_path) if not p.storage else None
        if report is not None:
            self._say(f"not run: this study belongs to the headless report '{report}'; open the notebook with its own out_dir "
                      "(runs/06_sweep in the lab) or give a storage of your own to add trials")
            return self.result
        s = self.study()
        before = sweep.summarize(s)
        done = sweep.progress_counts(s)["done"]
        self.stop_requested = False
        self.busy(True, f"running {more} more trial(s)...")
        try:
            with self.action_run("trials", study=p.study, storage=sweep.mask_url(p.storage_url)) as folder:
                added: list[int] = []
                for i in range(more):  # one trial at a time: progress, and "stop" between trials
                    if self.stop_requested:
                        break
                    self.report_progress(i / more, f"trial {i + 1} of {more}...")
                    known = {t.number for t in self.study().get_trials(deepcopy=False)}
                    s = sweep.run_sweep(p.search_space, trials=done + i + 1, study=p.study, storage=p.storage_url, seed=p.seed,
                                        pruner=p.pruner, enqueue=p.enqueued, verbose=False, data=p.data_path)
                    added += sorted({t.number for t in s.get_trials(deepcopy=False)} - known)
                save_metrics(folder, {"notebook": self.notebook, "action": "trials", "study": p.study, "added": added,
                                      "before": before, "after": sweep.summarize(s)})
        finally:
            self.busy(False)
        return self.update()

    def notebook_parameters(self) -> dict[str, Any]:
        """As :meth:`Panel.notebook_parameters`, with ``trials`` the study's finished trials (the view's count)."""
        from . import sweep

        out = super().notebook_parameters()
        out["trials"] = sweep.progress_counts(self.study())["done"]
        return out

    def compute(self) -> dict:
        from . import sweep
        from .studies.sweeps import outcome_fractions, sweep_metrics

        s = self.study()
        knob = self.controls["knob"].value
        rows = outcome_fractions(s)
        return {"summary": sweep.summarize(s), "states": sweep_metrics(s)["states"],
                "rows": rows if knob == "(all)" else [r for r in rows if r["param"] == knob], "knob": None if knob == "(all)" else knob}

    def describe(self, result: dict) -> str:
        c, best = result["summary"]["counts"], result["summary"]["best"]
        line = (f"{c['done']} finished: {c['complete']} complete, {c['pruned']} pruned ({result['summary']['nonfinite']} non-finite), "
                f"{c['failed']} failed")
        if best:
            line += f"; best trial {best['number']}: val_nmse {_html(best['value'], 4)}"
        return html.escape(line)

    def figure(self, result: dict):
        from .figures.sweeps import outcomes_figure

        return outcomes_figure(result["rows"], result["knob"]) if result["rows"] else None
