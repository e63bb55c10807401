# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Sweeping fixes and hyperparameters with Optuna
#
# **Question.** Which fixes and hyperparameters give the lowest validation NMSE of R_pred (unweighted, so the
# searched loss weights cannot shrink it by themselves), and which knob values produce non-finite gradients or
# get pruned? A configuration known to be bad (eigenvector gradients through a degenerate spectrum) is queued
# first by default, so the non-finite path and its provenance are always exercised.
#
# **Terms.** A trial trains one configuration drawn from the search space and reports the validation NMSE
# of R_pred after every epoch; the median pruner stops trials that are worse than the median so far. A trial
# with a non-finite training step is pruned and keeps where the NaN came from (its provenance). Knob names are
# config fields (`fixes.*`, `loss.*`, `train.*`); see [docs/glossary.md](../docs/glossary.md).
#
# **Time.** About 15 s with the defaults on a quiet 2-core CPU (6 trials of 2 epochs on an 8 x 8 RIS); `trials`,
# `epochs`, `n_train` and `N_side` are the big knobs. Re-running resumes the study instead of starting again.

# %% tags=["parameters"]
trials: int = 6  # finished trials the study should hold (re-running resumes the study; a larger value extends it)
epochs: int = 2  # epochs per trial; val_nmse is reported every epoch, so the pruner can act
n_train: int = 64  # training scenes
n_val: int = 32  # validation scenes
batch_size: int = 32  # scenes per step
width: int = 32  # network width (one layer)
N_side: int = 8  # RIS side: N_side x N_side elements (at least 3)
storage: str = ""  # SQLAlchemy URL; empty: an SQLite file under out_dir (never runs/optuna.db)
study: str = "06_sweep"  # study name inside the storage
space: str = ""  # search space; empty: the built-in space over every fix knob; else a JSON object or a JSON/YAML file path
enqueue: str = '[{"fixes.subspace_backend": "eigh", "loss.subspace": 0.1}]'  # JSON list of configurations run first
preset: str = "recommended"  # base config (a preset named in the space wins)
pruner: str = "median"  # median | none
seed: int = 0  # seed of the sampler, the data and the models
data: str | None = None  # a dataset folder (workbench data generate / import); None: simulated scenes. Its scenes and system replace N_side
out_dir: str = "runs/06_sweep"  # metrics.json, figures and the default study database go here

# %% tags=["config"]
import json

from IPython.display import Image, Markdown, display

from workbench import figures, sweep, ui
from workbench import params as wp
from workbench.figures import sweeps as fig_sweeps
from workbench.io import save_metrics
from workbench.studies import sweeps

params = wp.from_cell("06_sweep", globals())
out = params.out_path
search_space = params.search_space
metrics = {"notebook": "06_sweep", "params": params.to_dict()}
params

# %% [markdown]
# ## The sweep
# `sweep.run_sweep` creates (or resumes) the study, queues the `enqueue` configurations once and runs the
# trials. A trial with a non-finite step is pruned and keeps its NaN provenance.

# %%
study = sweep.run_sweep(search_space, trials=params.trials, study=params.study, storage=params.storage_url, seed=params.seed,
                        pruner=params.pruner, enqueue=params.enqueued, data=params.data_path)
metrics["storage"] = sweep.mask_url(params.storage_url)
metrics["space"] = search_space.to_dict()["params"]
metrics["queued"] = params.enqueued
metrics.update(sweeps.sweep_metrics(study))
metrics["trials"] = sweep.trials_table(study)
display(Markdown(figures.markdown_table([{"trial": r["number"], "state": r["state"], "value": r["value"],
                                          "pruned": r["pruned_reason"] or "-", "params": json.dumps(r["params"])}
                                         for r in metrics["trials"]])))

# %% [markdown]
# ## Optimisation history
# The validation NMSE of each completed trial and the best so far: look for whether the search is still improving.

# %%
figures.save_html(fig_sweeps.history_plotly(study), out / "history.html")
display(Image(figures.save_figure(fig_sweeps.history_figure(study), out / "history.png")))

# %% [markdown]
# ## Parameter importances
# PED-ANOVA (Optuna's default) over the completed trials; it needs at least two of them and a knob that varies.
# With a handful of trials these are rough: the title says how many trials they rest on.

# %%
metrics["importances"], metrics["importances_note"] = sweeps.sweep_importances(study)
if metrics["importances"] is None:
    display(Markdown(f"**No importances:** {metrics['importances_note']}."))
else:
    names = list(metrics["importances"])
    figures.save_html(fig_sweeps.importances_plotly(study, names), out / "importances.html")
    display(Image(figures.save_figure(fig_sweeps.importances_figure(study, names, metrics["importances_note"]), out / "importances.png")))

# %% [markdown]
# ## Knobs versus outcome
# Every finished trial, pruned and non-finite ones included (`none`: no val_nmse was reported). Look for knob
# values whose lines all end in red (non-finite).

# %%
rows = sweeps.parallel_rows(study)
figures.save_html(fig_sweeps.parallel_plotly(rows), out / "parallel.html")
display(Image(figures.save_figure(fig_sweeps.parallel_figure(rows), out / "parallel.png")))

# %% [markdown]
# ## Pruned and non-finite trials per knob value
# Hatched bars rest on few trials or on a value that was always paired with another knob's value, so their
# outcome cannot be blamed on that knob alone; the caveat is written under the panel.

# %%
figures.save_html(fig_sweeps.outcomes_plotly(metrics["outcome_fractions"]), out / "outcomes.html")
display(Image(figures.save_figure(fig_sweeps.outcomes_figure(metrics["outcome_fractions"]), out / "outcomes.png")))
display(Markdown(figures.markdown_table([{"trial": r["number"], "NaN from": ", ".join(r["ops"]) or "a non-finite loss",
                                          "steps": r["nonfinite_steps"], "params": json.dumps(r["params"])} for r in metrics["nonfinite"]])))

# %% [markdown]
# ## What this sweep says

# %%
metrics["conclusion"] = fig_sweeps.sweep_conclusion(metrics)
display(Markdown(metrics["conclusion"]))
save_metrics(out, metrics);

# %% [markdown]
# ## Explore
# Pick a knob to see its outcome fractions (`sweeps.outcome_fractions`, as above), or run more trials on the same
# study (`sweep.run_sweep`, as above).

# %%
ui.SweepPanel(params)
