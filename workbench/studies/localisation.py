"""Notebook 05: localisation versus SNR from several covariances, beside the Cramer-Rao bound, and the MUSIC
spectrum of one scene.

For each SNR the same number of scenes is simulated (:func:`snr_batch`); every covariance source is localised
by MUSIC (RAP-MUSIC) or MVDR and matched to the truth with :func:`workbench.localisation.match_metrics`;
sqrt(CRB) comes from :func:`workbench.likelihood.crb_for`. A source is a callable(batch) returning R [n,N,N]
complex, or the pair (R, K_hat [n]) when the source counts the sources itself (a network's K head, the physics
baseline's MDL count); the others are counted by MDL/AIC on R's eigenvalues. The sources:

* ``R_true``: the exact, noise-free source covariance (a reference: no estimator sees it);
* ``R_samp[<estimator>]``: an R_samp estimator (:func:`workbench.estimators.sample_covariance`);
* ``physics[ML]``: the maximum-likelihood fit straight from the snapshots (:func:`workbench.ml_fit.ml_localise`),
  its covariance sum_k p_k a_k a_k^H at the true K or the MDL count;
* ``<run>:R_pred`` / ``<run>:R_blend``: a trained network's prediction and the pipeline's blend (:func:`model_sources`).

Data in, rows out: never draws, never writes files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..checks import check_covariance
from ..config import SAMPLE_ESTIMATORS, ConfigError, ExperimentConfig, SystemConfig, check_choice, resolve_device
from ..covariance import hermitise
from ..estimators import oracle_knowledge
from ..forward import forward, rsamp_cache, split_seed
from ..grid import Grid
from ..likelihood import crb_for
from ..localisation import COUNT_METHODS, METHODS, Localisation, count_sources, localise, spectrum
from ..metrics import DEFAULT_TOLERANCES, GATE_SIGMAS, match_metrics, score_sources, summarise, tolerances_array
from ..physics import SceneBatch, simulate

Source = Callable[[SceneBatch], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
PHYSICS_K = ("true", "mdl")


def snr_scene_seed(seed: int, snr_index: int, split: str = "dev") -> int:
    """The seed of the scenes of the study's ``snr_index``-th SNR in ``split`` (:data:`workbench.forward.SPLITS`: "dev"
    for notebooks, "test" for the reported tables): every SNR and every split has scenes of its own."""
    return split_seed(seed, split, 1, snr_index)


def _raw_rsamp(system: SystemConfig, estimator: str, b: SceneBatch) -> torch.Tensor:
    """The estimator's raw R_samp of batch b, from the batch's R_samp cache (:func:`workbench.forward.rsamp_cache`):
    computed once per batch for R_samp[<estimator>] and for every network fed with it."""
    return rsamp_cache(b).raw(estimator, system)


def rsamp_source(system: SystemConfig, estimator: str) -> Source:
    """batch -> the estimator's R_samp, hermitised ("covariance_matching" and "beamscan" use batch.noise_var)."""
    check_choice("estimator", estimator, SAMPLE_ESTIMATORS)

    def source(b: SceneBatch):
        return hermitise(_raw_rsamp(system, estimator, b))
    source.oracle = oracle_knowledge(estimator)
    return source


class PhysicsSource:
    """The maximum-likelihood fit straight from the snapshots (:func:`workbench.ml_fit.ml_fit_for`) as a localisation
    source: called on a batch, (its covariance sum_k p_k a_k a_k^H, its MDL count). ``k`` "true": the covariance of
    the nested fit with the true K (oracle knowledge of K, for the legacy true-K columns); "mdl": of the MDL fit.
    :meth:`given_k` gives either explicitly. One fit per batch (kept on the batch's cache) serves every K. The
    covariance has rank K, so MUSIC with that K returns the ML locations."""

    oracle = "none"

    def __init__(self, system: SystemConfig, k: str = "true"):
        check_choice("physics_k", k, PHYSICS_K)
        self.system, self.k = system, k

    def fit(self, b: SceneBatch):
        """The batch's ML fit, K by MDL (:meth:`workbench.forward.RsampCache.ml_fit`: once per batch, the same fit a
        physics-head network gets on that batch)."""
        return rsamp_cache(b).ml_fit(self.system)

    def given_k(self, b: SceneBatch, K: torch.Tensor | None) -> torch.Tensor:
        """The covariance [n,N,N] of the fit with K[b] sources (None: the MDL count)."""
        return self.fit(b).covariance(self.system, K=K)

    def __call__(self, b: SceneBatch):
        return self.given_k(b, b.K if self.k == "true" else None), self.fit(b).loc.K


