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
# # 05 · Localisation from a covariance
#
# **Question.** How well do near-field MUSIC / MVDR locate the sources (phi, theta, r) from the exact R_true
# and from each R_samp estimator, against SNR, and how far is that from the Cramer-Rao bound? (The seed's
# R_samp estimator is nearly uninformative; this is where that shows.)

# %% tags=["parameters"]
method: str = "music"  # music | mvdr
snrs_db: str = "-5,0,5,10,20"  # comma-separated SNRs in dB
n_per_snr: int = 8  # scenes per SNR
estimators: str = "seed,covariance_matching,beamscan"  # R_samp estimators compared with R_true
use_true_k: bool = True  # localise with the true K (else the MDL count)
N_side: int = 12  # RIS side: N_side x N_side elements (at least 3)
seed: int = 0  # seed of the scenes
out_dir: str = "runs/05_localisation"  # metrics.json and figures go here (relative: under the checkout)

# %% tags=["config"]
from IPython.display import Image, Markdown, display

from workbench import figures, ui
from workbench import params as wp
from workbench.figures import localisation as fig_localisation
from workbench.io import save_metrics
from workbench.studies import localisation

params = wp.from_cell("05_localisation", globals())
out = params.out_path
cfg = params.experiment()
metrics = {"notebook": "05_localisation", "params": params.to_dict()}
params

# %%
res = localisation.localisation_vs_snr(cfg.system, params.snr_values, params.n_per_snr,
                                       localisation.localisation_sources(cfg, params.estimator_names),
                                       method=params.method, seed=params.seed, use_true_k=params.use_true_k)
metrics["localisation"] = res
display(Markdown(figures.markdown_table([{"covariance": n, "snr_db": s, **{k: v[i] for k, v in m.items()}}
                                         for n, m in res["covariances"].items() for i, s in enumerate(res["snr_db"])])))

# %%
display(Image(figures.save_figure(fig_localisation.localisation_figure(res), out / "localisation.png")))
save_metrics(out, metrics);

# %% [markdown]
# ## Explore
# The panel runs `localisation.localisation_vs_snr` at one SNR.

# %%
ui.LocalisationPanel(params)
