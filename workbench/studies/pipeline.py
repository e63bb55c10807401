"""The pipeline's matrices under each preset: norms, traces, ranks, spectra, loading (notebooks 01, 02), and
the NMSE of every R_samp estimator against SNR (README table 2).

Matrices are the pipeline's (:func:`workbench.covariance.pipeline`): R_true trace-normalised to N ("R_ref"),
R_samp as the fixes make it, R_pred = A A^H of a seeded network (untrained unless given), R_blend.
Eigenvalues are real, descending, in the matrices' units (trace-N scale, dimensionless).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import SAMPLE_ESTIMATORS, ConfigError, ExperimentConfig, SystemConfig, check_choice, preset
from ..covariance import hermitise, nmse, spectrum_stats, trace_normalise
from ..estimators import normalise_rsamp
from ..forward import forward, rsamp_cache
from ..model import build_model
from ..physics import SceneBatch, simulate
from . import median, quartiles

MATRICES = ("R_true", "R_samp", "R_pred", "R_blend")
SUMMARISED = ("R_samp_raw", "R_samp", "R_pred", "R_blend")


def scene_batch(cfg: ExperimentConfig, n_scenes: int, seed: int, data: str | os.PathLike | None = None) -> SceneBatch:
    """The scenes every view of a notebook shares (CPU): ``n_scenes`` simulated with ``seed``, or, given the dataset
    folder ``data``, its first ``n_scenes`` scenes (:func:`workbench.data.load_dataset`, verified; ``cfg.system`` must
    be the dataset's, see :attr:`workbench.params.NotebookParams.data_system`). A dataset with fewer scenes fails
    naming ``n_scenes``."""
    if data is None:
        return simulate(cfg.system, n_scenes, seed=seed)
    from ..data import load_dataset

    batch = load_dataset(data, system=cfg.system)
    if n_scenes > len(batch):
        raise ConfigError(f"n_scenes = {n_scenes}: the dataset '{data}' holds only {len(batch)} scenes; lower n_scenes or add scenes")
    return batch[:n_scenes]


@dataclass
class PipelineMatrices:
    """[n,N,N] complex64 matrices of one batch under one config, plus the raw (unnormalised) R_samp and K [n]."""

    R_true: torch.Tensor
    R_samp_raw: torch.Tensor
    R_samp: torch.Tensor
    R_pred: torch.Tensor
    R_blend: torch.Tensor
    K: torch.Tensor

    def get(self, name: str) -> torch.Tensor:
        return getattr(self, name)


@torch.no_grad()
def pipeline_matrices(cfg: ExperimentConfig, batch: SceneBatch, model: torch.nn.Module | None = None, seed: int = 0,
                      R_samp_raw: torch.Tensor | None = None) -> PipelineMatrices:
    """Run the covariance pipeline of ``cfg`` on ``batch`` with ``model`` (default: an untrained model built
    from ``cfg.model`` with ``seed``). ``R_samp_raw``: the estimator's output when already computed (it
    depends only on the scenes and ``fixes.rsamp_estimator``; panels cache it). R_true is returned
    trace-normalised to N (the loss's R_ref)."""
    model = build_model(cfg.system, cfg.model, batch.y.device, seed=seed) if model is None else model
    raw = rsamp_cache(batch).raw(cfg.fixes.rsamp_estimator, cfg.system) if R_samp_raw is None else R_samp_raw
    R_samp = normalise_rsamp(raw, cfg.fixes)
    cov = forward(model, batch, R_samp, cfg, out_device=batch.y.device).cov
    return PipelineMatrices(R_true=cov.R_ref, R_samp_raw=raw, R_samp=cov.R_samp, R_pred=cov.R_pred, R_blend=cov.R_blend, K=batch.K)


def matrix_summary(R: torch.Tensor, K: torch.Tensor | None = None) -> dict[str, float]:
    """Medians over the batch of ||R||_F, Re tr R, numerical rank, condition number (and the K-gap)."""
    s = spectrum_stats(R, K)
    out = {"fro": median(s["fro"]), "trace": median(s["trace"]), "rank": median(s["rank"]), "cond": median(s["cond"])}
    if "gap" in s:
        out["gap"] = median(s["gap"])
    return out


def pipeline_summary(cfg: ExperimentConfig, batch: SceneBatch, seed: int = 0, R_samp_raw: torch.Tensor | None = None,
                     model: torch.nn.Module | None = None) -> dict[str, dict]:
    """{matrix name: :func:`matrix_summary`} for R_samp_raw, R_samp, R_pred, R_blend under ``cfg``."""
    mats = pipeline_matrices(cfg, batch, model, seed=seed, R_samp_raw=R_samp_raw)
    return {name: matrix_summary(mats.get(name), mats.K) for name in SUMMARISED}


def normalisation_rows(configs: dict[str, ExperimentConfig], n_scenes: int, seed: int = 0,
                       data: str | os.PathLike | None = None) -> list[dict]:
    """Notebook 01: for each named config, median ||.||_F, trace, rank and condition number of R_samp (raw
    and as used), R_pred and R_blend over the same ``n_scenes`` scenes and the same untrained model.
    One dict per config: {"preset": name, "config": fixes dict, "R_samp_raw": {...}, "R_samp", "R_pred", "R_blend"}.
    ``data``: a dataset folder whose scenes are used instead of simulated ones (:func:`scene_batch`)."""
    rows = []
    for name, cfg in configs.items():
        rows.append({"preset": name, "config": cfg.fixes.to_dict(), **pipeline_summary(cfg, scene_batch(cfg, n_scenes, seed, data), seed=seed)})
    return rows


# ---------------------------------------------------------------------------------------------
# 02: eigenvalue spectra and loading
@dataclass
class Spectra:
    """Descending eigenvalues [n,N] float per matrix, with K [n], and numerical rank / condition number /
    K-gap [n] per matrix."""

    eigvals: dict[str, torch.Tensor]
    rank: dict[str, torch.Tensor]
    cond: dict[str, torch.Tensor]
    gap: dict[str, torch.Tensor]
    K: torch.Tensor

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {"rank": median(self.rank[name]), "cond": median(self.cond[name]), "gap": median(self.gap[name]),
                   "lambda_max": median(self.eigvals[name][:, 0]), "lambda_min": median(self.eigvals[name][:, -1])}
            for name in self.eigvals
        }