def physics_source(system: SystemConfig, k: str = "true") -> PhysicsSource:
    """:class:`PhysicsSource` of ``system`` (``k``: which fit's covariance a plain call returns)."""
    return PhysicsSource(system, k)


def model_sources(runs: dict, blend: bool = True) -> dict[str, Source]:
    """``"<name>:R_pred"`` (and ``"<name>:R_blend"`` when ``blend``) for every trained run in ``runs`` ({name:
    :class:`~workbench.checkpoints.TrainResult`}): the network's R_pred and the pipeline's R_blend (its own R_samp,
    Fix 1, Fix 2 and C_EPS) for a batch, each with the network's own count (K head: argmax of k_logits + 1). The
    network runs on its own device (:func:`workbench.forward.forward`); the matrices come back on the batch's.
    R_pred and R_blend of one run share one forward pass per batch (kept on the batch's cache)."""
    out: dict[str, Source] = {}
    for name, run in runs.items():
        for which in ("R_pred", "R_blend") if blend else ("R_pred",):
            out[f"{name}:{which}"] = _model_source(name, run, which)
    return out


def _model_source(name: str, run, which: str) -> Source:
    @torch.no_grad()
    def run_forward(b: SceneBatch):
        cfg, model = run.config, run.model
        model.eval()
        cache = rsamp_cache(b)
        out, cov, _ = forward(model, b, cache.rsamp_of(cfg), cfg, prior=cache.prior_of(cfg), fits=cache.fits_of(cfg), out_device=b.y.device)
        return cov, out.k_logits.argmax(-1) + 1

    def source(b: SceneBatch):
        cov, k = rsamp_cache(b).derived(("model", name, id(run)), lambda: run_forward(b))
        return hermitise(getattr(cov, which)), k
    source.oracle = run_oracle(run.config)
    return source


def run_oracle(cfg: ExperimentConfig) -> str:
    """What a trained network knows beyond a scene's measurements, H and codes: its R_samp input's oracle knowledge
    (:func:`workbench.estimators.oracle_knowledge`) when it reads R_samp (``model.rsamp_input`` or a blend), else "none"."""
    uses_rsamp = cfg.model.rsamp_input or cfg.fixes.beta > 0
    return oracle_knowledge(cfg.fixes.rsamp_estimator) if uses_rsamp else "none"


def localisation_sources(cfg: ExperimentConfig, estimators: Sequence[str], physics_k: str | None = None,
                         runs: dict | None = None, blend: bool = True) -> dict[str, Source]:
    """The covariances notebook 05 localises from, by name: "R_true", "R_samp[<estimator>]" for each estimator,
    "physics[ML]" when ``physics_k`` is "true" or "mdl" (:func:`physics_source`), and the trained ``runs``
    (:func:`model_sources`). The sources share each batch's R_samp cache (:func:`workbench.forward.rsamp_cache`)."""
    s = cfg.system
    check_choice("physics_k", physics_k, (None, *PHYSICS_K))
    def r_true(b: SceneBatch) -> torch.Tensor:
        return b.R_true
    r_true.oracle = "R_true itself"
    sources: dict[str, Source] = {"R_true": r_true, **{f"R_samp[{e}]": rsamp_source(s, e) for e in estimators}}
    if physics_k is not None:
        sources["physics[ML]"] = physics_source(s, physics_k)
    sources.update(model_sources(runs or {}, blend))
    return sources


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def snr_batch(system: SystemConfig, snr_db: float, n: int, seed: int, device="cpu") -> SceneBatch:
    """The ``n`` scenes of one SNR: ``simulate`` with the SNR fixed at ``snr_db`` (the study's i-th SNR uses
    :func:`snr_scene_seed`, so every SNR has its own scenes)."""
    return simulate(system.replace(snr_db_min=float(snr_db), snr_db_max=float(snr_db)), n, seed=seed, device=device)


