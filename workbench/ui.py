"""Notebook parameters and widget panels.

Each notebook's ``parameters`` cell is validated by one dataclass here (the same validation path as every
config: :class:`workbench.config.ConfigBase`), which also builds the notebook's :class:`ExperimentConfig`.
Each panel is seeded from those validated parameters and calls the same :mod:`workbench.plots` /
:mod:`workbench.diagnostics` / :mod:`workbench.train` functions the headless cells call, so moving a control
re-runs exactly what the headless run ran. Panels work without a kernel (tests set ``control.value`` and
read ``panel.result`` / ``panel.status.value`` / ``panel.image.value``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, ClassVar

import ipywidgets as widgets

from .config import GAP_BACKENDS, PRESETS, SAMPLE_ESTIMATORS, SUBSPACE_BACKENDS, ConfigBase, ConfigError, ExperimentConfig, preset


def _rng(lo=None, hi=None) -> dict:
    return {"range": (lo, hi)}


def _presets_list(where: str, text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in PRESETS]
    if not names or bad:
        raise ConfigError(f"{where} = {text!r}: expected comma-separated preset names from {', '.join(PRESETS)}")
    return names


def _floats_list(where: str, text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 or v != v for v in values):
        raise ConfigError(f"{where} = {text!r}: expected comma-separated non-negative numbers, e.g. '1e-4,1e-2,1'")
    return values


# ---------------------------------------------------------------------------------------------
# Parameters of each notebook (names, types and defaults mirror the notebook's `parameters` cell)
@dataclass
class NotebookParams(ConfigBase):
    """Base: every notebook writes under ``out_dir``. ``ci`` holds the small values used by CI and tests."""

    _section: ClassVar[str] = "notebook"
    ci: ClassVar[dict[str, Any]] = {}

    def experiment(self) -> ExperimentConfig:  # pragma: no cover - every notebook overrides
        raise NotImplementedError


@dataclass
class NormalisationParams(NotebookParams):
    _section: ClassVar[str] = "01_covariance_normalisation"
    ci: ClassVar[dict[str, Any]] = {"n_scenes": 8, "n_grad": 4, "width": 16, "presets": "seed_before,seed_fix1,seed_fix2"}

    n_scenes: int = field(default=64, metadata=_rng(1, 100_000))
    n_grad: int = field(default=16, metadata=_rng(1, 100_000))
    presets: str = "seed_before,seed_fix1,seed_fix2,seed_fix3,recommended"
    width: int = field(default=128, metadata=_rng(8, 8192))
    N_side: int = field(default=12, metadata=_rng(2, 64))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    out_dir: str = "runs/01_covariance_normalisation"

    def _check_relations(self) -> None:
        _presets_list(f"{self._section}.presets", self.presets)

    @property
    def preset_names(self) -> list[str]:
        return _presets_list(f"{self._section}.presets", self.presets)

    def overrides(self) -> dict:
        return {"model.width": self.width, "model.heads": 4 if self.width % 4 == 0 else 1, "system.N_H": self.N_side, "system.N_V": self.N_side}

    def experiment(self, name: str | None = None) -> ExperimentConfig:
        return preset(name or self.preset_names[0], **self.overrides())


@dataclass
class SpectrumParams(NotebookParams):
    _section: ClassVar[str] = "02_eigen_spectrum"
    ci: ClassVar[dict[str, Any]] = {"n_scenes": 4, "width": 16, "c_eps_sweep": "0.0001,0.01,1"}

    preset: str = field(default="seed_fix2", metadata={"choices": PRESETS})
    c_eps: float = field(default=1.0, metadata=_rng(0.0, 1e6))
    beta: float = field(default=0.3, metadata=_rng(0.0, 1.0))
    estimator: str = field(default="seed", metadata={"choices": SAMPLE_ESTIMATORS})
    n_scenes: int = field(default=16, metadata=_rng(1, 100_000))
    scene: int = field(default=0, metadata=_rng(0, None))
    c_eps_sweep: str = "0.0001,0.001,0.01,0.1,1,10"
    width: int = field(default=128, metadata=_rng(8, 8192))
    N_side: int = field(default=12, metadata=_rng(2, 64))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    out_dir: str = "runs/02_eigen_spectrum"

    def _check_relations(self) -> None:
        if self.scene >= self.n_scenes:
            raise ConfigError(f"{self._section}.scene = {self.scene} must be < n_scenes = {self.n_scenes}")
        _floats_list(f"{self._section}.c_eps_sweep", self.c_eps_sweep)

    @property
    def c_eps_values(self) -> list[float]:
        return _floats_list(f"{self._section}.c_eps_sweep", self.c_eps_sweep)

    def experiment(self) -> ExperimentConfig:
        return preset(self.preset, **{"fixes.c_eps": self.c_eps, "fixes.beta": self.beta, "fixes.rsamp_estimator": self.estimator,
                                      "model.width": self.width, "model.heads": 4 if self.width % 4 == 0 else 1,
                                      "system.N_H": self.N_side, "system.N_V": self.N_side})


@dataclass
class GradientParams(NotebookParams):
    _section: ClassVar[str] = "03_nan_gradients"
    ci: ClassVar[dict[str, Any]] = {"n_scenes": 2, "width": 16, "N_side": 6}

    preset: str = field(default="seed_fix2", metadata={"choices": PRESETS})
    lam_gap: float = field(default=0.012, metadata=_rng(0.0, 1e6))  # the pre-Fix-3 weight
    subspace_weight: float = field(default=0.1, metadata=_rng(0.0, 1e6))
    c_eps: float = field(default=1.0, metadata=_rng(0.0, 1e6))
    gap_backend: str = field(default="eigh", metadata={"choices": GAP_BACKENDS})
    subspace_backend: str = field(default="eigh", metadata={"choices": SUBSPACE_BACKENDS})
    n_scenes: int = field(default=8, metadata=_rng(1, 100_000))
    N_side: int = field(default=12, metadata=_rng(2, 64))  # RIS is N_side x N_side
    width: int = field(default=64, metadata=_rng(8, 8192))
    fd_step: float = field(default=1e-6, metadata=_rng(1e-12, 1e-2))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    out_dir: str = "runs/03_nan_gradients"

    def experiment(self) -> ExperimentConfig:
        return preset(self.preset, **{"fixes.lam_gap": self.lam_gap, "loss.subspace": self.subspace_weight, "fixes.c_eps": self.c_eps,
                                      "fixes.gap_backend": self.gap_backend, "fixes.subspace_backend": self.subspace_backend,
                                      "system.N_H": self.N_side, "system.N_V": self.N_side,
                                      "model.width": self.width, "model.heads": 4 if self.width % 4 == 0 else 1, "model.layers": 1})


@dataclass
class TrainingParams(NotebookParams):
    _section: ClassVar[str] = "04_training"
    ci: ClassVar[dict[str, Any]] = {"presets": "seed_fix2,recommended", "epochs": 2, "n_train": 16, "n_val": 8, "batch_size": 8,
                                    "width": 16, "N_side": 6}

    presets: str = "seed_before,seed_fix2,seed_fix3,recommended"
    epochs: int = field(default=5, metadata=_rng(1, 100_000))
    n_train: int = field(default=256, metadata=_rng(1, 10_000_000))
    n_val: int = field(default=64, metadata=_rng(1, 10_000_000))
    batch_size: int = field(default=32, metadata=_rng(1, 65_536))
    lr: float = field(default=1e-3, metadata=_rng(0.0, 10.0))
    width: int = field(default=64, metadata=_rng(8, 8192))
    N_side: int = field(default=12, metadata=_rng(2, 64))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    out_dir: str = "runs/04_training"

    def _check_relations(self) -> None:
        _presets_list(f"{self._section}.presets", self.presets)

    @property
    def preset_names(self) -> list[str]:
        return _presets_list(f"{self._section}.presets", self.presets)

    def experiment(self, name: str | None = None) -> ExperimentConfig:
        return preset(name or self.preset_names[0], **{
            "train.epochs": self.epochs, "train.n_train": self.n_train, "train.n_val": self.n_val, "train.batch_size": self.batch_size,
            "train.lr": self.lr, "train.seed": self.seed, "train.device": "auto", "system.N_H": self.N_side, "system.N_V": self.N_side,
            "model.width": self.width, "model.heads": 4 if self.width % 4 == 0 else 1, "model.layers": 1})


@dataclass
class LocalisationParams(NotebookParams):
    _section: ClassVar[str] = "05_localisation"
    ci: ClassVar[dict[str, Any]] = {"n_per_snr": 2, "N_side": 6, "snrs_db": "0,20"}

    method: str = field(default="music", metadata={"choices": ("music", "mvdr")})
    snrs_db: str = "-5,0,5,10,20"
    n_per_snr: int = field(default=16, metadata=_rng(1, 100_000))
    estimators: str = "seed,covariance_matching"
    use_true_k: bool = True
    N_side: int = field(default=12, metadata=_rng(2, 64))
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    out_dir: str = "runs/05_localisation"

    def _check_relations(self) -> None:
        self.snr_values  # noqa: B018 - validates
        self.estimator_names  # noqa: B018

    @property
    def snr_values(self) -> list[float]:
        try:
            values = [float(s) for s in self.snrs_db.split(",") if s.strip()]
        except ValueError:
            values = []
        if not values or any(not -60 <= v <= 100 for v in values):
            raise ConfigError(f"{self._section}.snrs_db = {self.snrs_db!r}: expected comma-separated SNRs in dB within [-60, 100]")
        return values

    @property
    def estimator_names(self) -> list[str]:
        names = [s.strip() for s in self.estimators.split(",") if s.strip()]
        if any(n not in SAMPLE_ESTIMATORS for n in names):
            raise ConfigError(f"{self._section}.estimators = {self.estimators!r}: expected comma-separated names from {', '.join(SAMPLE_ESTIMATORS)}")
        return names

    def experiment(self) -> ExperimentConfig:
        return preset("recommended", **{"system.N_H": self.N_side, "system.N_V": self.N_side})


NOTEBOOK_PARAMS: dict[str, type[NotebookParams]] = {
    cls._section: cls for cls in (NormalisationParams, SpectrumParams, GradientParams, TrainingParams, LocalisationParams)
}


def notebook_params(name: str, **values: Any) -> NotebookParams:
    """Validated parameters of notebook ``name`` (wrong type / range / unknown key -> ConfigError naming the field)."""
    if name not in NOTEBOOK_PARAMS:
        raise ConfigError(f"notebook = {name!r} is not known: choose one of {', '.join(NOTEBOOK_PARAMS)}")
    return NOTEBOOK_PARAMS[name].from_dict(values)


# ---------------------------------------------------------------------------------------------
class Panel:
    """Controls + a status line + a figure. Subclasses define ``compute()`` (pure: calls workbench
    functions, returns the result), ``describe(result)`` (HTML for the status line) and optionally
    ``figure(result)`` (a matplotlib figure, shown as a PNG in an Image widget). ``update()`` runs them;
    every control's ``value`` change calls it (sliders only on release).

    The figure is widget state (PNG bytes), not display output: no Output widget, so the panel behaves the
    same in JupyterLab, under papermill/nbclient (where output capture into widgets can stall) and without
    a kernel."""

    def __init__(self, controls: dict[str, widgets.Widget], auto: bool = True):
        self.controls = controls
        self.status = widgets.HTML(value="").add_class("wb-status")
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.result: Any = None
        self.error: str | None = None
        self._hold = False
        if auto:
            for w in controls.values():
                if hasattr(w, "value"):
                    w.observe(self.update, names="value")
        self.widget = widgets.VBox([widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap")),
                                    self.status, self.image])

    def values(self) -> dict[str, Any]:
        return {k: w.value for k, w in self.controls.items() if hasattr(w, "value")}

    def compute(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def figure(self, result: Any):
        """A matplotlib figure of ``result``, or None."""
        return None

    def describe(self, result: Any) -> str:
        return ""

    def update(self, change=None) -> Any:
        if self._hold:
            return self.result
        try:
            self.result, self.error = self.compute(), None
            self.status.value = self.describe(self.result)
        except ConfigError as e:  # a bad control combination: show it, keep the last result
            self.error = str(e)
            self.status.value = f"<span class='wb-error' style='color:#b00'>invalid: {html.escape(str(e))}</span>"
            return self.result
        fig = self.figure(self.result)
        if fig is not None:
            self.image.value = _png(fig)
        return self.result

    def _repr_mimebundle_(self, **kwargs):
        if self.result is None and self.error is None:
            self.update()
        return self.widget._repr_mimebundle_(**kwargs)


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def show(fig) -> None:
    """Display a plotly figure as its mimetype bundle (JupyterLab's plotly extension renders it; the
    text fallback keeps headless runs quiet). plotly's own ``show`` may pick the "browser" renderer in a
    kernel and block."""
    import json

    from IPython.display import display

    display({"application/vnd.plotly.v1+json": json.loads(fig.to_json()), "text/plain": f"<plotly figure: {fig.layout.title.text}>"},
            raw=True)


def _dropdown(options, value, description):
    return widgets.Dropdown(options=list(options), value=value, description=description, style={"description_width": "initial"})


def _log_slider(value, description, lo=-6, hi=2):
    return widgets.FloatLogSlider(value=max(value, 10.0**lo), base=10, min=lo, max=hi, step=0.25, description=description,
                                  continuous_update=False, style={"description_width": "initial"})


# ---------------------------------------------------------------------------------------------
class NormalisationPanel(Panel):
    """01: toggle Fix 1 / Fix 2, C_EPS, beta and the estimator; see the norms, traces and ranks of R_samp,
    R_pred, R_blend (:func:`workbench.plots.pipeline_summary`, the function behind the headless table)."""

    def __init__(self, params: NormalisationParams, preset_name: str | None = None):
        from . import plots

        self.params = params
        name = preset_name or params.preset_names[0]
        fx = preset(name).fixes
        self.batch = plots.scene_batch(params.experiment(name), params.n_scenes, params.seed)
        controls = {
            "preset": _dropdown(PRESETS, name, "preset"),
            "rsamp_normalise": widgets.Checkbox(value=fx.rsamp_normalise, description="Fix 1: normalise R_samp"),
            "rblend_trace_normalise": widgets.Checkbox(value=fx.rblend_trace_normalise, description="trace-normalise R_blend (Fix 2: off)"),
            "c_eps": _log_slider(fx.c_eps, "C_EPS"),
            "beta": widgets.FloatSlider(value=fx.beta, min=0, max=1, step=0.05, description="beta", continuous_update=False),
            "estimator": _dropdown(SAMPLE_ESTIMATORS, fx.rsamp_estimator, "R_samp estimator"),
        }
        super().__init__(controls)
        controls["preset"].observe(self._load_preset, names="value")

    def _load_preset(self, change) -> None:
        fx = preset(change["new"]).fixes
        self._hold = True
        try:
            for key, value in (("rsamp_normalise", fx.rsamp_normalise), ("rblend_trace_normalise", fx.rblend_trace_normalise),
                               ("c_eps", fx.c_eps), ("beta", fx.beta), ("estimator", fx.rsamp_estimator)):
                self.controls[key].value = value
        finally:
            self._hold = False
        self.update()

    def config(self) -> ExperimentConfig:
        v = self.values()
        return self.params.experiment(v["preset"]).replace(**{
            "fixes.rsamp_normalise": v["rsamp_normalise"], "fixes.rblend_trace_normalise": v["rblend_trace_normalise"],
            "fixes.c_eps": v["c_eps"], "fixes.beta": v["beta"], "fixes.rsamp_estimator": v["estimator"]})

    def compute(self) -> dict:
        from . import plots

        return plots.pipeline_summary(self.config(), self.batch, seed=self.params.seed)

    def describe(self, result: dict) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v['fro']:.4g}</td><td>{v['trace']:.4g}</td><td>{v['rank']:.0f}</td></tr>" for k, v in result.items())
        return f"<table class='wb-table'><tr><th>matrix</th><th>‖·‖_F</th><th>trace</th><th>rank</th></tr>{rows}</table>"

    def figure(self, result: dict):
        from . import plots

        return plots.norms_figure([{"preset": self.values()["preset"], **result}])


class SpectrumPanel(Panel):
    """02: C_EPS, beta, estimator, preset and scene; redraws the spectra (:func:`workbench.plots.spectra`)."""

    def __init__(self, params: SpectrumParams):
        from . import plots

        self.params = params
        self.batch = plots.scene_batch(params.experiment(), params.n_scenes, params.seed)
        controls = {
            "preset": _dropdown(PRESETS, params.preset, "preset"),
            "c_eps": _log_slider(params.c_eps, "C_EPS"),
            "beta": widgets.FloatSlider(value=params.beta, min=0, max=1, step=0.05, description="beta", continuous_update=False),
            "estimator": _dropdown(SAMPLE_ESTIMATORS, params.estimator, "R_samp estimator"),
            "scene": widgets.IntSlider(value=params.scene, min=0, max=params.n_scenes - 1, description="scene", continuous_update=False),
        }
        super().__init__(controls)

    def config(self) -> ExperimentConfig:
        v = self.values()
        return self.params.replace(preset=v["preset"], c_eps=v["c_eps"], beta=v["beta"], estimator=v["estimator"], scene=v["scene"]).experiment()

    def compute(self):
        from . import plots

        return plots.spectra(self.config(), self.batch, seed=self.params.seed)

    def describe(self, spec) -> str:
        s = self.controls["scene"].value
        parts = [f"{n}: rank {int(spec.rank[n][s])}, cond {float(spec.cond[n][s]):.3g}, gap {float(spec.gap[n][s]):.3g}" for n in spec.eigvals]
        return "<br>".join(parts)

    def figure(self, spec):
        from . import plots

        return plots.spectrum_figure(spec, self.controls["scene"].value)


class GradientPanel(Panel):
    """03: choose the eigen backends, the weights and C_EPS; one real forward/backward
    (:func:`workbench.diagnostics.gradient_report`, as in the headless table) and its gradient status."""

    def __init__(self, params: GradientParams):
        from . import plots
        from .model import build_model

        self.params = params
        cfg = params.experiment()
        self.batch = plots.scene_batch(cfg, params.n_scenes, params.seed)
        self.model = build_model(cfg.system, cfg.model, seed=params.seed)
        controls = {
            "gap_backend": _dropdown(GAP_BACKENDS, params.gap_backend, "gap backend"),
            "subspace_backend": _dropdown(SUBSPACE_BACKENDS, params.subspace_backend, "subspace backend"),
            "lam_gap": widgets.FloatText(value=params.lam_gap, description="lam_gap"),
            "subspace_weight": widgets.FloatText(value=params.subspace_weight, description="subspace weight"),
            "c_eps": _log_slider(params.c_eps, "C_EPS"),
        }
        controls["gap_backend"].add_class("wb-gap-backend")
        controls["subspace_backend"].add_class("wb-subspace-backend")
        super().__init__(controls)
        self.status.add_class("wb-grad-status")

    def config(self) -> ExperimentConfig:
        return self.params.replace(**self.values()).experiment()

    def compute(self) -> dict:
        from .diagnostics import gradient_report

        return gradient_report(self.config(), self.batch, self.model, seed=self.params.seed)

    @staticmethod
    def status_text(report: dict) -> str:
        """One line: 'gradient finite' or 'gradient NaN' with where it came from."""
        gn = ", ".join(f"{g} {v:.3g}" for g, v in report["grad_norm"].items())
        if report["ok"]:
            return f"gradient finite ({gn})"
        origin = "; ".join(f"{p['term']} via {p['op']} -> {','.join(p['groups'])}" for p in report["provenance"] if p.get("in_total", True))
        return f"gradient NaN ({gn}); from {origin or 'unknown'}"

    def describe(self, report: dict) -> str:
        colour = "#070" if report["ok"] else "#b00"
        rows = "".join(
            f"<tr><td>{t}</td><td>{report['terms'][t]:.4g}</td><td>{report['weights'].get(t, 0):.3g}</td>"
            + "".join(f"<td>{v:.3g}</td>" for v in report["term_grad_norm"][t].values()) + "</tr>"
            for t in report["term_grad_norm"]
        )
        groups = "".join(f"<th>∇ {g}</th>" for g in report["grad_norm"])
        return (f"<b class='wb-grad-line' style='color:{colour}'>{html.escape(self.status_text(report))}</b>"
                f"<table class='wb-table'><tr><th>term</th><th>value</th><th>weight</th>{groups}</tr>{rows}</table>")


class TrainingPanel(Panel):
    """04: pick a preset, epochs and learning rate, press *train*: a short :func:`workbench.train.fit` run
    (the headless cell's function) and its curves."""

    def __init__(self, params: TrainingParams):
        self.params = params
        controls = {
            "preset": _dropdown(PRESETS, params.preset_names[0], "preset"),
            "epochs": widgets.IntSlider(value=params.epochs, min=1, max=max(50, params.epochs), description="epochs", continuous_update=False),
            "lr": _log_slider(params.lr, "lr", -5, 0),
        }
        super().__init__(controls, auto=False)
        self.button = widgets.Button(description="train", button_style="primary")
        self.button.on_click(lambda _: self.update())
        self.widget.children = (widgets.HBox([*controls.values(), self.button]), self.status, self.image)

    def config(self) -> ExperimentConfig:
        v = self.values()
        return self.params.replace(epochs=v["epochs"], lr=v["lr"]).experiment(v["preset"])

    def compute(self) -> dict:
        from . import train

        return train.verify(self.config(), progress=False)

    def describe(self, run: dict) -> str:
        last = run["history"][-1]
        checks = " ".join(f"{'✔' if c['passed'] else '✘'} {html.escape(c['name'])}" for c in run["checks"])
        return f"final train loss {last['train_loss']:.4g}, val NMSE {last['val_nmse']:.4g}; {checks}"

    def figure(self, run: dict):
        from . import plots

        return plots.training_figure({self.values()["preset"]: run["history"]})


class LocalisationPanel(Panel):
    """05: method, one SNR and the R_samp estimator; runs :func:`workbench.estimators.localisation_vs_snr`
    (the headless cell's function) at that SNR and shows RMSE, F1 and sqrt(CRB)."""

    def __init__(self, params: LocalisationParams):
        self.params = params
        controls = {
            "method": _dropdown(("music", "mvdr"), params.method, "method"),
            "snr_db": widgets.FloatSlider(value=params.snr_values[-1], min=-10, max=30, step=5, description="SNR dB", continuous_update=False),
            "estimator": _dropdown(SAMPLE_ESTIMATORS, (params.estimator_names or ["seed"])[0], "R_samp estimator"),
        }
        super().__init__(controls)

    def compute(self) -> dict:
        from . import estimators, plots

        v = self.values()
        p = self.params.replace(method=v["method"], snrs_db=str(v["snr_db"]), estimators=v["estimator"])
        cfg = p.experiment()
        return estimators.localisation_vs_snr(cfg.system, p.snr_values, p.n_per_snr, plots.localisation_sources(cfg, p.estimator_names),
                                              method=p.method, seed=p.seed, use_true_k=p.use_true_k)

    def describe(self, res: dict) -> str:
        crb = res["sqrt_crb"]
        rows = "".join(f"<tr><td>{n}</td><td>{m['rmse_phi_deg'][0]}</td><td>{m['rmse_theta_deg'][0]}</td><td>{m['rmse_r_m'][0]}</td>"
                       f"<td>{m['f1'][0]}</td></tr>" for n, m in res["covariances"].items())
        return (f"<table class='wb-table'><tr><th>covariance</th><th>RMSE φ °</th><th>RMSE θ °</th><th>RMSE r m</th><th>F1</th></tr>{rows}"
                f"<tr><td>sqrt(CRB)</td><td>{crb['phi_deg'][0]}</td><td>{crb['theta_deg'][0]}</td><td>{crb['r_m'][0]}</td><td></td></tr></table>")


# ---------------------------------------------------------------------------------------------
# 06: Optuna sweep
_SWEEP_CI_SPACE = {"fixed": {"fixes.qr_retraction": True},  # a rank-K_max projector: exactly degenerate eigenvalues
                   "params": {"fixes.subspace_backend": ["eigh", "safe"], "loss.subspace": [0.0, 0.1],
                              "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
_SWEEP_BAD = {"fixes.subspace_backend": "eigh", "loss.subspace": 0.1}  # eigenvector gradients through a degenerate spectrum


def _to_json(obj: Any) -> str:
    import json

    return json.dumps(obj)


def _json_arg(where: str, text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} = {text[:80]!r}: not valid JSON ({e.msg} at character {e.pos})") from e


@dataclass
class SweepParams(NotebookParams):
    """06: a small Optuna sweep (:func:`workbench.sweep.run_sweep`) over fixes and hyperparameters.

    ``space``: "" (the built-in :data:`workbench.sweep.DEFAULT_SPACE`), a JSON object, or the path of a JSON/YAML
    space file. ``enqueue``: a JSON list of {knob: value} dicts run first (knobs left out are sampled), e.g. a
    configuration known to be bad. ``storage``: "" means ``sqlite:///<out_dir>/optuna.db``, so a notebook run
    never touches ``runs/optuna.db``."""

    _section: ClassVar[str] = "06_sweep"
    ci: ClassVar[dict[str, Any]] = {"trials": 4, "epochs": 1, "n_train": 16, "n_val": 8, "batch_size": 8, "width": 16, "N_side": 6,
                                    "space": _to_json(_SWEEP_CI_SPACE),
                                    "enqueue": _to_json([{**_SWEEP_BAD, "train.lr": 1e-3}, {**_SWEEP_BAD, "fixes.subspace_backend": "safe",
                                                                                            "train.lr": 1e-3}])}

    trials: int = field(default=12, metadata=_rng(1, 100_000))
    epochs: int = field(default=3, metadata=_rng(1, 100_000))
    n_train: int = field(default=256, metadata=_rng(1, 10_000_000))
    n_val: int = field(default=64, metadata=_rng(1, 10_000_000))
    batch_size: int = field(default=32, metadata=_rng(1, 65_536))
    width: int = field(default=64, metadata=_rng(8, 8192))
    N_side: int = field(default=12, metadata=_rng(2, 64))
    storage: str = ""
    study: str = "06_sweep"
    space: str = ""
    enqueue: str = '[{"fixes.subspace_backend": "eigh", "loss.subspace": 0.1}]'
    preset: str = field(default="recommended", metadata={"choices": PRESETS})
    pruner: str = field(default="median", metadata={"choices": ("median", "none")})
    seed: int = field(default=0, metadata=_rng(0, 2**31 - 1))
    out_dir: str = "runs/06_sweep"

    def _check_relations(self) -> None:
        import re

        if not self.study.strip():
            raise ConfigError(f"{self._section}.study = {self.study!r}: expected a non-empty study name")
        if self.storage and not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", self.storage):
            raise ConfigError(f"{self._section}.storage = {self.storage!r}: expected '' (an SQLite file under out_dir) or an SQLAlchemy "
                              "URL such as sqlite:///runs/optuna.db or postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB")
        self.enqueued  # noqa: B018 - validates the space and the queued configurations

    def overrides(self) -> dict[str, Any]:
        """Dotted overrides of the base config: sizes, the small network (one layer) and the RIS side."""
        return {"train.epochs": self.epochs, "train.n_train": self.n_train, "train.n_val": self.n_val, "train.batch_size": self.batch_size,
                "train.seed": self.seed, "system.N_H": self.N_side, "system.N_V": self.N_side, "model.width": self.width,
                "model.heads": 4 if self.width % 4 == 0 else 1, "model.layers": 1}

    @property
    def search_space(self):
        """The validated :class:`workbench.sweep.SearchSpace` (ConfigError names ``06_sweep.space``)."""
        from pathlib import Path

        from . import sweep

        text = self.space.strip()
        spec: Any = None
        if text.startswith("{"):
            spec = _json_arg(f"{self._section}.space", text)
        elif text:
            if not Path(text).is_file():
                raise ConfigError(f"{self._section}.space = {text!r}: neither a JSON object nor an existing space file")
            spec = text
        try:
            return sweep.load_space(spec, self.preset, self.overrides())
        except ConfigError as e:
            raise ConfigError(f"{self._section}.space: {e}") from e

    @property
    def enqueued(self) -> list[dict[str, Any]]:
        """The queued configurations, each checked against the search space (knob searched, value inside its range)."""
        from optuna.distributions import CategoricalDistribution

        where = f"{self._section}.enqueue"
        items = _json_arg(where, self.enqueue) if self.enqueue.strip() else []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigError(f"{where} = {self.enqueue[:80]!r}: expected a JSON list of {{knob: value}} objects")
        space = self.search_space
        for item in items:
            for k, v in item.items():
                d = space.params.get(k)
                if d is None:
                    raise ConfigError(f"{where}: knob {k!r} is not searched; searched: {', '.join(space.params)}")
                inside = v in d.choices if isinstance(d, CategoricalDistribution) else (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and d.low <= v <= d.high)
                if not inside:
                    raise ConfigError(f"{where}: {k} = {v!r} is outside the search space ({d})")
            space.config(item)  # the config accepts the values
        return items

    @property
    def storage_url(self) -> str:
        from pathlib import Path

        return self.storage or f"sqlite:///{(Path(self.out_dir) / 'optuna.db').resolve()}"

    def experiment(self) -> ExperimentConfig:
        return self.search_space.base

    def run(self, trials: int | None = None, verbose: bool = True):
        """Create (or resume) the study, queue :attr:`enqueued` (once: already-queued ones are skipped), run
        it until it holds ``trials`` (default ``self.trials``) finished trials, return the optuna.Study."""
        from . import sweep

        space = self.search_space
        s = sweep.create_study(space, self.storage_url, self.study, self.pruner)
        for item in self.enqueued:
            s.enqueue_trial(item, skip_if_exists=True)
        return sweep.run_sweep(space, trials=trials or self.trials, study=self.study, storage=self.storage_url, seed=self.seed,
                               pruner=self.pruner, verbose=verbose)


NOTEBOOK_PARAMS[SweepParams._section] = SweepParams


class SweepPanel(Panel):
    """06: choose the knob whose outcome fractions are shown (:func:`workbench.sweep.outcome_fractions`, as
    the headless cell), and run more trials on the same study (:meth:`SweepParams.run`, as the headless cell)."""

    def __init__(self, params: SweepParams):
        self.params = params
        knobs = list(params.search_space.params)
        controls = {
            "knob": _dropdown(["(all)", *knobs], "(all)", "knob"),
            "more": widgets.BoundedIntText(value=2, min=1, max=1000, description="more trials", style={"description_width": "initial"}),
        }
        super().__init__(controls)
        controls["more"].unobserve(self.update, names="value")  # changing the count alone recomputes nothing
        self.button = widgets.Button(description="run more trials", button_style="primary")
        self.button.on_click(lambda _: self.run_more())
        self.widget.children = (widgets.HBox([*controls.values(), self.button]), self.status, self.image)

    def study(self):
        from . import sweep

        return sweep.load_study(self.params.storage_url, self.params.study)

    def run_more(self) -> Any:
        """Run ``more`` trials beyond those already finished, then redraw."""
        from . import sweep

        done = sweep.progress_counts(self.study())["done"]
        self.params.run(done + self.controls["more"].value, verbose=False)
        return self.update()

    def compute(self) -> dict:
        from . import plots, sweep

        s = self.study()
        knob = self.controls["knob"].value
        rows = sweep.outcome_fractions(s)
        return {"summary": sweep.summarize(s), "states": plots.sweep_metrics(s)["states"],
                "rows": rows if knob == "(all)" else [r for r in rows if r["param"] == knob], "knob": None if knob == "(all)" else knob}

    def describe(self, result: dict) -> str:
        c, best = result["summary"]["counts"], result["summary"]["best"]
        line = (f"{c['done']} finished: {c['complete']} complete, {c['pruned']} pruned ({result['summary']['nonfinite']} non-finite), "
                f"{c['failed']} failed")
        if best:
            line += f"; best trial {best['number']}: val_nmse {best['value']:.4g}"
        return html.escape(line)

    def figure(self, result: dict):
        from . import plots

        return plots.outcomes_figure(result["rows"], result["knob"]) if result["rows"] else None
