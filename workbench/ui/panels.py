"""One panel per notebook (:mod:`workbench.ui`): 01 normalisation, 02 spectrum, 03 gradients, 04 training, 05
localisation, 06 sweep, each a :class:`~workbench.ui.base.Panel` bound to the functions its notebook's headless cells
call. Owns and must not: as :mod:`workbench.ui` says."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from .. import figures
from ..config import PRESETS, ConfigError, ExperimentConfig
from ..params import GradientParams, LocalisationParams, NormalisationParams, SpectrumParams, SweepParams, TrainingParams
from .base import Panel, _Cache, _checkbox, _dropdown, _float_text, _html, _log_slider, plotly_bundle


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
        from ..estimators import ESTIMATORS  # the registries import torch: not at module import

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
        from ..studies.pipeline import pipeline_summary

        cfg = self.config()
        return pipeline_summary(cfg, self.batch, seed=self.params.seed, R_samp_raw=self.cache.raw(cfg), model=self.cache.model(cfg))

    def describe(self, result: dict) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{_html(v['fro'], show_nonfinite=True)}</td><td>{_html(v['trace'], show_nonfinite=True)}</td>"
                       f"<td>{v['rank']:.0f}</td></tr>" for k, v in result.items())
        return ("<table class='wb-table'><tr><th>matrix (median over scenes)</th><th>‖·‖_F</th><th>trace</th><th>rank</th></tr>"
                f"{rows}</table>")

    def figure(self, result: dict):
        from ..figures.pipeline import norms_figure

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
        from ..estimators import ESTIMATORS

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
        from ..studies.pipeline import spectra

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
        from ..figures.pipeline import spectrum_figure

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
        from ..spectral import GAP_BACKENDS, SUBSPACE_BACKENDS

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
        from ..diagnostics import gradient_report

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
        from ..forward import TrainingData
        from ..train import fit

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
        from ..train import checks

        last = run.history[-1]
        skipped = sum(h["skipped_nonfinite"] for h in run.history)
        marks = " ".join(f"{'✔' if c['passed'] else '✘'} {html.escape(c['name'])}" for c in checks(run.history, run.provenance))
        n, total = len(run.history), run.config.train.epochs
        stopped = f" (stopped after epoch {n} of {total})" if n < total else ""
        saved = f"<br><small class='wb-run'>run folder: {html.escape(run.extra['panel_run'])}</small>" if run.extra.get("panel_run") else ""
        return (f"{html.escape(self.controls['preset'].value)}{stopped}: final train loss {_html(last['train_loss'], show_nonfinite=True)}, "
                f"validation NMSE {_html(last['val_nmse'], show_nonfinite=True)}, {skipped} steps skipped; {marks}{saved}")

    def figure(self, run):
        from ..figures.training import training_figure

        return training_figure({self.controls["preset"].value: run.history})


class LocalisationPanel(Panel):
    """05: choose a covariance source, the SNR, the scene and the method; draws that scene's spectrum as an
    interactive plotly figure (:func:`workbench.studies.localisation.scene_spectrum`, as the headless cell) and
    lists its true and estimated sources. ``sources``: the headless cell's sources (trained networks included), so
    nothing is trained or re-estimated for the rest of the scenes; one scene answers within a second."""

    notebook = "05_localisation"
    param_of = {"source": "spectrum_of", "snr_db": None}  # the notebook's spectrum is at its highest SNR

    def __init__(self, params: LocalisationParams, sources: dict | None = None, initial: dict | None = None):
        from ..studies.localisation import localisation_sources

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

        from ..figures.localisation import spectrum_plotly

        if self.result is None:
            raise ConfigError("save figure: this view has no figure yet")
        folder = Path(folder) if folder is not None else self.params.out_path
        n = 1 + len(list(folder.glob(f"panel_{self.notebook}_*.html")))
        return figures.save_html(spectrum_plotly(self.result), folder / f"panel_{self.notebook}_{n}.html")

    # One scene is hundreds of tiny linear-algebra calls (RAP-MUSIC, its refinements): a second thread only adds
    # synchronisation, and on a loaded machine its waits dominate (3 scenes: 12.9 s at 2 threads, 2.4 s at 1, load 4.8).
    THREADS = 1

    def compute(self) -> dict:
        from ..studies.localisation import scene_spectrum, snr_scene
        from ..train import torch_threads

        v, p = self.values(), self.params
        system = p.experiment().system
        with torch_threads(self.THREADS):
            batch = snr_scene(system, v["snr_db"], p.n_per_snr, p.seed, v["scene"], snr_index=p.snr_values.index(v["snr_db"]))
            return scene_spectrum(system, batch, v["source"], self.sources[v["source"]], v["method"], p.use_true_k, scene=v["scene"])

    def show_result(self, view: dict) -> None:
        from ..figures.localisation import spectrum_plotly

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
        from .. import sweep

        return sweep.load_study(self.params.storage_url, self.params.study)

    def run_more(self) -> Any:
        """Run ``more`` trials beyond those already finished on the notebook's study, then redraw. The action is a run
        of its own (:meth:`Panel.action_run`: its manifest, and a ``metrics.json`` with the study's counts and best
        trial before and after and the trials it added). Refused when the study is a headless report's (the
        default storage under a report's ``out_dir``): a report's study holds only what the report ran."""
        from .. import sweep
        from ..io import save_metrics
        from ..runs import report_of

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
        from .. import sweep

        out = super().notebook_parameters()
        out["trials"] = sweep.progress_counts(self.study())["done"]
        return out

    def compute(self) -> dict:
        from .. import sweep
        from ..studies.sweeps import outcome_fractions, sweep_metrics

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
        from ..figures.sweeps import outcomes_figure

        return outcomes_figure(result["rows"], result["knob"]) if result["rows"] else None
