"""Scoring estimated sources against the truth: matching, per-source normalised errors, detection rates, intervals.

Owns: the matching of estimates to true sources, every localisation statistic the studies report, and their
bootstrap intervals. Must not: estimate, compute the bound (:mod:`workbench.likelihood` gives the CRB), simulate or
loop over SNRs (the studies do), draw.

Two families:

* **Per-source scores** (:func:`score_sources`, the statistics of :data:`STATISTICS`): every source is measured
  against its own Cramer-Rao bound CRB_k (rad^2, rad^2, m^2 for phi, theta, r). Estimates are matched to true sources
  by the Hungarian algorithm on the normalised squared error sum_c err_c^2 / v_kc with v_kc = max(CRB_kc, floor_c^2),
  so the assignment is free of units (the *pairs*: errors over all of them are what peers report as RMSE). A pair is
  *inside the gate* when every |err_c| <= gate * max(sqrt(CRB_kc), floor_c) (gate 3, floor one grid step: the
  resolution a gridded estimator has anyway); the *detections* are the largest set of one-to-one pairs inside the gate
  (a second assignment, gate first, then the least error: the least-error assignment alone can pair an estimate that
  sits on one source with another and count both as missed, as GOSPA's cut-off does not). True sources without a
  detection are misses, estimates that are not detections are false alarms. Statistics are ratios of
  per-scene sums, so a bootstrap over scenes (:func:`summarise`) gives their intervals.
* **Fixed tolerances** (:func:`match_metrics`, notebook 05's F1 at 5 deg / 5 deg / 1 m): kept for the notebooks' tables.

Radians and metres inside; the names of degree-valued statistics end in ``_deg``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .config import ConfigError

GATE_SIGMAS = 3.0  # a detection lies within this many sqrt(CRB_k) of its source, in every coordinate
STATISTICS = ("rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "nerr_phi", "nerr_theta", "nerr_r", "nerr_hit_phi", "nerr_hit_theta",
              "nerr_hit_r", "miss_rate", "false_alarm_rate", "k_accuracy")


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


@dataclass
class SourceScores:
    """Per-scene sums [B] (numpy) from which every statistic is a ratio over a set of scenes.

    n_true, n_pred: true and estimated sources; n_pair: Hungarian pairs (min of the two); n_hit: pairs inside the gate
    (detections); sq_err [B,3]: sum over pairs of the squared error (rad^2, rad^2, m^2); sq_norm [B,3]: sum over pairs
    of err^2 / CRB_k; hit_sq_norm [B,3]: the same over detections; k_ok: the estimated count equals the true K;
    detected [B,T] bool: true source slot t was detected (False in padded slots; :func:`miss_rate_by` bins it)."""

    n_true: np.ndarray
    n_pred: np.ndarray
    n_pair: np.ndarray
    n_hit: np.ndarray
    sq_err: np.ndarray
    sq_norm: np.ndarray
    hit_sq_norm: np.ndarray
    k_ok: np.ndarray
    detected: np.ndarray

    def __len__(self) -> int:
        return len(self.n_true)

    def take(self, idx: np.ndarray) -> SourceScores:
        """The scores of scenes ``idx`` (any integer index array, e.g. a bootstrap resample)."""
        return SourceScores(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def cat(parts: list[SourceScores]) -> SourceScores:
        return SourceScores(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(SourceScores)})


def score_sources(est_phi, est_theta, est_r, est_mask, true_phi, true_theta, true_r, true_mask, crb,
                  floor=(0.0, 0.0, 0.0), gate: float = GATE_SIGMAS) -> SourceScores:
    """Match and score one batch. est_* [B,P] (rad, rad, m) with est_mask [B,P] bool (the estimator's own sources);
    true_* [B,T] with true_mask [B,T]; crb [B,T,3] variances of (phi, theta, r) per true source (rad^2, rad^2, m^2; NaN
    where padded); floor [3]: (phi rad, theta rad, 1/r in 1/m), typically the search grid's steps (the range floor is
    taken in 1/r and converted at each source's range: dr = r^2 d(1/r)). Returns :class:`SourceScores`."""
    if not gate > 0:
        raise ConfigError(f"gate = {gate!r}: expected a number > 0 (in units of sqrt(CRB))")
    ep, et, er, em = (_np(t) for t in (est_phi, est_theta, est_r, est_mask))
    tp, tt, tr, tm = (_np(t) for t in (true_phi, true_theta, true_r, true_mask))
    var = _np(crb).astype(np.float64)
    fl = np.asarray(floor, dtype=np.float64)
    B = len(tm)
    if len(em) != B or var.shape[:2] != tm.shape or var.shape[-1] != 3:
        raise ConfigError(f"score_sources: {len(em)} estimated scenes, truth {tm.shape}, crb {var.shape}: expected [B,P], [B,T], [B,T,3]")
    out = {k: np.zeros(B) for k in ("n_true", "n_pred", "n_pair", "n_hit")}
    sq_err, sq_norm, hit_sq = np.zeros((B, 3)), np.zeros((B, 3)), np.zeros((B, 3))
    detected = np.zeros(tm.shape, dtype=bool)
    for b in range(B):
        pm, tmask = em[b].astype(bool), tm[b].astype(bool)
        pred = np.stack([ep[b][pm], et[b][pm], er[b][pm]], -1).astype(np.float64)
        true = np.stack([tp[b][tmask], tt[b][tmask], tr[b][tmask]], -1).astype(np.float64)
        v = var[b][tmask]
        if not np.isfinite(v).all() or (v <= 0).any():
            raise ConfigError(f"crb: scene {b} has a non-finite or non-positive bound for a real source")
        step = np.stack([np.full(len(true), fl[0]), np.full(len(true), fl[1]), fl[2] * true[:, 2] ** 2], -1)  # [T,3]
        v_eff = np.maximum(v, step**2)
        out["n_true"][b], out["n_pred"][b] = len(true), len(pred)
        if len(pred) and len(true):
            err2 = (pred[:, None, :] - true[None, :, :]) ** 2  # [P,T,3]
            cost = (err2 / v_eff[None]).sum(-1)
            rows, cols = linear_sum_assignment(cost)  # the pairs: least total normalised squared error
            e2 = err2[rows, cols]
            out["n_pair"][b] = len(rows)
            sq_err[b] = e2.sum(0)
            sq_norm[b] = (e2 / v[cols]).sum(0)
            # the detections: the most pairs inside the gate (then the least error among them), a matching of its own:
            # the least-error pairs above can trade a pair inside the gate for two far outside it
            inside = (err2 <= (gate**2) * v_eff[None]).all(-1)  # [P,T]
            rows, cols = linear_sum_assignment(np.where(inside, cost, 1.0 + np.where(inside, cost, 0.0).sum()))
            hit = inside[rows, cols]
            rows, cols = rows[hit], cols[hit]
            out["n_hit"][b] = hit.sum()
            detected[b, np.flatnonzero(tmask)[cols]] = True
            hit_sq[b] = (err2[rows, cols] / v[cols]).sum(0)
    k_ok = out["n_pred"] == out["n_true"]
    return SourceScores(**out, sq_err=sq_err, sq_norm=sq_norm, hit_sq_norm=hit_sq, k_ok=k_ok, detected=detected)


def _from_sums(n_true, n_pred, n_pair, n_hit, sq_err, sq_norm, hit_sq, k_ok, n_scenes) -> dict[str, np.ndarray]:
    """Every statistic from summed scores; each argument an array of any shape [...] ([..., 3] for the squared errors)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        pair = np.where(n_pair > 0, n_pair, np.nan)[..., None]
        hit = np.where(n_hit > 0, n_hit, np.nan)[..., None]
        rmse, nerr, nhit = np.sqrt(sq_err / pair), np.sqrt(sq_norm / pair), np.sqrt(hit_sq / hit)
        miss = np.where(n_true > 0, 1.0 - n_hit / np.where(n_true > 0, n_true, 1), np.nan)
        fa = np.where(n_pred > 0, 1.0 - n_hit / np.where(n_pred > 0, n_pred, 1), 0.0)
        kacc = k_ok / n_scenes if n_scenes else np.full(np.shape(n_true), np.nan)
    return {"rmse_phi_deg": np.degrees(rmse[..., 0]), "rmse_theta_deg": np.degrees(rmse[..., 1]), "rmse_r_m": rmse[..., 2],
            "nerr_phi": nerr[..., 0], "nerr_theta": nerr[..., 1], "nerr_r": nerr[..., 2],
            "nerr_hit_phi": nhit[..., 0], "nerr_hit_theta": nhit[..., 1], "nerr_hit_r": nhit[..., 2],
            "miss_rate": miss, "false_alarm_rate": fa, "k_accuracy": kacc}


def statistics(s: SourceScores) -> dict[str, float]:
    """Every statistic of :data:`STATISTICS` from the scores of a set of scenes (NaN where a denominator is 0):
    rmse_*: sqrt(mean squared error over the Hungarian pairs) (degrees, degrees, metres), as peers report it when the
    estimator is given the true K; nerr_*: sqrt(mean over pairs of err_k^2 / CRB_k), the per-source normalised error (1:
    at the bound); nerr_hit_*: the same over detections; miss_rate = 1 - detections / true sources; false_alarm_rate =
    1 - detections / estimates (0 without estimates); k_accuracy: fraction of scenes whose estimated count is right."""
    out = _from_sums(s.n_true.sum(), s.n_pred.sum(), s.n_pair.sum(), s.n_hit.sum(), s.sq_err.sum(0), s.sq_norm.sum(0),
                     s.hit_sq_norm.sum(0), s.k_ok.sum(), len(s))
    return {k: float(v) for k, v in out.items()}


def summarise(s: SourceScores, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, dict[str, float]]:
    """{statistic: {"value", "lo", "hi"}}: each statistic of :func:`statistics` with a percentile bootstrap interval at
    ``level`` over ``n_boot`` resamples of the scenes (seeded: the same scores give the same interval; all resamples in
    one vectorised pass)."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot = {n_boot!r}: expected an integer >= 1")
    if not 0 < level < 1:
        raise ConfigError(f"level = {level!r}: expected a number in (0, 1)")
    value = statistics(s)
    n = len(s)
    if n:
        idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
        draws = _from_sums(s.n_true[idx].sum(1), s.n_pred[idx].sum(1), s.n_pair[idx].sum(1), s.n_hit[idx].sum(1), s.sq_err[idx].sum(1),
                           s.sq_norm[idx].sum(1), s.hit_sq_norm[idx].sum(1), s.k_ok[idx].sum(1), n)
    out = {}
    for k, v in value.items():
        xs = draws[k][np.isfinite(draws[k])] if n else np.zeros(0)
        lo, hi = (np.quantile(xs, [(1 - level) / 2, (1 + level) / 2]).tolist() if len(xs) else (math.nan, math.nan))
        out[k] = {"value": v, "lo": lo, "hi": hi}
    return out


