"""Every figure builder of workbench.figures reads at notebook width: rendered with small inputs at the notebook dpi it
is at most 1000 px wide (the PNG as saved, tight bounding box), and no two of its text boxes (titles, axis labels, tick
labels, legend texts, annotations) overlap. Plotly builders: width from the layout (<= 1000 or autosized), no colour
bar over another subplot, the true sources' markers not white. The builders are enumerated, so a new one without
inputs here fails."""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
import pkgutil
import struct

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from workbench import figures  # noqa: E402

MAX_PX = 1000
TOUCH_PX = 2.0  # tick labels of one axis may touch by this much


# ---------------------------------------------------------------------------------------------
# small inputs, one factory per builder
def _history(n_epochs=4, steps=3, skipped=0, nan_all=False):
    hist = []
    for e in range(n_epochs):
        base = 1.0 / (e + 1)
        loss = math.nan if nan_all else base
        hist.append({"epoch": e, "train_loss": loss, "terms": {"nmse": loss, "gap": 0.0, "subspace": math.nan if nan_all else 0.01 * base},
                     "val_loss": base, "val_terms": {}, "val_nmse": 0.9 * base, "grad_norm": {"backbone": math.nan if nan_all else 2.0 * base,
                                                                                                "head": math.nan if nan_all else base},
                     "param_change": 0.0 if nan_all else 0.1 * base, "lr": 1e-3, "steps": steps, "skipped_nonfinite": steps if nan_all else skipped,
                     "skipped_scaler": 0, "seconds": 0.1,
                     "step_loss": [None if nan_all else base * (1 + 0.1 * s) for s in range(steps)]})
    return hist


def _histories():
    return {"seed_before": _history(skipped=1), "seed_fix2": _history(nan_all=True), "seed_fix3": _history(), "recommended": _history(),
            "long_preset_name_x": _history()}


def _gradient_rows():
    groups = {"backbone": 1.0, "head": 0.5, "k_head": 0.0}
    rows = []
    for kind, backends in (("gap", ("eigvalsh", "eigh", "svd", "svd_flipped")), ("subspace", ("eigh", "safe", "qr_projector"))):
        for b in backends:
            norms = {g: (math.nan if (kind == "subspace" and b == "eigh") else v) for g, v in groups.items()}
            rows.append({"kind": kind, "backend": b, "term_grad_norm": norms, "hinge_active": False if kind == "gap" else None})
    return rows


def _loc_result():
    snr = [0.0, 10.0, 20.0]
    names = ["R_true", "R_samp[seed]", "R_samp[beamscan]", "physics[ML]", "seed_fix2:R_pred", "recommended:R_pred", "recommended:R_blend"]

    def stat(v):
        return {"value": v, "lo": 0.8 * v, "hi": 1.3 * v}

    def per_snr(scale):
        return [{k: stat(scale * (3 - i)) for k in ("nerr_phi", "nerr_theta", "nerr_r", "rmse_phi_deg", "rmse_theta_deg", "rmse_r_m")}
                | {k: stat(0.1 * i) for k in ("miss_rate", "false_alarm_rate", "k_accuracy")} for i in range(3)]

    cov = {}
    per = {}
    for j, n in enumerate(names):
        scale = 1e-6 if n == "R_true" else 1.0 + j
        cov[n] = {"rmse_phi_deg": [scale * 3, scale * 2, scale], "rmse_theta_deg": [scale * 2, scale, scale / 2],
                  "rmse_r_m": [scale, None, scale / 3],
                  "f1": [0.5, 0.8, 1.0], "k_accuracy": [0.3, 0.6, 0.9]}
        per[n] = {"true_k": per_snr(scale), "own_k": per_snr(scale)}
    return {"snr_db": snr, "method": "music", "n_per_snr": 4, "use_true_k": True, "gate": 3.0,
            "sqrt_crb": {"phi_deg": [1.0, 0.3, 0.1], "theta_deg": [1.0, 0.3, 0.1], "r_m": [0.5, 0.2, 0.05]},
            "per_source": per, "covariances": cov}


