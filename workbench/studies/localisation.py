"""Notebook 05: localisation versus SNR from several covariances, beside the Cramer-Rao bound.

For each SNR the same number of scenes is simulated, every covariance source (R_true, an R_samp estimator,
a model's R_pred) is localised by MUSIC or MVDR and matched to the truth with
:func:`workbench.localisation.match_metrics`; sqrt(CRB) comes from :func:`workbench.localisation.crb_for`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..checks import check_covariance
from ..config import ConfigError, ExperimentConfig, SystemConfig, check_choice, resolve_device
from ..covariance import hermitise, sample_covariance
from ..grid import Grid
from ..localisation import COUNT_METHODS, DEFAULT_TOLERANCES, METHODS, count_sources, crb_for, localise, match_metrics, tolerances_array
from ..physics import SceneBatch, simulate


def localisation_sources(cfg: ExperimentConfig, estimators: Sequence[str]) -> dict:
    """The covariances 05 localises from, by name: "R_true" and "R_samp[<estimator>]" for each estimator,
    each a callable(batch) -> [n,N,N] complex64 (hermitised; scale is irrelevant to MUSIC/MVDR)."""
    s = cfg.system

    def samp(est):
        return lambda b: hermitise(sample_covariance(b.y, (b.H, b.codes), est, s.ridge, b.noise_var, rank=s.K_max, system=s))

    return {"R_true": lambda b: b.R_true, **{f"R_samp[{e}]": samp(e) for e in estimators}}


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def localisation_vs_snr(
    system: SystemConfig,
    snrs_db: Sequence[float],
    n_per_snr: int,
    covariances: dict[str, Callable[[SceneBatch], torch.Tensor]],
    method: str = "music",
    seed: int = 0,
    grid: Grid | None = None,
    use_true_k: bool = True,
    k_method: str = "mdl",
    n_snapshots: int | None = None,
    tolerances: dict | None = None,
    nuisance: bool = True,
    device: str = "cpu",
) -> dict:
    """RMSE, detection and counting versus SNR for several covariance sources, with sqrt(CRB).

    For each SNR s: ``n_per_snr`` scenes from ``simulate(system with snr fixed at s, seed + i)``; for each
    name, R = covariances[name](batch) [n,N,N] (e.g. ``lambda b: b.R_true``, an R_samp estimator, a
    model's R_pred) is localised by ``method`` with the true K (``use_true_k``) or the K counted by
    ``k_method``, and matched to the truth (:func:`match_metrics`). ``k_accuracy`` always scores the count
    of ``k_method`` (``n_snapshots`` default system.L, capped at system.K_max) against the true K.
    sqrt_crb: sqrt of the CRB averaged over all sources at that SNR (comparable to the RMSE over sources).
    Returns plain lists/floats (NaN as None), ready for json.dump:
    {"snr_db", "method", "n_per_snr", "tolerances", "sqrt_crb": {"phi_deg", "theta_deg", "r_m"},
     "covariances": {name: {"rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "precision", "recall", "f1",
     "k_accuracy"}}}, each a list over snrs_db.
    """
    check_choice("method", method, METHODS)
    check_choice("k_method", k_method, COUNT_METHODS)
    if isinstance(n_per_snr, bool) or not isinstance(n_per_snr, int) or n_per_snr < 1:
        raise ConfigError(f"n_per_snr = {n_per_snr!r}: expected an integer >= 1")
    if not covariances:
        raise ConfigError("covariances: expected at least one name -> callable(batch) -> R")
    tolerances_array(tolerances)  # validates
    grid = Grid.default(system) if grid is None else grid
    grid.validate(system)
    n_snap = system.L if n_snapshots is None else n_snapshots
    dev = resolve_device(device)
    keys = ("rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "precision", "recall", "f1", "k_accuracy")
    res = {name: {k: [] for k in keys} for name in covariances}
    bound = {"phi_deg": [], "theta_deg": [], "r_m": []}
    for i, snr in enumerate(snrs_db):
        sys_s = system.replace(snr_db_min=float(snr), snr_db_max=float(snr))
        batch = simulate(sys_s, n_per_snr, seed=seed + i, device=dev)
        c = crb_for(batch, sys_s, nuisance)[batch.mask]  # [sources, 3]
        rms = c.mean(0).sqrt().cpu().tolist()
        bound["phi_deg"].append(_json_float(math.degrees(rms[0])))
        bound["theta_deg"].append(_json_float(math.degrees(rms[1])))
        bound["r_m"].append(_json_float(rms[2]))
        for name, fn in covariances.items():
            R = fn(batch)
            k_hat = count_sources(check_covariance(R, name, N=sys_s.N), n_snap, k_method, k_max=system.K_max)
            est = localise(R, sys_s, grid, method, K=batch.K if use_true_k else k_hat)
            m = match_metrics(est, batch.phi, batch.theta, batch.r, batch.mask, tolerances)
            m["k_accuracy"] = (k_hat.cpu() == batch.K.cpu()).double().mean().item()
            for k in keys:
                res[name][k].append(_json_float(m[k]))
    return {
        "snr_db": [float(s) for s in snrs_db],
        "method": method,
        "n_per_snr": n_per_snr,
        "tolerances": {**DEFAULT_TOLERANCES, **(tolerances or {})},
        "sqrt_crb": bound,
        "covariances": res,
    }