def _estimate(fn: Source, batch: SceneBatch, name: str, system: SystemConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R checked, the source's own count or None)."""
    out = fn(batch)
    R, k = out if isinstance(out, tuple) else (out, None)
    return check_covariance(R, name, N=system.N), k


def localisation_vs_snr(
    system: SystemConfig,
    snrs_db: Sequence[float],
    n_per_snr: int,
    covariances: dict[str, Source],
    method: str = "music",
    seed: int = 0,
    grid: Grid | None = None,
    use_true_k: bool = True,
    k_method: str = "mdl",
    n_snapshots: int | None = None,
    tolerances: dict | None = None,
    nuisance: bool = True,
    device: str = "cpu",
    split: str = "dev",
    n_boot: int = 1000,
    gate: float = GATE_SIGMAS,
) -> dict:
    """Localisation versus SNR for several covariance sources, scored per source against the Cramer-Rao bound.

    For SNR number i: ``n_per_snr`` scenes of ``split`` (:func:`snr_batch` with :func:`snr_scene_seed`: "dev" for
    notebooks, "test" for the reported tables). Every source's R = covariances[name](batch) is localised by ``method``
    twice: with the true K (oracle knowledge; a source whose covariance depends on K, like the ML fit, gives its true-K
    covariance through ``given_k``) and with its own count (a network's K head, the ML fit's MDL; else ``k_method`` on
    R's eigenvalues, ``n_snapshots`` default system.L, capped at K_max). Each is scored per source
    (:func:`workbench.metrics.score_sources`: Hungarian matching on err^2 / CRB_k with the per-source CRB of
    :func:`workbench.likelihood.crb_for`, a ``gate`` x sqrt(CRB_k) detection gate floored at one grid step) and
    summarised with 95 % bootstrap intervals over the scenes (``n_boot`` resamples).

    Returns plain lists/floats (NaN as None), ready for json.dump:
    {"snr_db", "method", "n_per_snr", "split", "seed", "gate", "scene_seeds" [per SNR], "use_true_k", "tolerances",
     "sqrt_crb": {"phi_deg", "theta_deg", "r_m"} (sqrt of the mean CRB over sources, for plots),
     "per_source": {name: {"true_k": [per SNR {statistic: {"value", "lo", "hi"}}], "own_k": [...]}} (the statistics
     of :data:`workbench.metrics.STATISTICS`),
     "covariances": {name: fixed-tolerance metrics per SNR (:func:`workbench.metrics.match_metrics`, with the true K
     when ``use_true_k``), "k_accuracy" of the own count},
     "k_source": {name: "own" or ``k_method``}, "oracle": {name: what the source knows beyond y, H and the codes}}.
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
    floor = grid.steps().tolist()
    n_snap = system.L if n_snapshots is None else n_snapshots
    dev = resolve_device(device)
    keys = ("rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "rmse_detected_phi_deg", "rmse_detected_theta_deg", "rmse_detected_r_m",
            "precision", "recall", "f1", "k_accuracy")
    res = {name: {k: [] for k in keys} for name in covariances}
    per = {name: {"true_k": [], "own_k": []} for name in covariances}
    bound = {"phi_deg": [], "theta_deg": [], "r_m": []}
    k_source: dict[str, str] = {}
    seeds = []
    for i, snr in enumerate(snrs_db):
        seeds.append(snr_scene_seed(seed, i, split))
        batch = snr_batch(system, snr, n_per_snr, seeds[-1], dev)
        crb_k = crb_for(batch, system, nuisance)  # [n,K_max,3], NaN where padded
        rms = crb_k[batch.mask].mean(0).sqrt().cpu().tolist()
        bound["phi_deg"].append(_json_float(math.degrees(rms[0])))
        bound["theta_deg"].append(_json_float(math.degrees(rms[1])))
        bound["r_m"].append(_json_float(rms[2]))
        truth = (batch.phi, batch.theta, batch.r, batch.mask)
        for name, fn in covariances.items():
            R, k_own = _estimate(fn, batch, name, system)
            k_hat = count_sources(R, n_snap, k_method, k_max=system.K_max) if k_own is None else k_own.to(R.device)
            k_source[name] = "own" if k_own is not None else k_method
            given_k = getattr(fn, "given_k", None)
            R_true_k = R if given_k is None else check_covariance(given_k(batch, batch.K), name, N=system.N)
            R_own_k = R if given_k is None else check_covariance(given_k(batch, None), name, N=system.N)
            est_true = localise(R_true_k, system, grid, method, K=batch.K)
            est_own = localise(R_own_k, system, grid, method, K=k_hat)
            for mode, est in (("true_k", est_true), ("own_k", est_own)):
                scores = score_sources(est.phi, est.theta, est.r, est.mask, *truth, crb_k, floor=floor, gate=gate)
                per[name][mode].append(_finite_summary(summarise(scores, n_boot=n_boot, seed=seeds[-1])))
            same = given_k is None or getattr(fn, "k", None) == ("true" if use_true_k else "mdl")  # R is that mode's covariance
            legacy = (est_true if use_true_k else est_own) if same else localise(R, system, grid, method, K=batch.K if use_true_k else k_hat)
            m = match_metrics(legacy, batch.phi, batch.theta, batch.r, batch.mask, tolerances)
            m["k_accuracy"] = (k_hat.cpu() == batch.K.cpu()).double().mean().item()
            for k in keys:
                res[name][k].append(_json_float(m[k]))
    return {
        "snr_db": [float(s) for s in snrs_db],
        "method": method,
        "n_per_snr": n_per_snr,
        "split": split,
        "seed": seed,
        "gate": gate,
        "scene_seeds": seeds,
        "use_true_k": use_true_k,
        "tolerances": {**DEFAULT_TOLERANCES, **(tolerances or {})},
        "sqrt_crb": bound,
        "per_source": per,
        "covariances": res,
        "k_source": k_source,
        "oracle": {name: getattr(fn, "oracle", "unknown") for name, fn in covariances.items()},
    }


def _finite_summary(summary: dict) -> dict:
    return {k: {q: _json_float(v) for q, v in d.items()} for k, d in summary.items()}


# ---------------------------------------------------------------------------------------------
# One scene's spectrum, for the interactive figures
SPECTRUM_VIEW = {"step_deg": 1.0, "n_r": 96}  # the fine grids of the two views


def snr_scene(system: SystemConfig, snr_db: float, n_per_snr: int, seed: int, scene: int, snr_index: int = 0, device="cpu") -> SceneBatch:
    """Scene ``scene`` (a batch of one) of the scenes :func:`localisation_vs_snr` used at its ``snr_index``-th SNR
    ``snr_db`` with that ``seed`` and ``n_per_snr`` (:func:`snr_batch` with :func:`snr_scene_seed`). All
    ``n_per_snr`` scenes are simulated and one is kept: ``simulate`` draws each quantity for all n scenes at once
    (K for every scene, then the angles for every scene, ...), so scene i of n scenes is not scene i of i + 1 scenes.
    Simulating is cheap; the covariance sources then run on the one scene only."""
    if isinstance(scene, bool) or not isinstance(scene, int) or not 0 <= scene < n_per_snr:
        raise ConfigError(f"scene = {scene!r}: expected an integer in 0..{n_per_snr - 1} (n_per_snr = {n_per_snr})")
    return snr_batch(system, snr_db, n_per_snr, snr_scene_seed(seed, snr_index), device)[scene:scene + 1]


def scene_spectrum(
    system: SystemConfig, batch: SceneBatch, name: str, source: Source, method: str = "music", use_true_k: bool = True,
    step_deg: float = SPECTRUM_VIEW["step_deg"], n_r: int = SPECTRUM_VIEW["n_r"], scene: int = 0,
) -> dict:
    """The spectrum of the one scene in ``batch`` (e.g. :func:`snr_scene`; ``scene``: its index, for the label) from
    covariance ``source``, in two views through the strongest estimated source: the phi-theta map at its estimated
    range and the range cut at its estimated (phi, theta), both on fine grids (``step_deg``, ``n_r`` ranges uniform
    in 1/r), in dB relative to the view's maximum.

    Returns plain lists: {"name", "method", "snr_db", "scene", "K", "K_used", "phi_deg" [P], "theta_deg" [T],
    "map_db" [T][P], "r_m" [Q], "cut_db" [Q], "at": {"phi_deg", "theta_deg", "r_m"} (the slice position),
    "estimated": [{"phi_deg", "theta_deg", "r_m"}], "true": [...]}."""
    check_choice("method", method, METHODS)
    if len(batch) != 1:
        raise ConfigError(f"batch: expected one scene (e.g. snr_scene(...)), got {len(batch)}")
    snr_db = float(batch.snr_db[0])
    R, k_own = _estimate(source, batch, name, system)
    k_hat = count_sources(R, system.L, "mdl", k_max=system.K_max) if k_own is None else k_own.cpu()
    K = batch.K if use_true_k else k_hat
    est = localise(R, system, Grid.default(system), method, K=K)
    points = _points(est)
    strongest = points[0] if points else {"phi_deg": 0.0, "theta_deg": 0.0, "r_m": float(Grid.uniform(system, 1, 1, 1).r[0])}
    fine = Grid.default(system, step_deg, 1)
    f64 = torch.float64
    pm, tm = math.radians(system.phi_max_deg), math.radians(system.theta_max_deg)
    plane = Grid(fine.phi, fine.theta, torch.tensor([strongest["r_m"]], dtype=f64).clamp(system.r_min_m, system.r_max_m))
    ranges = Grid(torch.tensor([math.radians(strongest["phi_deg"])], dtype=f64).clamp(-pm, pm),
                  torch.tensor([math.radians(strongest["theta_deg"])], dtype=f64).clamp(-tm, tm), Grid.uniform(system, 1, 1, n_r).r)
    Kk = K.to(R.device)
    model = system.steering_model  # the views show the physics' spectrum, not the separable grid's approximation
    spec_plane = spectrum(R, system, plane, method, K=Kk if method == "music" else None, model=model)[0, :, :, 0]  # [P,T]
    spec_r = spectrum(R, system, ranges, method, K=Kk if method == "music" else None, model=model)[0, 0, 0, :]  # [Q]
    db = lambda s: (10 * torch.log10(s.double().clamp_min(1e-300) / s.double().max().clamp_min(1e-300))).tolist()  # noqa: E731
    truth = [{"phi_deg": math.degrees(p), "theta_deg": math.degrees(t), "r_m": r}
             for p, t, r, m in zip(batch.phi[0].tolist(), batch.theta[0].tolist(), batch.r[0].tolist(), batch.mask[0].tolist()) if m]
    return {"name": name, "method": method, "snr_db": float(snr_db), "scene": scene, "K": int(batch.K[0]), "K_used": int(K[0]),
            "phi_deg": torch.rad2deg(plane.phi).tolist(), "theta_deg": torch.rad2deg(plane.theta).tolist(),
            "map_db": [list(row) for row in zip(*db(spec_plane))], "r_m": ranges.r.tolist(), "cut_db": db(spec_r),
            "at": strongest, "estimated": points, "true": truth}


def _points(est: Localisation) -> list[dict]:
    """The estimated sources of scene 0, strongest spectrum value first: [{"phi_deg", "theta_deg", "r_m"}]."""
    m = est.mask[0].cpu()
    order = torch.argsort(est.value[0].cpu().double().masked_fill(~m, -math.inf), descending=True)
    return [{"phi_deg": math.degrees(float(est.phi[0, j])), "theta_deg": math.degrees(float(est.theta[0, j])), "r_m": float(est.r[0, j])}
            for j in order.tolist() if m[j]]