def miss_rate_by(s: SourceScores, true_mask, values, edges, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> list[dict]:
    """The miss rate of the true sources binned by a per-source quantity: ``values`` [B,T] (e.g. each source's array
    SNR in dB), ``true_mask`` [B,T] bool (the real slots, as scored), bins [edges[i], edges[i+1]) (use +-inf for open
    ends). Returns one row per bin: {"lo", "hi" (None for an infinite edge), "n" (true sources in it), "miss": {"value", "lo", "hi"}} with a
    percentile bootstrap interval over scenes (seeded; NaN for an empty bin)."""
    m, x = _np(true_mask).astype(bool), _np(values).astype(np.float64)
    if x.shape != m.shape or s.detected.shape != m.shape:
        raise ConfigError(f"miss_rate_by: values {x.shape}, true_mask {m.shape} and the scores' detected {s.detected.shape} must agree")
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"edges = {edges}: expected at least two increasing bin edges")
    idx = np.random.default_rng(seed).integers(0, len(m), (n_boot, len(m))) if len(m) else np.zeros((n_boot, 0), dtype=int)
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        inside = m & (x >= lo) & (x < hi)
        n_in, n_miss = inside.sum(1), (inside & ~s.detected).sum(1)  # per scene
        with np.errstate(divide="ignore", invalid="ignore"):
            value = n_miss.sum() / n_in.sum() if n_in.sum() else math.nan
            draws = n_miss[idx].sum(1) / n_in[idx].sum(1)
        draws = draws[np.isfinite(draws)]
        ci = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]).tolist() if len(draws) else [math.nan, math.nan]
        rows.append({"lo": lo if math.isfinite(lo) else None, "hi": hi if math.isfinite(hi) else None, "n": int(n_in.sum()),
                     "miss": {"value": float(value), "lo": ci[0], "hi": ci[1]}})
    return rows