def _spectrum_view():
    import numpy as np

    phi, theta, r = np.linspace(-60, 60, 13), np.linspace(-30, 30, 7), np.geomspace(1, 20, 9)
    return {"name": "recommended:R_pred", "method": "music", "snr_db": 20.0, "scene": 0, "K": 2, "K_used": 2,
            "phi_deg": phi.tolist(), "theta_deg": theta.tolist(), "r_m": r.tolist(),
            "map_db": (-30 * np.random.default_rng(0).random((7, 13))).tolist(), "cut_db": (-10 * np.random.default_rng(1).random(9)).tolist(),
            "at": {"phi_deg": 10.0, "theta_deg": 5.0, "r_m": 4.0},
            "true": [{"phi_deg": 10.0, "theta_deg": 5.0, "r_m": 4.0}, {"phi_deg": -20.0, "theta_deg": 0.0, "r_m": 8.0}],
            "estimated": [{"phi_deg": 11.0, "theta_deg": 5.0, "r_m": 4.2}]}


_CACHE: dict = {}


def _spectra():
    if "spectra" not in _CACHE:
        from workbench.config import preset
        from workbench.studies import pipeline

        cfg = preset("seed_fix2").replace(**{"system.N_H": 4, "system.N_V": 4, "model.width": 16, "model.heads": 4})
        _CACHE["spectra"] = pipeline.spectra(cfg, pipeline.scene_batch(cfg, 2, 0))
    return _CACHE["spectra"]


def _norm_rows():
    from workbench.studies.pipeline import SUMMARISED

    return [{"preset": p, **{m: {"fro": 10.0 ** (j - i), "trace": 36.0, "rank": 36.0 - i, "cond": 1e3} for j, m in enumerate(SUMMARISED)}}
            for i, p in enumerate(("seed_before", "seed_fix1", "seed_fix2", "seed_fix3", "recommended"))]


def _loading_rows():
    return [{"c_eps": c, "lower_min": c + 1e-4, "lower_max": c + 1e-2, "gap": 3.0, "cond": 1e2 / c} for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)]


