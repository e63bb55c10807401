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
# # 04 · Every preset trained on the same scenes
#
# **Question.** Does a short training pass the seed note's four checks (loss finite and in range, gradients
# finite, training loss decreasing, weights changing) under each preset, and which preset learns the covariance
# best? Every preset is trained on the *same* simulated scenes, for the same number of steps, from its own
# seeded initialisation; the run folders (checkpoint and history, resumable) land in `out_dir/<preset>/`, where
# notebook 05 picks them up to localise from what each network learned.
#
# **Terms.** R_pred = A A^H, the network's covariance; validation NMSE = ‖R_pred − R_true‖²/‖R_true‖² with R_true
# trace-normalised to N (0 is perfect, 1 is what R_pred = 0 scores); the presets are the note's states
# (`seed_before`, `seed_fix1..3`, cumulative) and `recommended`. `subspace_weight` set to 0.1 turns on an
# eigenvector term under every preset: the seed presets differentiate it with plain `eigh` and show skipped
# steps. Glossary: [docs/glossary.md](../docs/glossary.md).
#
# **Time.** About 15 s with the defaults on a quiet 2-core CPU (the same sizes as `workbench compare --budget quick`);
# `n_train`, `epochs`, `width` and `N_side` are the big knobs.

# %% tags=["parameters"]
presets: str = "seed_before,seed_fix1,seed_fix2,seed_fix3,recommended"  # comma-separated presets, all trained on the same scenes
epochs: int = 3  # epochs per training
n_train: int = 128  # training scenes (the same for every preset)
n_val: int = 64  # validation scenes (held out, the same for every preset)
batch_size: int = 32  # scenes per step
lr: float | None = None  # learning rate (train.lr); None: each preset's value
subspace_weight: float | None = None  # weight of the subspace term (loss.subspace) for every preset; None: each preset's value
width: int = 32  # network width (one layer)
N_side: int = 8  # RIS side: N_side x N_side elements (at least 3)
seed: int = 0  # seed of data and models
data: str | None = None  # a dataset folder (workbench data generate / import); None: simulated scenes. Its scenes and system replace N_side
out_dir: str = "runs/04_training"  # run folders, metrics.json and figures go here (relative: under the checkout)

# %% tags=["config"]
from IPython.display import Image, Markdown, display

from workbench import experiments, figures, ui
from workbench import params as wp
from workbench.figures import compare as fig_compare
from workbench.figures import runs as fig_runs
from workbench.figures import training as fig_training
from workbench.forward import TrainingData
from workbench.io import save_metrics
from workbench.runs import diff_runs, notebook_runs, runs_root_of
from workbench.studies import compare

params = wp.from_cell("04_training", globals())
out = params.out_path
configs = experiments.entry_configs(params.preset_names, params.dotted_overrides())  # refuses presets that would see other scenes
metrics = {"notebook": "04_training", "params": params.to_dict()}
params

# %% [markdown]
# ## Train every preset
# One set of scenes for all presets (`TrainingData`), then one training per preset with a progress bar.

# %%
data = TrainingData.load(next(iter(configs.values())), params.data_path)  # simulated, or the dataset `data`
runs = experiments.train_entries(configs, data, out, reuse=False)
rows = compare.training_rows(runs)
metrics["scenes_digest"] = experiments.scenes_digest(data)
metrics["runs"] = {name: {"history": r.history, "provenance": r.provenance, **experiments.history_summary(r)} for name, r in runs.items()}
metrics["rows"] = rows
display(Markdown(figures.markdown_table(rows)))

# %% [markdown]
# ## Curves
# One figure per question. First, per epoch, the presets on shared axes (a red ring marks an epoch with skipped
# steps; a preset with no step applied is named under the title): look at whether the validation NMSE falls below 1
# and which preset gets lowest. Then the loss of every step, the gradient norms per parameter group, and each
# preset's loss terms.

# %%
histories = {n: r.history for n, r in runs.items()}
display(Image(figures.save_figure(fig_training.training_figure(histories), out / "training.png")))
display(Image(figures.save_figure(fig_training.step_figure(histories), out / "training_steps.png")))
display(Image(figures.save_figure(fig_training.gradient_norm_figure(histories), out / "gradient_norms.png")))
display(Image(figures.save_figure(fig_training.terms_figure(histories), out / "loss_terms.png")))
metrics["conclusion"] = fig_compare.training_conclusion(rows)
display(Markdown(metrics["conclusion"]))
save_metrics(out, metrics);

# %% [markdown]
# ## This run beside the previous one
# `diff_runs` (`workbench.runs`), the function behind `workbench runs diff A B`: the two latest runs of this notebook (headless
# reports' 04 folders and the panel's *train* runs below, each with its manifest; `workbench runs` lists them), their
# identity (time, commit, device), parameters and metrics side by side, only the rows that differ. To compare two
# others: `diff_runs("runs/<A>", "runs/<B>")`.

# %%
earlier = notebook_runs("04_training", runs_root_of(out))
if len(earlier) >= 2:
    display(Markdown(fig_runs.diff_markdown(diff_runs(earlier[-2]["path"], earlier[-1]["path"], only_different=True))))
else:
    display(Markdown(f"Fewer than two runs of this notebook under `{runs_root_of(out)}` yet: a headless report "
                     "(`workbench report --only 04`) or the panel's *train* below makes one."))

# %% [markdown]
# ## Explore
# Pick a preset, epochs, learning rate and subspace weight, press *train*: the panel runs the same training
# (`experiments.train_entries` on the same scenes) with a progress bar. Nothing trains until you press it.

# %%
ui.TrainingPanel(params, data=data, initial=runs)
