"""The panel machinery (:mod:`workbench.ui`): the :class:`Panel` base (controls, layout, busy state, progress, the
run folder of a panel action, the static HTML of a saved notebook), the per-panel cache (:class:`_Cache`) and the widget
helpers. Owns and must not: as :mod:`workbench.ui` says."""

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

from .. import figures
from ..config import ConfigError, ExperimentConfig
from ..figures import fmt

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

        from ..config import check_choice

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
        from ..params import project_root
        from ..runs import report_of

        out = self.params.out_path
        return project_root() / "runs" / "panels" / self.notebook if report_of(out) is not None else out / "panels"

    @contextlib.contextmanager
    def action_run(self, action: str, device: Any = None, **extra: Any):
        """A new run folder ``<run_root>/<action>-<UTC time>`` for one action, with its manifest (:func:`workbench.runs.start_run`,
        kind "panel"; status "ok" or "failed", its seconds and whether it was stopped, when the block ends). Yields the
        folder; :attr:`last_run` is it."""
        from ..runs import finish_run, new_run_dir, start_run

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
        from ..studies.pipeline import scene_batch

        self.params, self.batch = params, scene_batch(cfg, n_scenes, params.seed, params.data_path)
        self._models: dict[str, Any] = {}

    def raw(self, cfg: ExperimentConfig):
        from ..forward import rsamp_cache

        return rsamp_cache(self.batch).raw(cfg.fixes.rsamp_estimator, cfg.system)

    def model(self, cfg: ExperimentConfig):
        from ..model import build_model

        key = cfg.model.to_json()
        if key not in self._models:
            self._models[key] = build_model(cfg.system, cfg.model, seed=self.params.seed)
        return self._models[key]


