"""Honest baselines for the learning claim: what a network's R_pred must beat. Data in, rows out, no plotting.

Every baseline is a covariance source X (a callable batch -> [n,N,N]) turned into a prediction a X + c I by at
most two constants fitted on the TRAINING scenes, and scored on the VALIDATION scenes by the NMSE against the
trace-normalised R_true (:func:`workbench.covariance.nmse` against :func:`workbench.covariance.reference`),
the quantity ``train.evaluate`` reports as ``val_nmse``:

================  ====================================================  ================  ===============================
name              source X                                              fitted            oracle knowledge
================  ====================================================  ================  ===============================
identity          I                                                     c (a = 0)         none
beamscan_scaled   beamscan R_samp, hermitised, trace-normalised         a (c = 0)         the true noise variance (1)
beamscan_affine   the same                                              a and c           the true noise variance (1)
beamscan_est_     the beamscan R_samp with the noise variance estimated  a and c           none
affine            from the snapshots (``beamscan_est``)
physics_affine    sum_k p_k a_k a_k^H of the ML fit from the            a, c and the      none (K estimated by MDL);
                  snapshots (:func:`workbench.ml_fit.ml_localise`),     MDL penalty (2)   the true K with physics_K="true"
                  trace-normalised
================  ====================================================  ================  ===============================

(1) :func:`workbench.estimators.beamscan_covariance` fits the picked powers with the simulator's noise variance
(``batch.noise_var``); a receiver would have to estimate it. The R_ref of the training scenes is used by every
fit (as by the network's training). With trace-normalised R_ref (trace N) the best scaled identity is c = 1.
(2) The ML fit's count serves detection at its default penalty (:data:`workbench.ml_fit.MDL_SCALE`); a covariance
gains from weak sources that detection would not keep. So the physics baseline counts at the penalty of
:data:`PHYSICS_SCALES` whose a X + c I fits the training scenes best (:func:`physics_source` offers one candidate per
penalty, one fit per scene with its count moved by :meth:`~workbench.ml_fit.SnapshotFit.count_at`): the strongest
simple baseline, chosen without the scenes it is scored on.

Fitting and scoring need only five numbers per scene (:class:`AffineStats`), so no [n,N,N] batch is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from ..config import ConfigError, ExperimentConfig, SystemConfig
from ..covariance import nmse, reference, trace, trace_normalise
from ..estimators import oracle_knowledge
from ..forward import forward, rsamp_cache
from ..metrics import mean_interval
from ..ml_fit import mdl_penalty, ml_fit_for
from ..physics import SceneBatch

BASELINES = ("identity", "beamscan_scaled", "beamscan_affine", "beamscan_est_affine", "physics_affine")
FITTED = {"identity": (False, True), "beamscan_scaled": (True, False), "beamscan_affine": (True, True), "beamscan_est_affine": (True, True),
          "physics_affine": (True, True)}
ORACLE = {
    "identity": "none",
    "beamscan_scaled": f"{oracle_knowledge('beamscan')} (beamscan power fit)",
    "beamscan_affine": f"{oracle_knowledge('beamscan')} (beamscan power fit)",
    "beamscan_est_affine": f"{oracle_knowledge('beamscan_est')} (noise variance estimated)",
    "physics_affine": "none (K by MDL, its penalty fitted on the training scenes)",
}
# the physics baseline's candidate MDL penalties, in multiples of Rissanen's log(L) / 2 per real parameter (footnote 2)
PHYSICS_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # 0: every fit keeps K_max sources
SNR_EDGES = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0)  # the default system's SNR range in 5 dB bands


# ---------------------------------------------------------------------------------------------
# Covariance sources
def rsamp_source(system: SystemConfig, estimator: str = "beamscan") -> Callable[[SceneBatch], torch.Tensor]:
    """batch -> the estimator's R_samp, hermitised and trace-normalised to N (Fix 1), [n,N,N] complex64, read from the
    batch's R_samp cache (:func:`workbench.forward.rsamp_cache`): "beamscan" uses batch.noise_var, "beamscan_est"
    estimates it. These are the matrices :meth:`workbench.forward.TrainingData.rsamp` gives a config with that
    estimator and Fix 1."""
    return lambda b: rsamp_cache(b).rsamp(estimator, system)


def physics_source(system: SystemConfig, K: str | None = None, scales: Sequence[float] = PHYSICS_SCALES) -> Callable:
    """batch -> the ML fit's covariance sum_k p_k a_k a_k^H, trace-normalised to N, [n,N,N] complex64.
    K = "true": of batch.K sources (oracle). K = None: counted by MDL (no oracle), one matrix per penalty of ``scales``
    (multiples of Rissanen's), {scale: X}: one fit per scene, its count moved among its nested fits
    (:meth:`~workbench.ml_fit.SnapshotFit.count_at`); :func:`baseline_rows` keeps the candidate that fits the
    training scenes best (footnote 2)."""
    if K not in (None, "true"):
        raise ConfigError(f"physics_K = {K!r} is not allowed: choose None (MDL count) or 'true'")

    def source(b: SceneBatch) -> torch.Tensor | dict[float, torch.Tensor]:
        if K == "true":
            return trace_normalise(ml_fit_for(b, system, K=b.K).covariance(system))
        fit = ml_fit_for(b, system)
        return {float(x): trace_normalise(fit.covariance(system, K=fit.count_at(mdl_penalty(system, x)))) for x in scales}
    return source


def identity_source(system: SystemConfig) -> Callable[[SceneBatch], torch.Tensor]:
    """batch -> I, [n,N,N] complex64."""
    return lambda b: torch.eye(system.N, dtype=torch.complex64, device=b.y.device).expand(len(b), -1, -1)


def baseline_sources(system: SystemConfig, physics_K: str | None = None) -> dict[str, Callable[[SceneBatch], torch.Tensor]]:
    """The source X of every name in :data:`BASELINES`."""
    beamscan = rsamp_source(system, "beamscan")
    return {"identity": identity_source(system), "beamscan_scaled": beamscan, "beamscan_affine": beamscan,
            "beamscan_est_affine": rsamp_source(system, "beamscan_est"), "physics_affine": physics_source(system, physics_K)}


# ---------------------------------------------------------------------------------------------
# Fitting and scoring
@dataclass
class AffineStats:
    """Per-scene inner products that fix the NMSE of a X + c I against R (= R_ref), each [n] float64:
    xx = <X,X>, xr = <X,R>, tx = tr X, tr = tr R, rr = <R,R> with <A,B> = Re tr(A^H B); and N."""

    xx: torch.Tensor
    xr: torch.Tensor
    tx: torch.Tensor
    tr: torch.Tensor
    rr: torch.Tensor
    N: int

    @staticmethod
    def of(X: torch.Tensor, R: torch.Tensor) -> AffineStats:
        """The statistics of X [n,N,N] against R [n,N,N] (complex)."""
        inner = lambda A, B: (A.conj() * B).real.sum((-2, -1)).double()  # noqa: E731
        return AffineStats(xx=inner(X, X), xr=inner(X, R), tx=trace(X).double(), tr=trace(R).double(), rr=inner(R, R), N=R.shape[-1])

    @staticmethod
    def cat(parts: Sequence[AffineStats]) -> AffineStats:
        return AffineStats(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(AffineStats) if f.name != "N"), N=parts[0].N)

    def nmse(self, a: float, c: float) -> torch.Tensor:
        """NMSE of a X + c I against R per scene, [n]: ||a X + c I - R||^2 / ||R||^2 expanded in the statistics."""
        err = a * a * self.xx + 2 * a * c * self.tx + c * c * self.N - 2 * a * self.xr - 2 * c * self.tr + self.rr
        return err / self.rr


def source_stats(source: Callable[[SceneBatch], torch.Tensor], batch: SceneBatch, chunk: int = 64) -> AffineStats | dict:
    """:class:`AffineStats` of ``source`` against reference(batch.R_true), ``chunk`` scenes at a time; of each candidate,
    {key: AffineStats}, for a source that returns candidates {key: X} (:func:`physics_source`)."""
    parts = []
    for s in range(0, len(batch), chunk):
        b = batch[s:s + chunk]
        with torch.no_grad():
            X, R = source(b), reference(b.R_true)
            parts.append({k: AffineStats.of(v, R) for k, v in X.items()} if isinstance(X, dict) else AffineStats.of(X, R))
    if isinstance(parts[0], dict):
        return {k: AffineStats.cat([p[k] for p in parts]) for k in parts[0]}
    return AffineStats.cat(parts)


def fit_constants(stats: AffineStats, slope: bool = True, intercept: bool = True) -> tuple[float, float]:
    """(a, c) minimising the mean NMSE of a X + c I over the scenes of ``stats`` (closed form: weighted least
    squares with weights 1/||R||^2). ``slope`` False fixes a = 0, ``intercept`` False fixes c = 0."""
    if not (slope or intercept):
        return 1.0, 0.0
    w = 1.0 / stats.rr
    A = torch.stack([torch.stack([(w * stats.xx).sum(), (w * stats.tx).sum()]),
                     torch.stack([(w * stats.tx).sum(), (w * stats.N).sum()])])
    b = torch.stack([(w * stats.xr).sum(), (w * stats.tr).sum()])
    if slope and intercept:
        a, c = torch.linalg.solve(A, b).tolist()
    elif slope:
        a, c = (b[0] / A[0, 0]).item(), 0.0
    else:
        a, c = 0.0, (b[1] / A[1, 1]).item()
    return a, c


def nmse_by_snr(values: torch.Tensor, snr_db: torch.Tensor, edges: Sequence[float] = SNR_EDGES) -> list[dict]:
    """Mean of per-scene ``values`` [n] in SNR bands [edges[i], edges[i+1]) (the last band closed):
    [{"snr_lo", "snr_hi", "n", "nmse"}] (nmse None for an empty band)."""
    snr = snr_db.detach().double().cpu()
    v = values.detach().double().cpu()
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = (snr >= lo) & ((snr <= hi) if i == len(edges) - 2 else (snr < hi))
        rows.append({"snr_lo": float(lo), "snr_hi": float(hi), "n": int(sel.sum()), "nmse": float(v[sel].mean()) if sel.any() else None})
    return rows


def _row(name: str, a: float, c: float, oracle: str, val: torch.Tensor, snr_db: torch.Tensor, edges) -> dict:
    return {"predictor": name, "a": a, "c": c, "oracle": oracle, "nmse": float(val.mean()), "nmse_ci": mean_interval(val),
            "nmse_median": float(val.median()), "by_snr": nmse_by_snr(val, snr_db, edges)}


def baseline_rows(
    train: SceneBatch, val: SceneBatch, system: SystemConfig, names: Sequence[str] = BASELINES, physics_K: str | None = None,
    max_fit_scenes: int | None = None, edges: Sequence[float] = SNR_EDGES, sources: dict | None = None,
) -> list[dict]:
    """The baselines of ``names``, fitted on ``train`` (its first ``max_fit_scenes`` scenes, default all: the
    physics baseline costs about a second per scene on a loaded CPU) and scored on ``val``.
    ``sources`` overrides the covariance source of a name: a callable(batch) -> X, or a pair of precomputed
    X (train, val) [n,N,N] for the scenes of ``train`` (its first ``max_fit_scenes``) and ``val``.
    Returns one row per name: {"predictor", "a", "c", "oracle", "nmse" (mean over val), "nmse_median",
    "by_snr": :func:`nmse_by_snr`}. A source with candidates (the physics baseline counted by MDL: one matrix per
    penalty of :data:`PHYSICS_SCALES`) is scored at the candidate whose fitted a X + c I has the lowest mean NMSE on
    the fitting scenes; its row also has that candidate's key, "penalty_scale"."""
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ConfigError(f"baselines: unknown name(s) {unknown}; allowed: {list(BASELINES)}")
    srcs = {**baseline_sources(system, physics_K), **(sources or {})}
    fit_set = train if max_fit_scenes is None else train[:max_fit_scenes]
    cache: dict[int, tuple] = {}  # per source: the statistics (or each candidate's) of the fitting and scored scenes
    rows = []
    for name in names:
        src = srcs[name]
        key = id(src)  # beamscan_scaled and beamscan_affine share one source: compute it once
        if key not in cache:
            if isinstance(src, tuple):
                cache[key] = (AffineStats.of(src[0], reference(fit_set.R_true)), AffineStats.of(src[1], reference(val.R_true)))
            else:
                cache[key] = (source_stats(src, fit_set), source_stats(src, val))
        st_train, st_val = cache[key]
        extra = {}
        if isinstance(st_train, dict):  # candidates: the one whose fitted constants fit the training scenes best
            fitted = {x: st.nmse(*fit_constants(st, *FITTED[name])).mean().item() for x, st in st_train.items()}
            choice = min(fitted, key=fitted.get)
            st_train, st_val, extra = st_train[choice], st_val[choice], {"penalty_scale": choice}
        a, c = fit_constants(st_train, *FITTED[name])
        oracle = ORACLE[name] if not (name == "physics_affine" and physics_K == "true") else "true K"
        rows.append({**_row(name, a, c, oracle, st_val.nmse(a, c), val.snr_db, edges), **extra})
    return rows


@torch.no_grad()
def network_nmse(model, batch: SceneBatch, R_samp: torch.Tensor, cfg: ExperimentConfig, chunk: int = 128,
                 prior: torch.Tensor | None = None) -> torch.Tensor:
    """Per-scene NMSE [n] float64 of a trained network's R_pred (as ``train.evaluate`` computes val_nmse, unweighted,
    no fitted constant) on ``batch`` with its pipeline R_samp [n,N,N] and prior factor [n,N,K_max] (e.g.
    ``TrainingData.rsamp("val", cfg)``, ``TrainingData.prior("val", cfg)``; None: the model computes it). The network
    runs on its own device (:func:`workbench.forward.forward`); the result is on the batch's device."""
    model.eval()
    out = []
    for s in range(0, len(batch), chunk):
        b = batch[s:s + chunk]
        cov = forward(model, b, R_samp[s:s + chunk], cfg, prior=None if prior is None else prior[s:s + chunk]).cov
        out.append(nmse(cov.R_pred, cov.R_ref).double().to(b.y.device))
    return torch.cat(out)


def network_row(name: str, values: torch.Tensor, snr_db: torch.Tensor, edges: Sequence[float] = SNR_EDGES) -> dict:
    """A row like :func:`baseline_rows`' for a network's per-scene NMSE (a = 1, c = 0: nothing fitted)."""
    return _row(name, 1.0, 0.0, "as the pipeline's R_samp input", values, snr_db, edges)


def beats_every_baseline(rows: list[dict], name: str) -> dict:
    """Whether the row ``name`` has a lower NMSE than every other row, overall and in every SNR band:
    {"overall": bool, "by_snr": [bool per band], "margin": smallest (other - own) NMSE over bands}."""
    own = next(r for r in rows if r["predictor"] == name)
    others = [r for r in rows if r["predictor"] != name]
    by = []
    margin = math.inf
    for i, band in enumerate(own["by_snr"]):
        if band["nmse"] is None:
            by.append(None)
            continue
        best = min(o["by_snr"][i]["nmse"] for o in others)
        margin = min(margin, best - band["nmse"])
        by.append(band["nmse"] < best)
    return {"overall": own["nmse"] < min(o["nmse"] for o in others), "by_snr": by, "margin": margin}
