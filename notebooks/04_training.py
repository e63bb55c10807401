# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Short trainings under each preset
#
# **Question.** Under each preset, does a short training pass the seed note's four checks (loss finite and in
# range, gradients finite, training loss decreasing, weights changing)? Loss curves per term, gradient-norm
# traces per parameter group and parameter change per epoch.

# %% tags=["parameters"]
presets: str = "seed_before,seed_fix2,seed_fix3,recommended"  # comma-separated presets to train
epochs: int = 3  # epochs per training
n_train: int = 128  # training scenes (the same for every preset)
n_val: int = 32  # validation scenes
batch_size: int = 32  # scenes per step
lr: float | None = None  # learning rate (train.lr); None: the preset's value
width: int = 32  # network width (one layer)
N_side: int = 8  # RIS side: N_side x N_side elements (at least 3)
seed: int = 0  # seed of data and model
out_dir: str = "runs/04_training"  # metrics.json and figures go here (relative: under the checkout)

# %% tags=["config"]
from IPython.display import Image, Markdown, display

from workbench import figures, train, ui
from workbench import params as wp
from workbench.figures import training as fig_training
from workbench.io import save_metrics

params = wp.from_cell("04_training", globals())
out = params.out_path
configs = {name: params.experiment(name) for name in params.preset_names}
metrics = {"notebook": "04_training", "params": params.to_dict()}
params

# %%
data = train.TrainingData.simulate(next(iter(configs.values())))  # the same scenes for every preset
runs = {name: train.verify(cfg, progress=True, data=data) for name, cfg in configs.items()}
metrics["runs"] = runs
display(Markdown(figures.markdown_table([{"preset": n, "check": c["name"], "passed": c["passed"], "detail": c["detail"]}
                                         for n, r in runs.items() for c in r["checks"]])))

# %%
display(Image(figures.save_figure(fig_training.training_figure({n: r["history"] for n, r in runs.items()}), out / "training.png")))
save_metrics(out, metrics);

# %% [markdown]
# ## Explore
# Pick a preset and press *train*: the panel runs `train.verify`, as above (nothing trains until you press it).

# %%
ui.TrainingPanel(params, initial=runs)
