"""Writes the notebooks of this folder (without outputs) from the cell sources below.

The .ipynb files are what is committed and run; this script only keeps them uniform. Run it from the
repository root after editing a notebook's cells here: ``.venv/bin/python notebooks/generate.py``.
Every notebook: a question, a typed ``parameters`` cell, one config cell, cells that each call one
workbench function and write under ``out_dir``, then the widget panel.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import os
from IPython.display import Image, Markdown, display
from workbench import plots, ui
metrics = {"notebook": NAME, "params": params.to_dict()}"""


def notebook(name: str, question: str, parameters: str, config: str, cells: list[str | tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    out = [new_markdown_cell(question), new_code_cell(parameters.strip(), metadata={"tags": ["parameters"]}),
           new_code_cell(config.strip(), metadata={"tags": ["config"]}), new_code_cell(SETUP.replace("NAME", repr(name)))]
    for c in cells:
        out.append(new_markdown_cell(c[1]) if isinstance(c, tuple) else new_code_cell(c.strip()))
    for i, c in enumerate(out):
        c.id = f"c{i:02d}"  # stable ids: regenerating gives the same file
    nb.cells = out
    return nb


NB01 = notebook(
    "01_covariance_normalisation",
    """# 01 · Covariance normalisation: Fix 1 and Fix 2

**Question.** The seed note says R_samp was 1e5 too small (Fix 1: hermitise and trace-normalise it) and
R_blend 1e12 too large (Fix 2: stop trace-normalising the blend). What are the Frobenius norms, traces and
ranks of R_samp, R_pred and R_blend under each preset, measured on simulated scenes, and how does the
seed's Progress table compare with the measured one?""",
    """
n_scenes: int = 64  # scenes per preset (the same scenes and untrained model for every preset)
n_grad: int = 16  # scenes used for the loss and gradient columns of the measured Progress table
presets: str = "seed_before,seed_fix1,seed_fix2,seed_fix3,recommended"  # comma-separated preset names
width: int = 128  # width of the untrained network that produces R_pred (model.width)
N_side: int = 12  # RIS side: N_side x N_side elements
seed: int = 0  # seed of the simulated scenes and of the model initialisation
out_dir: str = "runs/01_covariance_normalisation"  # metrics.json and figures are written here
""",
    """
from workbench import ui
params = ui.notebook_params("01_covariance_normalisation", n_scenes=n_scenes, n_grad=n_grad, presets=presets, width=width, N_side=N_side,
                            seed=seed, out_dir=out_dir)
configs = {name: params.experiment(name) for name in params.preset_names}
params
""",
    [
        ("md", "## Norms, traces, ranks per preset\nMedians over the scenes; `R_samp_raw` is the estimator's output before Fix 1."),
        """
rows = plots.normalisation_rows(params.preset_names, params.n_scenes, params.seed, params.overrides())
metrics["rows"] = rows
display(Markdown(plots.summary_markdown(rows)))
""",
        """
display(Image(plots.save_figure(plots.norms_figure(rows), os.path.join(out_dir, "norms.png"))))
""",
        ("md", "## The seed note's Progress table beside the measured one\n`seed_note` is what the note reported;"
         " `measured` is the median over the simulated scenes (the untrained model's loss and gradients)."
         " It runs under the same `N_side` and `width` as the rest of this notebook."),
        """
from workbench import diagnostics
seed_rows = diagnostics.seed_table(params.n_scenes, params.preset_names, params.seed, n_grad=params.n_grad, overrides=params.overrides())
metrics["seed_table"] = seed_rows
metrics["seed_comparison"] = plots.seed_comparison(seed_rows)
display(Markdown(plots.markdown_table(metrics["seed_comparison"])))
display(Markdown(diagnostics.format_seed_table(seed_rows)))
""",
        """
plots.save_metrics(out_dir, metrics);
""",
        ("md", "## Explore\nToggle the fixes: the panel calls `plots.pipeline_summary`, the function behind the table above."),
        """
panel = ui.NormalisationPanel(params)
panel
""",
    ],
)

NB02 = notebook(
    "02_eigen_spectrum",
    """# 02 · Eigenvalue spectra of R_true, R_samp, R_pred and R_blend

**Question.** What do the sorted eigenvalues of the pipeline's matrices look like (log scale, K marked, the
gap lambda_K - lambda_{K+1} shaded) as C_EPS, beta and the R_samp estimator change? What are their numerical
ranks and condition numbers, and what does diagonal loading do to the lower eigenvalues and to the gap?""",
    """
preset: str = "seed_fix2"  # starting preset (fixes.*)
c_eps: float = 1.0  # diagonal loading of R_blend (fixes.c_eps)
beta: float = 0.3  # blend weight of R_samp (fixes.beta)
estimator: str = "seed"  # R_samp estimator: seed | ls_scatter | covariance_matching
n_scenes: int = 16  # simulated scenes
scene: int = 0  # scene drawn in the spectrum figure
c_eps_sweep: str = "0.0001,0.001,0.01,0.1,1,10"  # comma-separated C_EPS values for the loading sweep
width: int = 128  # width of the untrained network that produces R_pred
N_side: int = 12  # RIS side: N_side x N_side elements
seed: int = 0  # seed of scenes and model
out_dir: str = "runs/02_eigen_spectrum"  # metrics.json and figures are written here
""",
    """
from workbench import ui
params = ui.notebook_params("02_eigen_spectrum", preset=preset, c_eps=c_eps, beta=beta, estimator=estimator, n_scenes=n_scenes, scene=scene,
                            c_eps_sweep=c_eps_sweep, width=width, N_side=N_side, seed=seed, out_dir=out_dir)
cfg = params.experiment()
params
""",
    [
        """
batch = plots.scene_batch(cfg, params.n_scenes, params.seed)
""",
        ("md", "## Spectra"),
        """
spec = plots.spectra(cfg, batch, seed=params.seed)
metrics["summary"] = spec.summary()
metrics["scene"] = {"index": params.scene, "K": int(spec.K[params.scene]),
                    "eigvals": {k: v[params.scene].tolist() for k, v in spec.eigvals.items()},
                    "rank": {k: int(v[params.scene]) for k, v in spec.rank.items()}}
metrics["K"] = spec.K.tolist()
metrics["rank"] = {k: v.tolist() for k, v in spec.rank.items()}
display(Markdown(plots.markdown_table([{"matrix": k, **v} for k, v in metrics["summary"].items()])))
""",
        """
display(Image(plots.save_figure(plots.spectrum_figure(spec, params.scene), os.path.join(out_dir, "spectrum.png"))))
plotly_fig = plots.spectrum_plotly(spec, params.scene)
plots.save_html(plotly_fig, os.path.join(out_dir, "spectrum.html"))
ui.show(plotly_fig)
""",
        ("md", "## Loading sweep\nDiagonal loading adds C_EPS to every eigenvalue: the floor rises, the gap does not move."),
        """
sweep = plots.loading_sweep(cfg, batch, params.c_eps_values, seed=params.seed)
metrics["loading_sweep"] = sweep
display(Markdown(plots.markdown_table(sweep)))
display(Image(plots.save_figure(plots.loading_figure(sweep), os.path.join(out_dir, "loading.png"))))
""",
        """
plots.save_metrics(out_dir, metrics);
""",
        ("md", "## Explore\nThe panel calls `plots.spectra` on the same scenes."),
        """
panel = ui.SpectrumPanel(params)
panel
""",
    ],
)

NB03 = notebook(
    "03_nan_gradients",
    """# 03 · NaN gradients: Fix 3 and its four alternatives

**Question.** The seed disabled the eigengap loss (Fix 3) because "eigh's backward gives NaN". For each eigen
backend: what is the gap, are the per-term and per-group gradients finite, which operation made a NaN
(provenance), and does autograd agree with a float64 finite difference? Computed here: whether
eigenvalue-only gradients stay finite under heavy degeneracy, what flipping the SVD's order does to the
hinge, and which backend keeps eigenvector (subspace) terms finite.""",
    """
preset: str = "seed_fix2"  # starting preset (the state just before Fix 3)
lam_gap: float = 0.012  # eigengap hinge weight (Fix 3 set it to 0)
subspace_weight: float = 0.1  # weight of the eigenvector (subspace) term (loss.subspace)
c_eps: float = 1.0  # diagonal loading of R_blend (fixes.c_eps)
gap_backend: str = "eigh"  # eigengap backend: eigh | svd | svd_flipped | eigvalsh | finite_diff | topk
subspace_backend: str = "eigh"  # subspace backend: eigh | detach | lorentzian | safe
n_scenes: int = 8  # simulated scenes in the batch
N_side: int = 12  # RIS side: N_side x N_side elements
width: int = 64  # width of the (untrained, one-layer) network
fd_step: float = 1e-6  # finite-difference step (float64)
seed: int = 0  # seed of scenes, model and directions
out_dir: str = "runs/03_nan_gradients"  # metrics.json and figures are written here
""",
    """
from workbench import ui
params = ui.notebook_params("03_nan_gradients", preset=preset, lam_gap=lam_gap, subspace_weight=subspace_weight, c_eps=c_eps,
                            gap_backend=gap_backend, subspace_backend=subspace_backend, n_scenes=n_scenes, N_side=N_side, width=width,
                            fd_step=fd_step, seed=seed, out_dir=out_dir)
cfg = params.experiment()
params
""",
    [
        """
from workbench.model import build_model
batch = plots.scene_batch(cfg, params.n_scenes, params.seed)
model = build_model(cfg.system, cfg.model, seed=params.seed)
""",
        ("md", "## Heavy degeneracy, exactly\nR = trace-normalised R_true + C_EPS I in complex128: N - K equal eigenvalues."
         " Gradients of each backend's term with respect to R."),
        """
deg = plots.degeneracy_check(cfg, batch)
metrics["degeneracy"] = deg
display(Markdown(plots.markdown_table(deg)))
""",
        ("md", "## Float64 finite differences and the SVD flip\nOn the real R_blend;"
         " `gap` is read off each backend's hinge, `gap_eigvalsh` is computed independently."),
        """
fd = plots.fd_check(cfg, batch, params.fd_step, seed=params.seed)
metrics["fd_check"] = fd
display(Markdown(plots.markdown_table(fd)))
""",
        ("md", "## Per-backend gradient report\nOne real forward and backward of the network per backend:"
         " the term, its gradient per parameter group, and where a NaN came from."),
        """
reports = plots.backend_reports(cfg, batch, model, seed=params.seed)
metrics["backends"] = reports
display(Markdown(plots.markdown_table([{k: r[k] for k in ("kind", "backend", "term_value", "term_finite", "ok")}
                                       | {"NaN from": "; ".join(f"{p['term']}:{p['op']}" for p in r["provenance"]) or "-"} for r in reports])))
display(Image(plots.save_figure(plots.gradient_figure(reports), os.path.join(out_dir, "gradients.png"))))
""",
        """
metrics["conclusions"] = plots.gradient_conclusions(deg, fd, reports)
display(Markdown("\\n".join(f"- **{k}**: {v}" for k, v in metrics["conclusions"].items())))
plots.save_metrics(out_dir, metrics);
""",
        ("md", "## Explore\nSwitch a backend: the panel runs `diagnostics.gradient_report` (as the table above) and shows the gradient status."),
        """
panel = ui.GradientPanel(params)
panel
""",
    ],
)

NB04 = notebook(
    "04_training",
    """# 04 · Short trainings under each preset

**Question.** Under each preset, does a short training pass the seed note's four checks (loss finite and in
range, gradients finite, training loss decreasing, weights changing)? Loss curves per term, gradient-norm
traces per parameter group and parameter change per epoch.""",
    """
presets: str = "seed_before,seed_fix2,seed_fix3,recommended"  # comma-separated presets to train
epochs: int = 5  # epochs per training
n_train: int = 256  # training scenes
n_val: int = 64  # validation scenes
batch_size: int = 32  # scenes per step
lr: float = 0.001  # learning rate
width: int = 64  # network width (one layer)
N_side: int = 12  # RIS side: N_side x N_side elements
seed: int = 0  # seed of data and model
out_dir: str = "runs/04_training"  # metrics.json and figures are written here
""",
    """
from workbench import ui
params = ui.notebook_params("04_training", presets=presets, epochs=epochs, n_train=n_train, n_val=n_val, batch_size=batch_size, lr=lr,
                            width=width, N_side=N_side, seed=seed, out_dir=out_dir)
configs = {name: params.experiment(name) for name in params.preset_names}
params
""",
    [
        """
from workbench import train
runs = {name: train.verify(cfg, progress=False) for name, cfg in configs.items()}
metrics["runs"] = runs
display(Markdown(plots.markdown_table([{"preset": n, "check": c["name"], "passed": c["passed"], "detail": c["detail"]}
                                       for n, r in runs.items() for c in r["checks"]])))
""",
        """
display(Image(plots.save_figure(plots.training_figure({n: r["history"] for n, r in runs.items()}), os.path.join(out_dir, "training.png"))))
plots.save_metrics(out_dir, metrics);
""",
        ("md", "## Explore\nPick a preset and press *train*: the panel runs `train.verify`, as above."),
        """
panel = ui.TrainingPanel(params)
panel
""",
    ],
)

NB05 = notebook(
    "05_localisation",
    """# 05 · Localisation from a covariance

**Question.** How well do near-field MUSIC / MVDR locate the sources (phi, theta, r) from the exact R_true
and from each R_samp estimator, against SNR, and how far is that from the Cramer-Rao bound? (The seed's
R_samp estimator is nearly uninformative; this is where that shows.)""",
    """
method: str = "music"  # music | mvdr
snrs_db: str = "-5,0,5,10,20"  # comma-separated SNRs in dB
n_per_snr: int = 16  # scenes per SNR
estimators: str = "seed,covariance_matching"  # R_samp estimators compared with R_true
use_true_k: bool = True  # localise with the true K (else the MDL count)
N_side: int = 12  # RIS side: N_side x N_side elements
seed: int = 0  # seed of the scenes
out_dir: str = "runs/05_localisation"  # metrics.json and figures are written here
""",
    """
from workbench import ui
params = ui.notebook_params("05_localisation", method=method, snrs_db=snrs_db, n_per_snr=n_per_snr, estimators=estimators,
                            use_true_k=use_true_k, N_side=N_side, seed=seed, out_dir=out_dir)
cfg = params.experiment()
params
""",
    [
        """
from workbench import estimators as est
res = est.localisation_vs_snr(cfg.system, params.snr_values, params.n_per_snr, plots.localisation_sources(cfg, params.estimator_names),
                              method=params.method, seed=params.seed, use_true_k=params.use_true_k)
metrics["localisation"] = res
display(Markdown(plots.markdown_table([{"covariance": n, "snr_db": s, **{k: v[i] for k, v in m.items()}}
                                       for n, m in res["covariances"].items() for i, s in enumerate(res["snr_db"])])))
""",
        """
display(Image(plots.save_figure(plots.localisation_figure(res), os.path.join(out_dir, "localisation.png"))))
plots.save_metrics(out_dir, metrics);
""",
        ("md", "## Explore\nThe panel runs `estimators.localisation_vs_snr` at one SNR."),
        """
panel = ui.LocalisationPanel(params)
panel
""",
    ],
)

NB06 = notebook(
    "06_sweep",
    """# 06 · Sweeping fixes and hyperparameters with Optuna

**Question.** Which fixes and hyperparameters give the lowest validation NMSE of R_pred (unweighted, so the
searched loss weights cannot shrink it by themselves), and which knob values produce non-finite gradients or
get pruned? A configuration known to be bad (eigenvector gradients through a degenerate spectrum) is queued
first by default, so the non-finite path and its provenance are always exercised.""",
    """
trials: int = 12  # finished trials the study should hold (re-running resumes the study; a larger value extends it)
epochs: int = 3  # epochs per trial; val_nmse is reported every epoch, so the pruner can act
n_train: int = 256  # training scenes
n_val: int = 64  # validation scenes
batch_size: int = 32  # scenes per step
width: int = 64  # network width (one layer)
N_side: int = 12  # RIS side: N_side x N_side elements
storage: str = ""  # SQLAlchemy URL; empty: an SQLite file under out_dir (never runs/optuna.db)
study: str = "06_sweep"  # study name inside the storage
space: str = ""  # search space; empty: the built-in space over every fix knob; else a JSON object or a JSON/YAML file path
enqueue: str = '[{"fixes.subspace_backend": "eigh", "loss.subspace": 0.1}]'  # JSON list of configurations run first
preset: str = "recommended"  # base config (a preset named in the space wins)
pruner: str = "median"  # median | none
seed: int = 0  # seed of the sampler, the data and the models
out_dir: str = "runs/06_sweep"  # metrics.json, figures and the default study database are written here
""",
    """
from workbench import ui
params = ui.notebook_params("06_sweep", trials=trials, epochs=epochs, n_train=n_train, n_val=n_val, batch_size=batch_size, width=width,
                            N_side=N_side, storage=storage, study=study, space=space, enqueue=enqueue, preset=preset, pruner=pruner,
                            seed=seed, out_dir=out_dir)
search_space = params.search_space
params
""",
    [
        ("md", "## The sweep\n`params.run` creates (or resumes) the study, queues the `enqueue` configurations once and calls"
         " `sweep.run_sweep`. A trial with a non-finite step is pruned and keeps its NaN provenance."),
        """
import json
from workbench import sweep
study = params.run()
metrics["storage"] = sweep.mask_url(params.storage_url)
metrics["space"] = search_space.to_dict()["params"]
metrics["queued"] = params.enqueued
metrics.update(plots.sweep_metrics(study))
metrics["trials"] = sweep.trials_table(study)
display(Markdown(plots.markdown_table([{"trial": r["number"], "state": r["state"], "value": r["value"], "pruned": r["pruned_reason"] or "-",
                                        "params": json.dumps(r["params"])} for r in metrics["trials"]])))
display(Markdown(f"**Best:** {json.dumps(metrics['best'])}"))
""",
        ("md", "## Optimisation history"),
        """
plots.save_html(sweep.plot_history(study), os.path.join(out_dir, "history.html"))
display(Image(plots.save_figure(plots.history_figure(study), os.path.join(out_dir, "history.png"))))
""",
        ("md", "## Parameter importances\nPED-ANOVA (Optuna's default) over the completed trials;"
         " it needs at least two of them and a knob that varies."),
        """
metrics["importances"], metrics["importances_note"] = plots.sweep_importances(study)
if metrics["importances"] is None:
    display(Markdown(f"**No importances:** {metrics['importances_note']}."))
else:
    names = list(metrics["importances"])
    plots.save_html(plots.importances_plotly(study, names), os.path.join(out_dir, "importances.html"))
    display(Image(plots.save_figure(plots.importances_figure(study, names), os.path.join(out_dir, "importances.png"))))
""",
        ("md", "## Knobs versus outcome\nEvery finished trial, pruned and non-finite ones included (`none`: no val_nmse was reported)."),
        """
rows = plots.parallel_rows(study)
plots.save_html(plots.parallel_plotly(rows), os.path.join(out_dir, "parallel.html"))
display(Image(plots.save_figure(plots.parallel_figure(rows), os.path.join(out_dir, "parallel.png"))))
""",
        ("md", "## Pruned and non-finite trials per knob value"),
        """
plots.save_html(sweep.plot_outcomes(study), os.path.join(out_dir, "outcomes.html"))
display(Image(plots.save_figure(plots.outcomes_figure(metrics["outcome_fractions"]), os.path.join(out_dir, "outcomes.png"))))
display(Markdown(plots.markdown_table([{"trial": r["number"], "NaN from": ", ".join(r["ops"]) or "a non-finite loss",
                                        "steps": r["nonfinite_steps"], "params": json.dumps(r["params"])} for r in metrics["nonfinite"]])))
plots.save_metrics(out_dir, metrics);
""",
        ("md", "## Explore\nPick a knob to see its outcome fractions (`sweep.outcome_fractions`, as above), or run more trials on the same"
         " study (`params.run`, as above)."),
        """
panel = ui.SweepPanel(params)
panel
""",
    ],
)

NOTEBOOKS = {"01_covariance_normalisation": NB01, "02_eigen_spectrum": NB02, "03_nan_gradients": NB03, "04_training": NB04, "05_localisation": NB05,
             "06_sweep": NB06}


if __name__ == "__main__":
    for name, nb in NOTEBOOKS.items():
        nbformat.validate(nb)
        path = HERE / f"{name}.ipynb"
        path.write_text(nbformat.writes(nb) + "\n")
        print("wrote", path)
