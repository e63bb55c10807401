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
# # 02 · Eigenvalue spectra of R_true, R_samp, R_pred and R_blend
#
# **Question.** What do the sorted eigenvalues of the pipeline's matrices look like (log scale, K marked, the
# gap lambda_K - lambda_{K+1} shaded) as C_EPS, beta and the R_samp estimator change? What are their numerical
# ranks and condition numbers, and what does diagonal loading do to the lower eigenvalues and to the gap?
#
# **Why it matters.** The gradient of an eigenvector contains 1/(lambda_i - lambda_j) for every other
# eigenvalue: where eigenvalues coincide it is infinite. R_pred = A A^H has rank at most K_max, so after loading
# by C_EPS the remaining N - K_max eigenvalues of R_blend are (nearly) equal. Terms: R_true (the sources'
# covariance, rank K), R_samp (estimated from snapshots), R_pred (network, untrained), R_blend (blend + C_EPS I);
# see [docs/glossary.md](../docs/glossary.md). Every knob left at `None` takes the chosen preset's value.
#
# **Time.** About 5 s with the defaults on a quiet 2-core CPU; `n_scenes` is the big knob.

# %% tags=["parameters"]
preset: str = "seed_fix2"  # the preset every knob below defaults to
c_eps: float | None = None  # diagonal loading of R_blend (fixes.c_eps); None: the preset's value
beta: float | None = None  # blend weight of R_samp (fixes.beta); None: the preset's value
estimator: str | None = None  # R_samp estimator: seed | ls_scatter | covariance_matching | beamscan; None: the preset's
n_scenes: int = 16  # simulated scenes
scene: int = 0  # scene drawn in the spectrum figure
c_eps_sweep: str = "0.0001,0.001,0.01,0.1,1,10"  # comma-separated C_EPS values for the loading sweep
width: int = 64  # width of the untrained network that produces R_pred (model.width)
N_side: int = 12  # RIS side: N_side x N_side elements (at least 3)
seed: int = 0  # seed of scenes and model
data: str | None = None  # a dataset folder (workbench data generate / import); None: simulated scenes. Its scenes and system replace N_side
out_dir: str = "runs/02_eigen_spectrum"  # metrics.json and figures go here (relative: under the checkout)

# %% tags=["config"]
from IPython.display import Image, Markdown, display

from workbench import figures, ui
from workbench import params as wp
from workbench.figures import pipeline as fig_pipeline
from workbench.io import save_metrics
from workbench.studies import pipeline

params = wp.from_cell("02_eigen_spectrum", globals())
out = params.out_path
cfg = params.experiment()
metrics = {"notebook": "02_eigen_spectrum", "params": params.to_dict(), "fixes": cfg.fixes.to_dict()}
params

# %%
batch = pipeline.scene_batch(cfg, params.n_scenes, params.seed, params.data_path)

# %% [markdown]
# ## Spectra
# Medians over the scenes, then one scene in detail. Look for R_true's rank (K), and for how flat R_blend's
# tail below index K is.

# %%
spec = pipeline.spectra(cfg, batch, seed=params.seed)
metrics["summary"] = spec.summary()
metrics["scene"] = {"index": params.scene, "K": int(spec.K[params.scene]),
                    "eigvals": {k: v[params.scene].tolist() for k, v in spec.eigvals.items()},
                    "rank": {k: int(v[params.scene]) for k, v in spec.rank.items()}}
metrics["K"] = spec.K.tolist()
metrics["rank"] = {k: v.tolist() for k, v in spec.rank.items()}
display(Markdown(figures.markdown_table([{"matrix": k, **v} for k, v in metrics["summary"].items()])))

# %%
display(Image(figures.save_figure(fig_pipeline.spectrum_figure(spec, params.scene), out / "spectrum.png")))
plotly_fig = fig_pipeline.spectrum_plotly(spec, params.scene)
figures.save_html(plotly_fig, out / "spectrum.html")
ui.show(plotly_fig)

# %% [markdown]
# ## Loading sweep
# Diagonal loading adds C_EPS to every eigenvalue: look for the floor rising one-for-one with C_EPS while the
# gap stays where it was.

# %%
sweep = pipeline.loading_sweep(cfg, batch, params.c_eps_values, seed=params.seed)
metrics["loading_sweep"] = sweep
display(Markdown(figures.markdown_table(sweep)))
display(Image(figures.save_figure(fig_pipeline.loading_figure(sweep), out / "loading.png")))
metrics["conclusion"] = fig_pipeline.spectrum_conclusion(spec, sweep, params.scene)
display(Markdown(metrics["conclusion"]))

# %%
save_metrics(out, metrics);

# %% [markdown]
# ## Explore
# The panel calls `pipeline.spectra` on the same scenes; it starts from the spectra above. Moving C_EPS,
# beta, the estimator or the preset recomputes (the scenes, each estimator's R_samp and the network are
# cached); moving the scene only redraws.

# %%
ui.SpectrumPanel(params, initial=spec)