def mean_interval(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """{"value", "lo", "hi"}: the mean of per-scene ``values`` [n] and its percentile bootstrap interval at ``level``
    (``n_boot`` resamples of the scenes, seeded). NaN when there is no value."""
    v = _np(values).astype(np.float64).reshape(-1)
    if len(v) == 0:
        return {"value": math.nan, "lo": math.nan, "hi": math.nan}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2]).tolist()
    return {"value": float(v.mean()), "lo": lo, "hi": hi}


# ---------------------------------------------------------------------------------------------
# Fixed tolerances (notebook tables)
DEFAULT_TOLERANCES = {"phi_deg": 5.0, "theta_deg": 5.0, "r_m": 1.0}


def tolerances_array(tol: dict | None) -> np.ndarray:
    """The matching tolerances (phi rad, theta rad, r m) [3] from a dict of phi_deg/theta_deg/r_m (defaults
    filled in); ConfigError on a bad key or value."""
    t = {**DEFAULT_TOLERANCES, **(tol or {})}
    unknown = sorted(set(t) - set(DEFAULT_TOLERANCES))
    if unknown:
        raise ConfigError(f"tolerances: unknown key(s) {unknown}; allowed: {sorted(DEFAULT_TOLERANCES)}")
    for k, v in t.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"tolerances.{k} = {v!r}: expected a number > 0")
    return np.array([math.radians(t["phi_deg"]), math.radians(t["theta_deg"]), t["r_m"]])