def _study():
    if "study" not in _CACHE:
        from optuna.distributions import CategoricalDistribution, FloatDistribution
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name="t", direction="minimize")
        dist = {"fixes.subspace_backend": CategoricalDistribution(["eigh", "safe"]), "loss.subspace": CategoricalDistribution([0.0, 0.1]),
                "train.lr": FloatDistribution(1e-4, 1e-2, log=True)}
        for i in range(8):
            params = {"fixes.subspace_backend": ["eigh", "safe"][i % 2], "loss.subspace": [0.0, 0.1][(i // 2) % 2], "train.lr": 1e-4 * 1.8 ** i}
            state = TrialState.PRUNED if i in (1, 5) else TrialState.FAIL if i == 6 else TrialState.COMPLETE
            attrs = {"pruned_reason": "nonfinite"} if i == 1 else {}
            study.add_trial(create_trial(params=params, distributions=dist, state=state,
                                         value=0.5 + 0.01 * i if state == TrialState.COMPLETE else None,
                                         intermediate_values={0: 0.9} if state == TrialState.PRUNED else {}, user_attrs=attrs))
        _CACHE["study"] = study
    return _CACHE["study"]


def _rows():
    from workbench.studies.sweeps import parallel_rows

    return parallel_rows(_study())


def _fractions():
    from workbench.studies.sweeps import outcome_fractions

    return outcome_fractions(_study())


PARAMS = ["fixes.subspace_backend", "loss.subspace", "train.lr"]

def _localiser_view() -> dict:
    """A :func:`workbench.studies.localiser.localiser_scene` result: a 31 x 21 (phi x theta) grid with two peaks."""
    import numpy as np

    phi, theta = np.linspace(-60, 60, 31), np.linspace(-40, 40, 21)
    P, T = np.meshgrid(phi, theta)
    heat = np.exp(-((P - 20) ** 2 + (T - 10) ** 2) / 50) + 0.6 * np.exp(-((P + 30) ** 2 + T ** 2) / 50)
    pts = [{"phi_deg": 20.0, "theta_deg": 10.0, "r_m": 2.0}, {"phi_deg": -30.0, "theta_deg": 0.0, "r_m": 4.0}]
    return {"snr_db": 20.0, "K": 2, "K_localiser": 2, "K_ml": 1, "phi_deg": phi.tolist(), "theta_deg": theta.tolist(),
            "spectrum_db": (10 * np.log10(heat + 1e-3)).tolist(), "heat": heat.tolist(), "localiser": pts, "ml": pts[:1], "true": pts}


def _localiser_result() -> dict:
    """A :func:`workbench.studies.localiser.localiser_vs_ml` result with its count's frontier at two SNRs: the README's
    test-split file."""
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / "results" / "localiser_test0.json").read_text())


INPUTS = {
    "pipeline.norms_figure": lambda: ((_norm_rows(),), {}),
    "pipeline.spectrum_figure": lambda: ((_spectra(), 0), {}),
    "pipeline.spectrum_plotly": lambda: ((_spectra(), 0), {}),
    "pipeline.loading_figure": lambda: ((_loading_rows(),), {}),
    "gradients.gradient_figure": lambda: ((_gradient_rows(),), {}),
    "training.training_figure": lambda: ((_histories(),), {}),
    "training.gradient_norm_figure": lambda: ((_histories(),), {}),
    "training.terms_figure": lambda: ((_histories(),), {}),
    "training.step_figure": lambda: ((_histories(),), {}),
    "localisation.localisation_figure": lambda: ((_loc_result(),), {}),
    "localisation.normalised_error_figure": lambda: ((_loc_result(),), {}),
    "localisation.detection_figure": lambda: ((_loc_result(),), {}),
    "localisation.spectrum_plotly": lambda: ((_spectrum_view(),), {}),
    "localiser.localiser_scene_figure": lambda: ((_localiser_view(),), {}),
    "localiser.frontier_figure": lambda: ((_localiser_result(),), {}),
    "sweeps.history_figure": lambda: ((_study(),), {}),
    "sweeps.history_plotly": lambda: ((_study(),), {}),
    "sweeps.importances_figure": lambda: ((_study(), PARAMS), {"note": "PED-ANOVA over 6 completed trials, 3 varying knob(s)"}),
    "sweeps.importances_plotly": lambda: ((_study(), PARAMS), {}),
    "sweeps.parallel_figure": lambda: ((_rows(),), {}),
    "sweeps.parallel_plotly": lambda: ((_rows(),), {}),
    "sweeps.outcomes_figure": lambda: ((_fractions(),), {}),
    "sweeps.outcomes_plotly": lambda: ((_fractions(),), {}),
}


def builders() -> dict[str, object]:
    """Every public function of a workbench.figures module that returns a matplotlib Figure (annotation) or a plotly
    figure (name ending in ``_plotly``)."""
    out = {}
    for mod in pkgutil.iter_modules(figures.__path__):
        m = importlib.import_module(f"workbench.figures.{mod.name}")
        for name, fn in inspect.getmembers(m, inspect.isfunction):
            if name.startswith("_") or fn.__module__ != m.__name__:
                continue
            ret = inspect.signature(fn).return_annotation
            if "Figure" in str(ret) or name.endswith("_plotly"):
                out[f"{mod.name}.{name}"] = fn
    return out


def test_every_builder_has_inputs_here():
    missing = sorted(set(builders()) - set(INPUTS))
    assert not missing, f"figure builders without inputs in tests/test_figures.py: {missing}"
    stale = sorted(set(INPUTS) - set(builders()))
    assert not stale, f"inputs for builders that do not exist: {stale}"


# ---------------------------------------------------------------------------------------------
# the checks
def png_width(fig: Figure) -> int:
    """Width in pixels of the PNG the notebooks save (figures.png_bytes: tight bounding box at figures.DPI)."""
    data = figures.png_bytes(fig, figures.DPI)
    return struct.unpack(">I", data[16:20])[0]


def text_boxes(fig: Figure) -> list[tuple[str, str, object]]:
    """(owner, text, bbox) of every drawn, non-empty text of the figure; owner tells tick labels of one axis apart."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []

    def add(owner, t):
        if t is not None and t.get_visible() and t.get_text().strip():
            out.append((owner, t.get_text(), t.get_window_extent(renderer)))

    if fig._suptitle is not None:
        add("suptitle", fig._suptitle)
    for i, t in enumerate(fig.texts):
        if t is not fig._suptitle:
            add(f"fig-text-{i}", t)
    for leg in fig.legends:
        add("fig-legend", leg.get_title())
        for t in leg.get_texts():
            add("fig-legend", t)
    for k, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        for t in (ax.title, ax._left_title, ax._right_title):
            add(f"ax{k}-title", t)
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            add(f"ax{k}-{name}label", axis.label)
            add(f"ax{k}-{name}offset", axis.get_offset_text())
            for tick in axis._update_ticks():
                for lab in (tick.label1, tick.label2):
                    if lab.get_visible() and tick.get_visible():
                        add(f"ax{k}-{name}ticks", lab)
        for i, t in enumerate(ax.texts):
            add(f"ax{k}-text-{i}", t)
        leg = ax.get_legend()
        if leg is not None:
            add(f"ax{k}-legend", leg.get_title())
            for t in leg.get_texts():
                add(f"ax{k}-legend", t)
    return out


def overlaps(fig: Figure) -> list[str]:
    found = []
    for (o1, t1, b1), (o2, t2, b2) in itertools.combinations(text_boxes(fig), 2):
        w = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
        h = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
        limit = TOUCH_PX if (o1 == o2 and o1.endswith("ticks")) else 0.5
        if w > limit and h > limit:
            found.append(f"{o1}:{t1!r} / {o2}:{t2!r} ({w:.0f}x{h:.0f} px)")
    return found


def _build(key):
    mod, name = key.split(".")
    fn = getattr(importlib.import_module(f"workbench.figures.{mod}"), name)
    args, kwargs = INPUTS[key]()
    return fn(*args, **kwargs)


MPL = sorted(k for k in INPUTS if not k.endswith("_plotly"))
PLOTLY = sorted(k for k in INPUTS if k.endswith("_plotly"))


@pytest.mark.parametrize("key", MPL)
def test_matplotlib_figure_reads_at_notebook_width(key):
    fig = _build(key)
    figs = fig if isinstance(fig, list) else [fig]
    for f in figs:
        assert isinstance(f, Figure)
        meta = figures.describe(f)  # what the report's check reads: a title and labelled axes
        assert meta["title"] and all(a["xlabel"] and a["ylabel"] for a in meta["axes"]), (key, meta)
        bad = overlaps(f)
        width = png_width(f)  # closes the figure
        assert width <= MAX_PX, f"{key}: {width} px wide at dpi {figures.DPI}"
        assert not bad, f"{key}: overlapping text: {bad[:5]}"
    plt.close("all")


def _domains(fig):
    lay = fig.layout
    return {k: tuple(lay[k].domain) for k in lay if k.startswith("xaxis") and lay[k].domain is not None}


@pytest.mark.parametrize("key", PLOTLY)
def test_plotly_figure_reads_at_notebook_width(key):
    fig = _build(key)
    width = fig.layout.width
    assert width is None or width <= MAX_PX, f"{key}: layout width {width}"
    domains = _domains(fig)
    for tr in fig.data:
        bar = getattr(tr, "colorbar", None) if tr.type in ("heatmap", "contour") else None
        if bar is None or getattr(tr, "showscale", True) is False:
            continue
        x = bar.x if bar.x is not None else 1.02
        own = "xaxis" + (tr.xaxis[1:] if tr.xaxis and tr.xaxis != "x" else "")
        for name, (lo, hi) in domains.items():
            if name != own:
                assert not (lo <= x <= hi), f"{key}: colour bar at x={x} over {name} ({lo}, {hi})"
    for tr in fig.data:
        if tr.type == "scatter" and tr.name and "true" in tr.name:
            colour = str(tr.marker.color).lower()
            assert colour not in ("white", "#fff", "#ffffff", "rgb(255,255,255)"), f"{key}: true sources drawn {colour}"


# ---------------------------------------------------------------------------------------------
# what the reworked figures show
def test_spectrum_label_and_floor():
    """02: R_pred and R_blend are not in trace-N units; eigenvalues below N eps max are 'at the floor', not drawn as spectrum."""
    from workbench.figures import pipeline as fp

    fig = fp.spectrum_figure(_spectra(), 0)
    ax = fig.axes[0]
    assert "trace-N" not in ax.get_ylabel()
    N = _spectra().eigvals["R_true"].shape[-1]
    for line in ax.get_lines():
        ys = [y for y in line.get_ydata() if math.isfinite(y)]
        if ys and line.get_label().startswith("R_"):
            assert min(ys) >= max(ys) * N * torch.finfo(torch.float32).eps * 0.999 or len(ys) == 1
    plt.close(fig)


def test_localisation_reference_does_not_flatten_the_rest():
    """05: R_true at 1e-6 does not stretch the normalised-error axis over many decades, and the error bars are drawn."""
    from workbench.figures import localisation as fl

    fig = fl.normalised_error_figure(_loc_result())
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            lo, hi = ax.get_ylim()
            assert hi / lo < 1e4, (ax.get_title(), lo, hi)
    assert any(c.__class__.__name__ == "LineCollection" for ax in fig.axes for c in ax.collections)  # error bars
    assert [ax.get_title() for ax in fig.axes[:3]] == ["φ", "θ", "r"]  # the columns are named
    plt.close(fig)


def test_training_figure_of_an_all_skipped_run_says_so():
    from workbench.figures import training as ft

    fig = ft.training_figure({"seed_fix2": _history(nan_all=True)})
    texts = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
    assert "no step applied" in texts
    plt.close(fig)