def spectra(cfg: ExperimentConfig, batch: SceneBatch, seed: int = 0, R_samp_raw: torch.Tensor | None = None,
            model: torch.nn.Module | None = None) -> Spectra:
    """Eigen-spectra of R_true, R_samp, R_pred and R_blend of ``batch`` under ``cfg``."""
    mats = pipeline_matrices(cfg, batch, model, seed=seed, R_samp_raw=R_samp_raw)
    ev, rank, cond, gap = {}, {}, {}, {}
    for name in MATRICES:
        s = spectrum_stats(mats.get(name), mats.K)
        ev[name], rank[name], cond[name], gap[name] = s["eigvals"], s["rank"], s["cond"], s["gap"]
    return Spectra(ev, rank, cond, gap, mats.K)


def loading_sweep(cfg: ExperimentConfig, batch: SceneBatch, c_eps_values: Sequence[float], seed: int = 0,
                  R_samp_raw: torch.Tensor | None = None) -> list[dict]:
    """Effect of the diagonal loading C_EPS on R_blend's lower eigenvalues, one row per value:
    {"c_eps", "rank", "cond", "gap" (median lambda_K - lambda_{K+1}), "lower_min", "lower_max" (median over
    scenes of the smallest / largest of lambda_{K+1..N}), "lower_spread" (median (max-min)/max of them)}.
    Loading shifts every eigenvalue by C_EPS and leaves the gaps unchanged (docs/design.md, section 5)."""
    raw = rsamp_cache(batch).raw(cfg.fixes.rsamp_estimator, cfg.system) if R_samp_raw is None else R_samp_raw
    rows = []
    for c in c_eps_values:
        mats = pipeline_matrices(cfg.replace(**{"fixes.c_eps": float(c)}), batch, seed=seed, R_samp_raw=raw)
        s = spectrum_stats(mats.R_blend, mats.K)
        ev = s["eigvals"].double()
        lower = torch.arange(ev.shape[-1])[None, :] >= mats.K[:, None]
        lo_min = torch.where(lower, ev, torch.inf).amin(-1)
        lo_max = torch.where(lower, ev, -torch.inf).amax(-1)
        rows.append({"c_eps": float(c), "rank": median(s["rank"]), "cond": median(s["cond"]), "gap": median(s["gap"]),
                     "lower_min": median(lo_min), "lower_max": median(lo_max),
                     "lower_spread": median((lo_max - lo_min) / lo_max.abs().clamp_min(1e-300))})
    return rows


# ---------------------------------------------------------------------------------------------
# README table 2: the R_samp estimators
def estimator_table(system: SystemConfig | None = None, snrs: tuple[float, ...] = (0.0, 10.0, 20.0, 30.0), n: int = 64, seed: int = 0,
                    estimators: tuple[str, ...] = SAMPLE_ESTIMATORS, device: str = "cpu") -> list[dict]:
    """NMSE of each R_samp estimator against R_true at fixed SNRs, as rows of data.

    For each SNR the same ``n`` scenes are simulated (same ``seed``: geometry, channel, symbols and noise
    draws are shared, only the noise scale changes, so the SNR columns are paired). Both sides are
    hermitised and trace-normalised to N before the NMSE; "scaled_identity" is the best multiple of the
    identity (I, after normalisation) as the uninformative reference. Returns one dict per (SNR,
    estimator): snr_db, estimator, nmse_median, nmse_q25, nmse_q75, n.
    """
    system = SystemConfig() if system is None else system
    for name in estimators:
        check_choice("estimators", name, SAMPLE_ESTIMATORS)
    rows = []
    for snr in snrs:
        sys_snr = system.replace(snr_db_min=float(snr), snr_db_max=float(snr))
        batch = simulate(sys_snr, n, seed=seed, device=device)
        R_ref = trace_normalise(hermitise(batch.R_true))
        eye = torch.eye(system.N, dtype=R_ref.dtype, device=R_ref.device).expand_as(R_ref)
        results = {"scaled_identity": nmse(eye, R_ref)}
        for name in estimators:
            results[name] = nmse(rsamp_cache(batch).rsamp(name, sys_snr), R_ref)  # Fix 1: hermitised, trace N
        for name, v in results.items():
            q = quartiles(v)
            rows.append({"snr_db": float(snr), "estimator": name, "nmse_median": q["median"], "nmse_q25": q["q25"], "nmse_q75": q["q75"], "n": n})
    return rows


def preset_configs(names: Sequence[str], overrides: dict | None = None) -> dict[str, ExperimentConfig]:
    """{name: preset(name, **overrides)} in the given order."""
    return {name: preset(name, **(overrides or {})) for name in names}