def match(pred: np.ndarray, true: np.ndarray, tolerances: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of predicted to true sources.

    pred [P,3], true [T,3]: rows (phi rad, theta rad, r m). The cost is the Euclidean norm of the errors
    divided by the tolerances (so the three units are comparable). Rectangular problems keep every
    possible pair: min(P, T) matches, nothing dropped; P or T = 0 gives no match.
    Returns (pred_idx, true_idx), int arrays of length min(P, T).
    """
    pred, true = np.asarray(pred, dtype=np.float64).reshape(-1, 3), np.asarray(true, dtype=np.float64).reshape(-1, 3)
    if len(pred) == 0 or len(true) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    scale = tolerances_array(tolerances)
    cost = np.linalg.norm((pred[:, None, :] - true[None, :, :]) / scale, axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def _rows(phi, theta, r, mask, b: int) -> np.ndarray:
    m = np.asarray(mask[b], dtype=bool)
    return np.stack([np.asarray(phi[b], dtype=np.float64)[m], np.asarray(theta[b], dtype=np.float64)[m], np.asarray(r[b], dtype=np.float64)[m]], -1)


def match_metrics(est, true_phi, true_theta, true_r, true_mask, tolerances: dict | None = None) -> dict[str, float]:
    """Detection and accuracy metrics over a batch, plain floats.

    A Hungarian pair is a detection (true positive) when |dphi| <= tol_phi, |dtheta| <= tol_theta and
    |dr| <= tol_r (defaults 5 deg, 5 deg, 1 m; ``tolerances`` dict with keys phi_deg, theta_deg, r_m).
    precision = TP / predicted, recall = TP / true, F1 = 2 TP / (predicted + true), each 1.0 when its
    denominator is 0. RMSE of phi, theta (degrees) and r (metres) over *all* Hungarian pairs (detected
    or not; NaN when there is none), so gross errors count; ``rmse_detected_*`` the same over the detected
    pairs only (the spread of the sources found, to set beside the CRB; NaN when none is detected).
    k_accuracy: fraction of scenes whose number of detected sources equals the true K.
    """
    tol = tolerances_array(tolerances)
    to_np = lambda t: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)  # noqa: E731
    ep, et, er, em = (to_np(t) for t in (est.phi, est.theta, est.r, est.mask))
    tp_, tt_, tr_, tm_ = (to_np(t) for t in (true_phi, true_theta, true_r, true_mask))
    tp = n_pred = n_true = k_ok = 0
    sq, hit = [], []
    for b in range(len(em)):
        pred, true = _rows(ep, et, er, em, b), _rows(tp_, tt_, tr_, tm_, b)
        n_pred, n_true, k_ok = n_pred + len(pred), n_true + len(true), k_ok + int(len(pred) == len(true))
        i, j = match(pred, true, tolerances)
        err = np.abs(pred[i] - true[j])
        detected = (err <= tol).all(-1)
        tp += int(detected.sum())
        sq.append(err**2)
        hit.append(detected)
    sq = np.concatenate(sq) if sq else np.zeros((0, 3))
    hit = np.concatenate(hit) if hit else np.zeros(0, dtype=bool)
    rmse = np.sqrt(sq.mean(0)) if len(sq) else np.full(3, math.nan)
    rmse_hit = np.sqrt(sq[hit].mean(0)) if hit.any() else np.full(3, math.nan)
    return {
        "tp": float(tp),
        "n_pred": float(n_pred),
        "n_true": float(n_true),
        "precision": tp / n_pred if n_pred else 1.0,
        "recall": tp / n_true if n_true else 1.0,
        "f1": 2 * tp / (n_pred + n_true) if n_pred + n_true else 1.0,
        "rmse_phi_deg": float(np.degrees(rmse[0])),
        "rmse_theta_deg": float(np.degrees(rmse[1])),
        "rmse_r_m": float(rmse[2]),
        "rmse_detected_phi_deg": float(np.degrees(rmse_hit[0])),
        "rmse_detected_theta_deg": float(np.degrees(rmse_hit[1])),
        "rmse_detected_r_m": float(rmse_hit[2]),
        "n_matched": float(len(sq)),
        "k_accuracy": k_ok / len(em) if len(em) else math.nan,
    }
