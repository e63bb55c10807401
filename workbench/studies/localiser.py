"""The learned localiser (:mod:`workbench.detector`) against the maximum-likelihood fit it is meant to replace, on the
same scenes and device: every source's location scored against its own Cramer-Rao bound, the count, the covariance
NMSE and the seconds per scene (README, "The learned localiser"; notebook 05; benchmarks/bench_localiser.py).

Every estimator is scored on its own sources, directly (no MUSIC in between): the localiser's decoded and refined
detections (:class:`workbench.detector.Sources`) and the ML fits' MDL fits (:func:`workbench.ml_fit.ml_localise`, K by
MDL; plain, and with a RELAX cycle: the strongest baseline). None sees K, the noise variance or R_true. A second set
of rows gives each the true K (oracle knowledge, labelled so): the RMSE peers report; beside them the likelihood
scored from the true locations (oracle, labelled so) shows what a perfect search would reach, and how many of each ML
fit's misses are search failures. Misses are also binned by each true source's array SNR (from the truth, for the
analysis only). The count's frontier: every ML fit's miss and false-alarm rates as its MDL penalty moves (the count
re-chosen among the same nested fits), beside those of the nested fits started from the true sources (oracle: a
perfect search, counted by the same likelihood), against which the detection goals are checked. Scoring:
:func:`workbench.metrics.score_sources` with the per-source CRB (:func:`workbench.likelihood.crb_for`), the detection
gate of :data:`workbench.metrics.GATE_SIGMAS` floored at one step of the default search grid (as
:func:`.localisation.localisation_vs_snr`), 95 % bootstrap intervals over scenes. NMSE: ||R_hat - R_true||_F^2 /
||R_true||_F^2 of the trace-normalised matrices (no fitted constant for either). Data in, rows out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from ..checkpoints import TrainResult
from ..covariance import nmse, reference
from ..detector import DECODING_FIELDS
from ..experiments import entry_config
from ..forward import forward, rsamp_cache
from ..grid import Grid
from ..likelihood import array_snr, crb_for
from ..metrics import GATE_SIGMAS, mean_interval, miss_rate_by, score_sources, summarise
from ..ml_fit import MDL_SCALE, mdl_penalty, ml_localise, ml_refine
from ..physics import SceneBatch, source_covariance
from .localisation import _finite_summary, snr_batch, snr_scene_seed

ESTIMATORS = ("localiser", "ML fit", "ML fit + RELAX", "ML fit from the truth")
ORACLES = ("none", "true K", "true locations")  # what a row knows beyond y, H and the codes
RELAX_CYCLES = 1  # the stronger baseline's RELAX cycles (ml_localise's relax_cycles; a second one gained nothing on dev)
TRUTH_ITERS = 25  # scoring steps of the fit started at the true locations (ml_localise's iters)
SEARCH_MARGIN = 1.0  # nats: a fit of the true K is a search failure where the fit from the truth is this much more likely
SNR_BINS_DB = (-math.inf, 5.0, 10.0, 15.0, math.inf)  # per-source array SNR bins of the misses (dB per snapshot)
# the frontier's MDL penalties, in multiples of Rissanen's log(L) / 2 per real parameter (the fits count at MDL_SCALE)
FRONTIER_SCALES = tuple(0.25 * i for i in range(1, 17))  # 0.25 .. 4
FRONTIER_STATS = ("miss_rate", "false_alarm_rate", "k_accuracy")


def with_entry_decoding(run: TrainResult) -> TrainResult:
    """``run`` (a trained localiser) with the ``localiser`` entry's current decoding settings
    (:data:`workbench.detector.DECODING_FIELDS`: threshold, minimum SNR, rounds, scoring steps; not weights), its config
    following: a run trained before the settings were chosen on the dev split is scored as the entry decodes now."""
    entry = entry_config("localiser").model
    run.model.set_decoding(**{k: getattr(entry, k) for k in DECODING_FIELDS})
    run.config = run.config.replace(model=run.model.cfg.to_dict())
    return run


def training_summary(run: TrainResult) -> dict:
    """What a result file says of the trained run: {"n_train", "n_val", "epochs", "batch_size", "lr", "seed", "width",
    "layers", "system" (N_H x N_V RIS, M, L, K range, SNR range), "train_seconds" (summed over its epochs),
    "final_val_loss"}."""
    c, s = run.config, run.config.system
    last = run.history[-1] if run.history else {}
    return {"n_train": c.train.n_train, "n_val": c.train.n_val, "epochs": len(run.history), "batch_size": c.train.batch_size,
            "lr": c.train.lr, "seed": c.train.seed, "width": c.model.width, "layers": c.model.layers,
            "system": f"{s.N_H}x{s.N_V} RIS, M {s.M}, L {s.L}, K {s.K_min}..{s.K_max}, SNR {s.snr_db_min:g}..{s.snr_db_max:g} dB",
            "train_seconds": sum(h.get("seconds", 0.0) for h in run.history), "final_val_loss": last.get("val_loss")}


@torch.no_grad()
def run_localiser(run, batch: SceneBatch, batch_size: int = 64, true_count: bool = False):
    """The trained localiser ``run`` (a :class:`~workbench.checkpoints.TrainResult` of a ``model.head = "detector"``
    config) on ``batch``, ``batch_size`` scenes per call through :func:`workbench.forward.forward` (evaluation mode:
    refined; the feature maps computed inside the timed call, from y, H and the codes). true_count: given the true K
    (``batch.K``, oracle knowledge: the peers' RMSE) instead of counting. Returns
    (:class:`workbench.detector.Sources` of all scenes on the batch's device, seconds of the localiser's calls)."""
    cfg, model = run.config, run.model
    model.eval()
    R_samp = rsamp_cache(batch).rsamp_of(cfg)  # the pipeline's, not read by the localiser: computed before the clock starts
    parts, t0 = [], time.perf_counter()
    for s in range(0, len(batch), batch_size):
        b = batch[s:s + batch_size]
        count = b.K if true_count else None
        parts.append(forward(model, b, R_samp[s:s + batch_size], cfg, out_device=b.y.device, count=count).out.sources)
    seconds = time.perf_counter() - t0
    cat = {k: torch.cat([getattr(p, k) for p in parts]) for k in parts[0].__dataclass_fields__}
    return type(parts[0])(**cat), seconds


def localiser_vs_ml(run, snrs_db: Sequence[float], n_per_snr: int, seed: int = 0, split: str = "dev", device=None,
                    batch_size: int = 64, n_boot: int = 1000, gate: float = GATE_SIGMAS, true_k: bool = True,
                    frontier_scales: Sequence[float] = FRONTIER_SCALES) -> dict:
    """The localiser ``run`` and the ML fit on ``n_per_snr`` scenes of ``split`` at each SNR (the scenes of
    :func:`.localisation.localisation_vs_snr` with the same seed and split), on ``device`` (default: the run's).

    Two ML fits: the plain one and the stronger one with :data:`RELAX_CYCLES` RELAX cycles (``relax_cycles`` of
    :func:`workbench.ml_fit.ml_localise`, about 3x its time). Each estimator counting for itself (oracle "none",
    the headline) and, with ``true_k``, given the true K (oracle "true K": the RMSE peers report; each ML fit's nested
    fit of the true count from the same run, :meth:`~workbench.ml_fit.SnapshotFit.sources_of`, so its seconds are
    the same run's; the localiser keeps that many peaks, :meth:`workbench.detector.LocaliserNet.decode`), and the
    likelihood scored from the true locations ("ML fit from the truth", oracle "true locations": what a perfect
    search would find; :data:`TRUTH_ITERS` steps of :func:`workbench.ml_fit.ml_refine`), against which each ML
    fit's misses are split into search failures and not (:func:`search_failures`).
    The count's frontier (``frontier_scales``, multiples of Rissanen's penalty; empty: none): each ML fit's count
    re-chosen among its nested fits at each penalty (:meth:`~workbench.ml_fit.SnapshotFit.count_at`), and so the
    nested fits from the true sources, strongest first by true array SNR (``ml_localise(start=...)``, oracle "true
    locations": a perfect search; its count by the likelihood alone, :func:`count_frontier`).

    Returns {"snr_db", "n_per_snr", "split", "seed", "gate", "device", "rows": [{"snr_db", "estimator" (one of
    :data:`ESTIMATORS`), "oracle" (one of :data:`ORACLES`), "stats": {statistic: {"value", "lo", "hi"}}
    (:data:`workbench.metrics.STATISTICS`), "nmse": {"value", "lo", "hi"}, "seconds_per_scene"}], "miss_by_snr": [{"snr_db",
    "estimator", "bins": :func:`workbench.metrics.miss_rate_by` rows}] (oracle "none"; each true source binned by its
    per-snapshot array SNR in dB, :func:`workbench.likelihood.array_snr` with the true powers and noise variance, bins
    :data:`SNR_BINS_DB`: analysis only, no estimator sees it), "search": [{"snr_db", "estimator" (each ML fit),
    :func:`search_failures`' fields}] (with ``true_k``), "search_margin" (:data:`SEARCH_MARGIN`), "frontier": [{"snr_db",
    "estimator", "oracle", "scale", "entry" (the scale the fits count at), statistic: {"value", "lo", "hi"} for
    :data:`FRONTIER_STATS`}], "frontier_scales", "mdl_scale" (:data:`workbench.ml_fit.MDL_SCALE`)}."""
    system = run.config.system
    dev = next(run.model.parameters()).device if device is None else torch.device(device)
    floor = Grid.default(system).steps().tolist()
    rows, by_snr, search, frontier = [], [], [], []
    for i, snr in enumerate(snrs_db):
        scene_seed = snr_scene_seed(seed, i, split)
        batch = snr_batch(system, snr, n_per_snr, scene_seed, dev)
        crb_k = crb_for(batch, system)
        truth = (batch.phi, batch.theta, batch.r, batch.mask)
        R_ref = reference(batch.R_true)
        snr_k = 10 * array_snr(system, batch.H, batch.codes, batch.phi, batch.theta, batch.r, batch.power, batch.noise_var,
                               batch.mask).clamp_min(1e-30).log10()
        src, sec = run_localiser(run, batch, batch_size)
        estimates = {("localiser", "none"): (src.phi, src.theta, src.r, src.mask, src.covariance(system), sec)}
        fits = {}
        for name, cycles in (("ML fit", 0), ("ML fit + RELAX", RELAX_CYCLES)):
            t0 = time.perf_counter()
            ml = fits[name] = ml_localise(batch.y, batch.H, batch.codes, system, relax_cycles=cycles)
            ml_sec = time.perf_counter() - t0
            estimates[(name, "none")] = (ml.loc.phi, ml.loc.theta, ml.loc.r, ml.loc.mask, ml.covariance(system), ml_sec)
            if true_k:
                ml_k = ml.sources_of(batch.K, system)
                estimates[(name, "true K")] = (*ml_k[:3], ml_k[4], ml.covariance(system, K=batch.K), ml_sec)
        if true_k:
            src_k, sec_k = run_localiser(run, batch, batch_size, true_count=True)
            estimates[("localiser", "true K")] = (src_k.phi, src_k.theta, src_k.r, src_k.mask, src_k.covariance(system), sec_k)
            t0 = time.perf_counter()
            *at_truth, nll_truth = ml_refine(batch.y, batch.H, batch.codes, system, *truth, iters=TRUTH_ITERS, with_nll=True)
            estimates[("ML fit from the truth", "true locations")] = (
                *at_truth[:3], batch.mask, source_covariance(system, *at_truth[:3], at_truth[3], batch.mask), time.perf_counter() - t0)
        if frontier_scales:
            order = torch.where(batch.mask, snr_k, -math.inf).argsort(1, descending=True)  # strongest true source first
            start = tuple(t.gather(1, order) for t in (batch.phi, batch.theta, batch.r, batch.power, batch.mask))
            fits["ML fit from the truth"] = ml_localise(batch.y, batch.H, batch.codes, system, start=start)
            for name, fit in fits.items():
                oracle = "true locations" if name == "ML fit from the truth" else "none"
                frontier += [{"snr_db": float(snr), "estimator": name, "oracle": oracle, **row}
                             for row in count_frontier(fit, batch, system, crb_k, frontier_scales, floor, gate, n_boot, scene_seed)]
        scored = {}
        for (name, oracle), (phi, theta, r, mask, R_hat, seconds) in estimates.items():
            scores = scored[name, oracle] = score_sources(phi, theta, r, mask, *truth, crb_k, floor=floor, gate=gate)
            rows.append({"snr_db": float(snr), "estimator": name, "oracle": oracle,
                         "stats": _finite_summary(summarise(scores, n_boot=n_boot, seed=scene_seed)),
                         "nmse": mean_interval(nmse(reference(R_hat), R_ref), n_boot=n_boot, seed=scene_seed),
                         "seconds_per_scene": seconds / len(batch)})
            if oracle == "none":
                by_snr.append({"snr_db": float(snr), "estimator": name,
                               "bins": miss_rate_by(scores, batch.mask, snr_k, SNR_BINS_DB, n_boot=n_boot, seed=scene_seed)})
        if true_k:
            for name in ("ML fit", "ML fit + RELAX"):
                fit = fits[name]
                search.append({"snr_db": float(snr), "estimator": name,
                               **search_failures(fit.levels["nll"], batch.K, nll_truth, scored[name, "true K"])})
    return {"snr_db": [float(s) for s in snrs_db], "n_per_snr": n_per_snr, "split": split, "seed": seed, "gate": gate,
            "device": str(dev), "rows": rows, "miss_by_snr": by_snr, "search": search,
            "search_margin": SEARCH_MARGIN, "frontier": frontier, "frontier_scales": [float(x) for x in frontier_scales],
            "mdl_scale": MDL_SCALE}


def count_frontier(fit, batch: SceneBatch, system, crb_k, scales: Sequence[float], floor, gate: float, n_boot: int,
                   seed: int) -> list[dict]:
    """The detection statistics of an ML fit (:class:`~workbench.ml_fit.SnapshotFit` of ``batch``) as its MDL
    penalty moves: at each of ``scales`` (multiples of Rissanen's log(L) / 2 per real parameter) the count re-chosen
    among its nested fits, those sources scored as the table's rows are (``crb_k``, ``floor``, ``gate``; intervals over
    ``n_boot`` resamples seeded by ``seed``). Returns [{"scale", "entry" (True at :data:`~workbench.ml_fit.MDL_SCALE`),
    statistic: {"value", "lo", "hi"} for :data:`FRONTIER_STATS`}], one per scale."""
    out = []
    for scale in scales:
        phi, theta, r, _, mask = fit.sources_of(fit.count_at(mdl_penalty(system, scale)), system)
        stats = summarise(score_sources(phi, theta, r, mask, batch.phi, batch.theta, batch.r, batch.mask, crb_k, floor=floor,
                                        gate=gate), n_boot=n_boot, seed=seed)
        out.append({"scale": float(scale), "entry": math.isclose(scale, MDL_SCALE), **{k: stats[k] for k in FRONTIER_STATS}})
    return out


def search_failures(levels_nll: torch.Tensor, K: torch.Tensor, nll_truth: torch.Tensor, scores) -> dict:
    """How many of an ML fit's misses, given the true K, are failures of its search rather than of the likelihood:
    scenes where the fit started at the true locations (oracle) ends more likely, by more than :data:`SEARCH_MARGIN`
    nats, than the fit's own K-source fit. levels_nll [B,Kl] (:attr:`~workbench.ml_fit.SnapshotFit.levels`'s
    "nll", scene units), K [B] the true counts, nll_truth [B] (:func:`workbench.ml_fit.ml_refine` with_nll, the
    same units), scores: :class:`workbench.metrics.SourceScores` of the fit's true-K sources. Returns {"scenes",
    "scenes_with_miss", "search_failures" (among the scenes with a miss), "search_failures_all" (among all scenes)}."""
    rows = torch.arange(len(K), device=levels_nll.device)
    fit_nll = levels_nll[rows, K.to(levels_nll.device) - 1]
    failed = ((fit_nll - nll_truth.to(fit_nll.device)) > SEARCH_MARGIN).cpu().numpy()
    missed = scores.n_hit < scores.n_true
    return {"scenes": len(K), "scenes_with_miss": int(missed.sum()), "search_failures": int((failed & missed).sum()),
            "search_failures_all": int(failed.sum())}


@torch.no_grad()
def localiser_scene(run, batch: SceneBatch) -> dict:
    """The localiser ``run`` and the ML fit on the one scene in ``batch`` (e.g. :func:`.localisation.snr_scene`), for a
    figure: the matched-filter spectrum the network reads (its first feature map, dB relative to the maximum) and its
    heatmap (probability), each the maximum over range on the detector's phi x theta grid, with the localiser's
    sources, the ML fit's (K by MDL) and the true ones. Plain lists: {"snr_db", "K", "K_localiser", "K_ml", "phi_deg"
    [P], "theta_deg" [T], "spectrum_db" [T][P], "heat" [T][P], "localiser", "ml", "true": [{"phi_deg", "theta_deg",
    "r_m"}]}."""
    if len(batch) != 1:
        raise ValueError(f"batch: expected one scene, got {len(batch)}")
    cfg, model = run.config, run.model
    model.eval()
    out = forward(model, batch, rsamp_cache(batch).rsamp_of(cfg), cfg, out_device=batch.y.device).out
    det, src = out.detection, out.sources
    ml = ml_localise(batch.y, batch.H, batch.codes, cfg.system)

    def points(phi, theta, r, mask):
        return [{"phi_deg": math.degrees(float(p)), "theta_deg": math.degrees(float(t)), "r_m": float(q)}
                for p, t, q, m in zip(phi[0].tolist(), theta[0].tolist(), r[0].tolist(), mask[0].tolist()) if m]

    spec = (10 * det.features[0, 0]).amax(-1)  # [P,T] dB
    heat = torch.sigmoid(det.logits[0]).amax(-1)
    return {"snr_db": float(batch.snr_db[0]), "K": int(batch.K[0]), "K_localiser": int(src.K[0]), "K_ml": int(ml.loc.K[0]),
            "phi_deg": torch.rad2deg(det.grid.phi).tolist(), "theta_deg": torch.rad2deg(det.grid.theta).tolist(),
            "spectrum_db": spec.T.tolist(), "heat": heat.T.tolist(),
            "localiser": points(src.phi, src.theta, src.r, src.mask), "ml": points(ml.loc.phi, ml.loc.theta, ml.loc.r, ml.loc.mask),
            "true": points(batch.phi, batch.theta, batch.r, batch.mask)}
