"""The maximum-likelihood fit straight from the snapshots: the physics baseline, and the refinement the learned
localiser borrows.

Sources are added one at a time, each at the grid point where it raises the likelihood most given the previous ones
(the first at the matched filter's maximum), every location, power and the noise variance then refined by damped
Fisher scoring of the snapshot likelihood (:func:`workbench.likelihood.snapshot_model`); nested fits of every count, a
pruning pass, optional RELAX cycles, and the count by MDL. Float64/complex128 inside, in units normalised per scene;
radians and metres; powers in mW.

Owns: :func:`ml_localise` / :func:`ml_fit_for` and their result :class:`SnapshotFit`, :func:`ml_refine` (the same
scoring from given locations: the learned localiser's refinement), :func:`likeliest_source` (the search's pick, which
the localiser's RELAX cycle shares), the MDL criterion (:func:`mdl_penalty`,
:func:`mdl_criterion`, :func:`mdl_choice`), the per-device chunk (:func:`ml_chunk`) and the fit's settings (:data:`ML_GRID`,
:data:`ML_STEP_LIMIT`, :data:`ML_CHUNK`, :data:`RELAX_TOL`). Must not: define the likelihood or the bound
(:mod:`workbench.likelihood`), hold the matched filter (:mod:`workbench.matched_filter`), localise from a covariance
matrix (:mod:`workbench.localisation`), simulate scenes or loop over SNRs (studies do), draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .checks import check_K
from .config import ConfigError, SystemConfig
from .grid import Grid
from .likelihood import atoms, inverse_factor, snapshot_model, snapshot_nll
from .localisation import Localisation
from .matched_filter import atom_norms, gain_scan, pick, project_out, residual_noise_variance, scan
from .physics import SceneBatch, measurement_matrices, source_covariance

ML_STEP_LIMIT = (math.radians(2.0), math.radians(2.0), 0.2, 1.0, 1.0)  # phi, theta rad; 1/r 1/m; log p; log sigma^2
ML_GRID = {"step_deg": 4.0, "n_r": 6}  # the matched-filter start grid: Grid.default(system, **ML_GRID)
# Scenes per batched fit, by device type (ml_localise(chunk=None)): the fit is a few hundred small batched linear-algebra
# calls per chunk, so on a GPU it is launch-bound at small chunks (measured on an H200: 37 ms per scene at 64, 4.3 ms
# at 512); on a CPU larger chunks buy nothing and cost memory. Other device types get ML_CHUNK_DEFAULT.
ML_CHUNK = {"cpu": 64, "cuda": 512}
ML_CHUNK_DEFAULT = 64
RELAX_TOL = 1e-2  # nats: a RELAX move is kept when it lowers the negative log-likelihood by more (the scoring's tolerance)


@dataclass
class SnapshotFit:
    """Maximum-likelihood estimate from the snapshots (:func:`ml_localise`).

    loc: the sources as a :class:`Localisation` (phi, theta [B,Kp] rad, r [B,Kp] m float64, mask [B,Kp],
    K [B] the count used, value [B,Kp] the estimated power p_k in mW, grid_* the matched-filter picks that
    started the fit); power [B,Kp] mW (0 where masked); noise_var [B] mW per complex entry (estimated);
    nll [B] the negative log-likelihood of the chosen fit (:func:`snapshot_model`, in the scene's units);
    criterion [B,Kl] the penalised likelihood of k = 1..Kl sources (NaN when K was given), Kl = K_max or max(K);
    levels: every nested fit, {"phi", "theta", "r", "power": [B,Kl,Kl] (fit k-1, slot j; zero beyond slot k-1),
    "noise_var", "nll": [B,Kl]} in the same units."""

    loc: Localisation
    power: torch.Tensor
    noise_var: torch.Tensor
    nll: torch.Tensor
    criterion: torch.Tensor
    levels: dict

    def covariance(self, system: SystemConfig, K=None) -> torch.Tensor:
        """The implied source covariance sum_k p_k a_k a_k^H, [B,N,N] complex64 in mW (as R_true): of the chosen
        fit (K None), or of the nested fit with K[b] sources (an int or [B] ints in 1..Kl, from :attr:`levels`:
        one MDL fit also gives the fit of the true K)."""
        if K is None:
            return source_covariance(system, self.loc.phi, self.loc.theta, self.loc.r, self.power, self.loc.mask)
        phi, theta, r, p, mask = self.sources_of(K, system)
        return source_covariance(system, phi, theta, torch.where(mask, r, torch.ones_like(r)), p, mask)

    def count_at(self, penalty: float) -> torch.Tensor:
        """The MDL count [B] int64 among :attr:`levels` under another ``penalty`` per real parameter
        (:func:`mdl_choice`): the count's operating point moved without refitting (README, section 5's frontier)."""
        return mdl_choice(self.levels["nll"], penalty)

    def sources_of(self, K, system: SystemConfig) -> tuple[torch.Tensor, ...]:
        """The nested fit with K[b] sources (an int or [B] ints in 1..Kl) from :attr:`levels`: (phi, theta [B,Kl] rad,
        r [B,Kl] m, power [B,Kl] mW, mask [B,Kl] bool, the first K[b] slots real). With ``K = batch.K`` it is the fit
        of the true count (oracle knowledge) at no extra cost."""
        B, k_top = self.nll.shape[0], self.levels["nll"].shape[1]
        K = check_K(K, B, system.N, k_min=1, k_max=k_top).to(self.nll.device)
        rows = torch.arange(B, device=K.device)
        phi, theta, r, p = (self.levels[n][rows, K - 1] for n in ("phi", "theta", "r", "power"))
        mask = torch.arange(k_top, device=K.device)[None, :] < K[:, None]
        return phi, theta, r, p, mask


def _pack(phi, theta, r, power, noise_var) -> torch.Tensor:
    """The fit's working coordinates u [B,4K+1]: (phi_k, theta_k, 1/r_k) per source, log p_k, log sigma^2."""
    B, K = phi.shape
    return torch.cat((torch.stack((phi, theta, 1.0 / r), -1).reshape(B, 3 * K), power.log(), noise_var.log()[:, None]), -1)


def _unpack(u: torch.Tensor, K: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`_pack`: (phi, theta, r, power [B,K], noise_var [B])."""
    loc = u[:, : 3 * K].reshape(-1, K, 3)
    return loc[..., 0], loc[..., 1], 1.0 / loc[..., 2], u[:, 3 * K: 4 * K].exp(), u[:, -1].exp()


def _add_source(u: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """u [B,4K+1] (:func:`_pack`) with one source appended: new [B,5], :func:`_pack` of that source alone (its noise
    variance is not used: u's is kept). Returns [B,4K+5]."""
    K = (u.shape[1] - 1) // 4
    return torch.cat((u[:, : 3 * K], new[:, :3], u[:, 3 * K: -1], new[:, 3:4], u[:, -1:]), -1)


def _drop_source(u: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """u [B,4K+1] (:func:`_pack`) without source j[b] [B] int64 of each scene, the others in their order and the noise
    variance kept: [B,4K-3]."""
    B, K = u.shape[0], (u.shape[1] - 1) // 4
    keep = torch.stack([torch.cat((torch.arange(i), torch.arange(i + 1, K))) for i in range(K)]).to(u.device)[j]  # [B,K-1]
    loc = u[:, : 3 * K].reshape(B, K, 3).gather(1, keep[..., None].expand(-1, -1, 3)).reshape(B, 3 * (K - 1))
    return torch.cat((loc, u[:, 3 * K: 4 * K].gather(1, keep), u[:, -1:]), -1)


def _fit_bounds(system: SystemConfig, K: int, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box constraints lo, hi [B,4K+1] on the working coordinates: the field of view, and log powers and log
    noise variance within 1e-8 .. 1e4 of ``ref`` [B] (1 in the fit's normalised units)."""
    pm, tm = math.radians(system.phi_max_deg), math.radians(system.theta_max_deg)
    loc_lo = torch.tensor([-pm, -tm, 1.0 / system.r_max_m], dtype=torch.float64).repeat(K)
    loc_hi = torch.tensor([pm, tm, 1.0 / system.r_min_m], dtype=torch.float64).repeat(K)
    lr = ref.log()[:, None]
    lo = torch.cat((loc_lo.to(ref.device).expand(len(ref), -1), (lr + math.log(1e-8)).expand(-1, K + 1)), -1)
    hi = torch.cat((loc_hi.to(ref.device).expand(len(ref), -1), (lr + math.log(1e4)).expand(-1, K + 1)), -1)
    return lo, hi


def _scoring(system: SystemConfig, G, y, u, mask, lo, hi, iters: int, tol: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped Fisher scoring (Levenberg-Marquardt on the Fisher matrix) of the log-likelihood in the working
    coordinates u [B,4K+1] (:func:`_pack`), inside the box [lo, hi] (:func:`_scoring_step`). At most ``iters``
    steps per scene; a scene stops once its proposed step changes the negative log-likelihood by less than
    ``tol`` (converged) or its damping exceeds 1e6 (stuck), and only the others are computed on.
    Returns (u, nll [B])."""
    B, P = u.shape
    K = (P - 1) // 4
    limit = torch.tensor(ML_STEP_LIMIT, dtype=torch.float64, device=u.device)
    limit = torch.cat((limit[:3].repeat(K), limit[3].repeat(K), limit[4:]))
    mu = torch.full((B,), 1e-2, dtype=torch.float64, device=u.device)
    nll = torch.full((B,), math.inf, dtype=torch.float64, device=u.device)
    active = torch.arange(B, device=u.device)
    for _ in range(iters):
        a = active
        u_a, nll_a, mu_a, done = _scoring_step(system, G[a], y[a], u[a], mask[a], lo[a], hi[a], mu[a], limit, tol)
        u[a], nll[a], mu[a] = u_a, nll_a, mu_a
        active = a[~done]
        if active.numel() == 0:
            break
    return u, nll


def _scoring_step(system: SystemConfig, G, y, u, mask, lo, hi, mu, limit, tol: float):
    """One damped Fisher-scoring step: solve (J F J + mu diag(J F J)) du = J score (J the diagonal Jacobian of
    the coordinate change, Jacobi-scaled), shrink the step so no coordinate moves more than ``limit``
    (:data:`ML_STEP_LIMIT`), keep it where it lowers the negative log-likelihood (else raise mu tenfold).
    Returns (u, nll, mu, done [B] bool)."""
    B, P = u.shape
    K = (P - 1) // 4
    phi, theta, r, p, s2 = _unpack(u, K)
    terms = snapshot_model(system, G, phi, theta, r, p, s2, mask, y=y)
    nll = terms["nll"]
    J = torch.cat((torch.stack((torch.ones_like(r), torch.ones_like(r), -r * r), -1).reshape(B, 3 * K), p, s2[:, None]), -1)
    free = torch.cat((mask.repeat_interleave(3, 1), mask, torch.ones_like(mask[:, :1])), -1)
    Fu = terms["fisher"] * J[:, :, None] * J[:, None, :]
    Fu = torch.where(free[:, :, None] & free[:, None, :], Fu, torch.diag_embed((~free).to(Fu.dtype)))
    d = Fu.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).rsqrt()
    eye = torch.eye(P, dtype=Fu.dtype, device=Fu.device)
    step = d * torch.linalg.solve(Fu * d[:, :, None] * d[:, None, :] + mu[:, None, None] * eye, (d * terms["score"] * J * free)[..., None])[..., 0]
    step = torch.nan_to_num(step) / (step.abs() / limit).amax(-1, keepdim=True).clamp_min(1.0)
    u_new = torch.minimum(torch.maximum(u + step, lo), hi)
    phi, theta, r, p, s2 = _unpack(u_new, K)
    nll_new = snapshot_nll(system, G, phi, theta, r, p, s2, mask, y)
    ok = nll_new < nll
    done = ((nll - nll_new).abs() < tol) | (mu > 1e6)
    return (torch.where(ok[:, None], u_new, u), torch.where(ok, nll_new, nll),
            torch.where(ok, mu * 0.3, mu * 10.0).clamp(1e-9, 1e9), done)


def likeliest_source(system: SystemConfig, grid: Grid, G, norm2, y, phi, theta, r, power, noise_var, mask,
                     with_gain: bool = False) -> tuple[torch.Tensor, ...]:
    """The grid point where one more source raises the likelihood of a fit most, and that source's power: G [B,L,M,N],
    norm2 [B,L,P*T*Q] its atom norms on ``grid`` (:func:`atom_norms`), y [B,L,M]; the fit's phi, theta, r, power [B,K]
    (rad, m; sources where mask [B,K] is False take no part) and noise_var [B], in the units of y and G. The fit's
    inverse covariance in low-rank form (:func:`~workbench.likelihood.inverse_factor`), then
    :func:`~workbench.matched_filter.gain_scan`'s maximum. Returns (idx [B,3] into ``grid``, phi, theta, r [B] its
    coordinates, power [B] float64), and with ``with_gain`` the log-likelihood gain [B] (nats, float32) at that point and
    power, before any refinement."""
    b = atoms(system, G, phi, theta, r, mask)
    E, rest = inverse_factor(b, power * mask, noise_var, y)
    gain, p_new = gain_scan(system, grid, G, norm2, E, rest, noise_var)
    flat = gain.argmax(-1)
    idx = grid.unravel(flat)
    out = (idx, *grid.coords(idx), p_new.gather(1, flat[:, None])[:, 0].to(torch.float64))
    return (*out, gain.gather(1, flat[:, None])[:, 0]) if with_gain else out


def _start_source(system, grid, G, y, norm2, u: torch.Tensor | None, mask) -> tuple[torch.Tensor, ...]:
    """Start values of one more source. The first: the matched filter's maximum (:func:`scan` of the snapshots), its
    power from the pick's mean matched-filter power, the noise variance from the energy left after projecting the
    pick out. Every later one: :func:`likeliest_source` given the current fit, with the fit's noise variance.
    u [B,4K+1] the current fit (None: no source yet), mask [B,K] or wider (its first K columns are used).
    Returns (idx [B,3], phi, theta, r, power [B], noise_var [B]).

    The later picks score under the stochastic model, not on the snapshots with the fitted atoms projected out: with
    the Rician BS-RIS channel (nearly rank one) a strong source's atom is nearly collinear with every other in each
    snapshot, and projecting it out removed most of the weaker sources too (measured on the dev split, README
    section 5: the fit given the true K missed 8.4 % of the sources at 20 dB with projected-residual picks, 3.1 %
    with these)."""
    if u is not None:
        K = (u.shape[1] - 1) // 4
        phi, theta, r, p, s2 = _unpack(u, K)
        return (*likeliest_source(system, grid, G, norm2, y, phi, theta, r, p, s2, mask[:, :K]), s2)
    idx = pick(grid, scan(system, grid, G, y, norm2))
    phi, theta, r = grid.coords(idx)
    b = atoms(system, G, phi[:, None], theta[:, None], r[:, None])[:, :, 0]  # [B,L,M]
    nb = b.abs().square().sum(-1)
    mf = (b.conj() * y).sum(-1).abs().square()
    noise_var = residual_noise_variance(project_out(y, b[:, :, None]), 1)
    power = ((mf / nb - noise_var[:, None]) / nb).mean(1)
    power = torch.maximum(power, 0.1 * (mf / nb.square()).mean(1))
    return idx, phi, theta, r, power, noise_var


def ml_localise(
    y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, system: SystemConfig, K=None, grid: Grid | None = None,
    iters: int = 25, penalty: float | None = None, chunk: int | None = None, relax_cycles: int = 0, start=None,
) -> SnapshotFit:
    """Maximum-likelihood localisation straight from the snapshots: the physics baseline.

    y [B,L,M], H [B,M,N], codes [B,L,N] complex (the scene's measurements, channel and RIS codes: known to
    the receiver, no oracle); K: int or [B] ints in 1..system.K_max, or None to estimate it.
    Sources are added one at a time (k = 1..K): a pick on the grid (default :data:`ML_GRID`, 4 deg and 6
    ranges: half of a 12 x 12 RIS's beamwidth, measured as accurate as the beamscan grid and 2x faster), the
    first at the matched filter's maximum, every later one where one more source raises the likelihood of the
    current fit most (:func:`_start_source`), then all (phi, theta, r), powers and the noise variance are refined
    jointly by at most ``iters`` damped Fisher-scoring steps (:func:`_scoring`) on the stochastic likelihood of
    :func:`snapshot_model`, powers and noise variance in log coordinates (positive), float64, in units
    normalised per scene by the RMS of y and of H. The noise variance is estimated (the residual energy
    after the picks, then ML), never the simulator's.
    Every k = 1..K_max (K given: 1..max(K) + 1) is fitted, nested, each from the previous; then each k-source
    fit is also restarted from the (k+1)-source fit without its weakest source (:func:`_prune_pass`). K given:
    ``relax_cycles`` > 0: that many cycles of :func:`_relax_pass` after the pruning pass (each source of every fit
    re-picked given the others: the search fails a little less often, at about 3x the time per cycle; README,
    section 5). Each scene keeps its K-source fit (the true K is oracle knowledge). K = None: the one minimising
    MDL(k) = nll(k) + ``penalty`` (4k + 1), penalty default :func:`mdl_penalty` (1.5x Rissanen's 1/2 log n per real
    parameter with n = L independent snapshots: :data:`MDL_SCALE`) is kept (``criterion``).
    start: given first picks instead of the search's, (phi, theta [B,S] rad, r [B,S] m, power [B,S] mW, mask [B,S]
    bool, the given ones first in each row): the k-source fit of a scene with at least k given starts at the first k
    given ones (not from the (k-1)-source fit); beyond them the forward pass searches as usual. From the true sources
    (oracle knowledge, labelled so) the nested fits are those of a perfect search, and the MDL count on them is the
    count's own limit (README, section 5).
    Scenes are fitted ``chunk`` at a time (None: :data:`ML_CHUNK` of y's device type); a scene's fit depends on the
    chunk it is in only through float32 rounding in the grid contractions (32 dev scenes fitted in chunks of 32 and of
    5: the same counts, phi within 6e-8 rad, the likelihood within 1.4e-4 nats).
    Returns a :class:`SnapshotFit`; its :meth:`~SnapshotFit.covariance` is sum_k p_k a_k a_k^H in mW.
    """
    B = y.shape[0]
    chunk = ml_chunk(y.device) if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk = {chunk!r}: expected an integer >= 1 (scenes per batched fit) or None (ML_CHUNK by device)")
    if isinstance(relax_cycles, bool) or not isinstance(relax_cycles, int) or relax_cycles < 0:
        raise ConfigError(f"relax_cycles = {relax_cycles!r}: expected an integer >= 0 (0: no RELAX pass)")
    if K is not None:
        K = check_K(K, B, system.N, k_min=1, k_max=system.K_max)
    grid = Grid.default(system, **ML_GRID) if grid is None else grid
    grid.validate(system)
    penalty = mdl_penalty(system) if penalty is None else float(penalty)
    n_levels = system.K_max if K is None else int(K.max())
    if start is not None:
        start = _check_start(start, B, system)
    parts = []
    for s in range(0, B, chunk):
        Ks = None if K is None else K[s:s + chunk].to(y.device)
        st = None if start is None else tuple(t[s:s + chunk].to(y.device) for t in start)
        parts.append(_ml_chunk(system, grid, y[s:s + chunk], H[s:s + chunk], codes[s:s + chunk], Ks, iters, penalty, n_levels,
                               relax_cycles, st))
    return parts[0] if len(parts) == 1 else _cat_fits(parts)


# The MDL penalty's multiple of Rissanen's log(L) / 2 per real parameter. A spurious source is placed at the grid's
# likeliest point, not at a fixed one, so the likelihood it adds is a maximum over the grid: on scenes at 20 dB with
# one or two sources fitted with one more, its median was measured at 2.6-3.5 nats against chi2_4 / 2's 1.7, above
# Rissanen's 4 log(L) / 2 = 5.5 nats in 5-11 % of the scenes, above 1.5x that in 0-2 %; 1.5x had the lowest miss plus
# false-alarm rate on the dev split (README, section 5; tests/test_likelihood.py).
MDL_SCALE = 1.5


def mdl_penalty(system: SystemConfig, scale: float = MDL_SCALE) -> float:
    """The MDL penalty per real parameter, ``scale`` x log(L) / 2 (Rissanen's 1/2 log n with n = L independent
    snapshots; the default :data:`MDL_SCALE` is the fits' own, other scales move a count along its frontier)."""
    return scale * 0.5 * math.log(system.L)


def mdl_criterion(nll: torch.Tensor, k: torch.Tensor, penalty: float) -> torch.Tensor:
    """MDL(k) = nll + penalty (4k + 1): a fit of k sources has 4 real parameters each (phi, theta, r, power) and the
    noise variance. nll and k broadcast (k sources, any shape); the count is the argmin over k. One formula for the ML
    fit (:func:`ml_localise`) and the learned localiser's count (:meth:`workbench.detector.LocaliserNet.mdl_count`)."""
    return nll + penalty * (4 * k + 1)


def _levels_criterion(nll: torch.Tensor, penalty: float) -> torch.Tensor:
    """:func:`mdl_criterion` of nested fits: nll [B,Kl] of k = 1..Kl sources -> [B,Kl]."""
    return mdl_criterion(nll, torch.arange(1, nll.shape[1] + 1, dtype=nll.dtype, device=nll.device), penalty)


def mdl_choice(nll: torch.Tensor, penalty: float) -> torch.Tensor:
    """The count minimising :func:`mdl_criterion` over nested fits: nll [B,Kl] of k = 1..Kl sources -> K [B] int64."""
    return _levels_criterion(nll, penalty).argmin(1) + 1


def ml_refine(y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, system: SystemConfig, phi, theta, r, mask,
              iters: int = 4, with_nll: bool = False) -> tuple[torch.Tensor, ...]:
    """The snapshot likelihood refined from given source locations (a learned detector's): start powers from the
    matched filter on the snapshots with the other sources' least-squares fit removed, the noise variance from the
    residual energy, then at most ``iters`` damped Fisher-scoring steps (:func:`_scoring`, the ML fit's) of every
    location, power and the noise variance, in the ML fit's normalised units. No count is chosen and no source added
    or dropped: K[b] = mask[b].sum() as given (>= 1 each).

    y [B,L,M], H [B,M,N], codes [B,L,N] complex; phi, theta [B,K] rad, r [B,K] m, mask [B,K] bool. Returns (phi,
    theta, r [B,K] float64 rad / m, power [B,K] mW (0 where masked), noise_var [B] mW), no gradient; ``with_nll`` (and
    iters >= 1): also the negative log-likelihood of the result [B] float64 in the scene's units, as
    :attr:`SnapshotFit.nll` (comparable between fits of the same scene: of different counts, :func:`mdl_criterion`, or
    from different starts)."""
    if with_nll and iters < 1:
        raise ConfigError(f"iters = {iters}: the likelihood of the refined fit needs at least one scoring step")
    c128, f64 = torch.complex128, torch.float64
    a_y = y.abs().square().mean((1, 2)).sqrt().to(f64)
    a_h = H.abs().square().mean((1, 2)).sqrt().to(f64)
    yn = y.to(c128) / a_y[:, None, None]
    G = measurement_matrices(H.to(c128) / a_h[:, None, None], codes.to(c128)).to(torch.complex64)
    B, K = phi.shape
    mask = mask.to(y.device)
    phi, theta = (torch.where(mask, t.to(f64), torch.zeros_like(t, dtype=f64)) for t in (phi, theta))
    r = torch.where(mask, r.to(f64), torch.full_like(r, system.r_max_m, dtype=f64))
    b = atoms(system, G, phi, theta, r) * mask[:, None, :, None]  # [B,L,K,M]
    gram = b.conj() @ b.mT + 1e-9 * torch.eye(K, dtype=b.dtype, device=b.device)  # ridge: masked atoms are zero
    coef = torch.linalg.solve(gram, (b.conj() @ yn[..., None]))  # per-snapshot least squares, [B,L,K,1]
    fit = (b.mT @ coef)[..., 0]
    nb = b.abs().square().sum(-1).clamp_min(1e-30)  # [B,L,K]
    others = fit[:, :, None, :] - coef * b  # the other sources' part of the fit, [B,L,K,M]
    mf = (b.conj() * (yn[:, :, None, :] - others)).sum(-1).abs().square()
    noise_var = residual_noise_variance(yn - fit, int(mask.sum(1).max()))
    power = ((mf / nb - noise_var[:, None, None]) / nb).mean(1)
    power = torch.where(mask, torch.maximum(power, 0.1 * (mf / nb.square()).mean(1)), torch.ones_like(power))
    lo, hi = _fit_bounds(system, K, torch.ones(B, dtype=f64, device=y.device))
    u = torch.minimum(torch.maximum(_pack(phi, theta, r, power, noise_var), lo), hi)
    nll = None
    if iters > 0:
        u, nll = _scoring(system, G, yn, u, mask, lo, hi, iters)
    phi, theta, r, power, noise_var = _unpack(u, K)
    out = (phi, theta, r, power * mask * (a_y / a_h).square()[:, None], noise_var * a_y.square())
    return (*out, _scene_nll(nll, a_y, system)) if with_nll else out


def ml_chunk(device) -> int:
    """Scenes per batched ML fit on ``device`` (a torch.device or its name): :data:`ML_CHUNK` of its type."""
    return ML_CHUNK.get(torch.device(device).type, ML_CHUNK_DEFAULT)


def _cat_fits(parts: list[SnapshotFit]) -> SnapshotFit:
    """The fits of consecutive chunks of scenes as one (all chunks have the same number of levels)."""
    loc = Localisation(**{f.name: torch.cat([getattr(p.loc, f.name) for p in parts]) for f in fields(Localisation)})
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    levels = {k: torch.cat([p.levels[k] for p in parts]) for k in parts[0].levels}
    return SnapshotFit(loc=loc, power=cat("power"), noise_var=cat("noise_var"), nll=cat("nll"), criterion=cat("criterion"), levels=levels)


def _check_start(start, B: int, system: SystemConfig) -> tuple[torch.Tensor, ...]:
    """:func:`ml_localise`'s ``start`` checked: five tensors of shape [B,S], S <= K_max, the mask's True slots first."""
    names = ("phi", "theta", "r", "power", "mask")
    if not isinstance(start, (tuple, list)) or len(start) != 5:
        raise ConfigError(f"start: expected ({', '.join(names)}) tensors of shape [B,S], or None")
    shapes = {tuple(t.shape) for t in start}
    S = start[0].shape[-1] if start[0].dim() == 2 else -1
    if len(shapes) != 1 or start[0].dim() != 2 or start[0].shape[0] != B or not 1 <= S <= system.K_max:
        raise ConfigError(f"start: expected ({', '.join(names)}) all of shape [B = {B}, S] with 1 <= S <= K_max = {system.K_max}, "
                          f"got {sorted(shapes)}")
    mask = start[4].bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ConfigError("start: the mask's True slots must come first in every row (the given sources in their order)")
    return (*start[:4], mask)


def _ml_chunk(system, grid, y, H, codes, K, iters: int, penalty: float, n_levels: int, relax_cycles: int = 0,
              start=None) -> SnapshotFit:
    """:func:`ml_localise` on one chunk of scenes: normalise units, the forward (adding) pass up to K_max (or one
    source more than the largest given K; the ``start`` sources first where given), the backward (pruning) pass,
    ``relax_cycles`` RELAX cycles, the choice of K among the first ``n_levels`` fits."""
    c128 = torch.complex128
    a_y = y.abs().square().mean((1, 2)).sqrt().to(torch.float64)
    a_h = H.abs().square().mean((1, 2)).sqrt().to(torch.float64)
    yn = y.to(c128) / a_y[:, None, None]
    G = measurement_matrices(H.to(c128) / a_h[:, None, None], codes.to(c128)).to(torch.complex64)
    norm2 = atom_norms(system, grid, G)
    B, k_top = y.shape[0], system.K_max if K is None else min(n_levels + 1, system.N - 1)
    ones = torch.ones(B, dtype=torch.float64, device=y.device)
    u, fits, picks = None, [], []
    if start is not None:  # the given sources in the fit's units (an unused slot's r may be 0: any valid range)
        given = start[4]
        g_phi, g_theta = (t.to(torch.float64) for t in start[:2])
        g_r = torch.where(given, start[2].to(torch.float64), system.r_max_m)
        g_p = torch.where(given, start[3].to(torch.float64), 1.0) * (a_h / a_y).square()[:, None]  # mW -> normalised units
        near = grid.fractional_index(g_phi, g_theta, g_r).round().long().clamp_min(0)
        near = torch.minimum(near, torch.tensor(grid.shape, device=near.device) - 1)
    for k in range(1, k_top + 1):
        mask = torch.ones(B, k, dtype=torch.bool, device=y.device)
        idx, phi, theta, r, p, s2 = _start_source(system, grid, G, yn, norm2, u, mask)
        new = _pack(phi[:, None], theta[:, None], r[:, None], p[:, None], s2)
        u = new if u is None else _add_source(u, new)
        if start is not None and k <= given.shape[1]:
            # a scene with k given sources starts its k-source fit at them, not nested: a perfect search's k-source fit
            has = given[:, k - 1]
            u = torch.where(has[:, None], _pack(g_phi[:, :k], g_theta[:, :k], g_r[:, :k], g_p[:, :k], _unpack(u, k)[4]), u)
            idx = torch.where(has[:, None], near[:, k - 1], idx)
        picks.append(idx)
        lo, hi = _fit_bounds(system, k, ones)
        u, nll = _scoring(system, G, yn, torch.minimum(torch.maximum(u, lo), hi), mask, lo, hi, iters)
        fits.append((u, nll, mask))
    fits = _prune_pass(system, G, yn, fits, iters)
    for _ in range(relax_cycles):
        fits = _relax_pass(system, grid, G, yn, norm2, fits, iters)
    return _choose_fit(system, grid, fits[:n_levels], picks[:n_levels], K, penalty, a_y, a_h)


def _prune_pass(system, G, y, fits: list, iters: int) -> list:
    """Backward elimination over the nested fits: the k-source fit restarted from the (k+1)-source fit without
    its weakest source, kept where its likelihood is higher. A greedy forward pass can place a source wrongly
    and compensate with the next one; the larger fit then holds the right sources (measured: a 2-source
    scene at 30 dB counted as 3 before this pass)."""
    B = y.shape[0]
    ones = torch.ones(B, dtype=torch.float64, device=y.device)
    for k in range(len(fits) - 1, 0, -1):
        u_big, mask = fits[k][0], fits[k - 1][2]
        weakest = u_big[:, 3 * (k + 1): 4 * (k + 1)].argmin(-1)  # log powers of the k+1 sources
        lo, hi = _fit_bounds(system, k, ones)
        u, nll = _scoring(system, G, y, _drop_source(u_big, weakest), mask, lo, hi, iters)
        better = nll < fits[k - 1][1]
        fits[k - 1] = (torch.where(better[:, None], u, fits[k - 1][0]), torch.where(better, nll, fits[k - 1][1]), mask)
    return fits




def _relax_pass(system, grid, G, y, norm2, fits: list, iters: int) -> list:
    """One RELAX cycle (Li and Stoica's relaxation search) over the nested fits: in every k-source fit (k >= 2), each
    source j in turn is dropped, a new one is picked given the other k - 1 (:func:`_start_source`, the forward
    pass's pick), and all k are re-scored; kept where the likelihood rises by more than the scoring's tolerance. A
    greedy pass can leave a second estimate beside a strong source while a weaker one goes unfound; re-picking that
    slot with the strong one fitted can find it (measured on the dev split: README, section 5)."""
    B = y.shape[0]
    ones = torch.ones(B, dtype=torch.float64, device=y.device)
    for k in range(2, len(fits) + 1):
        u, nll, mask = fits[k - 1]
        lo, hi = _fit_bounds(system, k, ones)
        for j in range(k):
            others = _drop_source(u, torch.full((B,), j, dtype=torch.int64, device=y.device))
            _, phi, theta, r, p, s2 = _start_source(system, grid, G, y, norm2, others, mask[:, : k - 1])
            u_try = _add_source(others, _pack(phi[:, None], theta[:, None], r[:, None], p[:, None], s2))
            u_try, nll_try = _scoring(system, G, y, torch.minimum(torch.maximum(u_try, lo), hi), mask, lo, hi, iters)
            better = nll_try < nll - RELAX_TOL
            u, nll = torch.where(better[:, None], u_try, u), torch.where(better, nll_try, nll)
        fits[k - 1] = (u, nll, mask)
    return fits


def _choose_fit(system, grid, fits, picks, K, penalty: float, a_y, a_h) -> SnapshotFit:
    """The fit with the given K per scene, or the MDL minimiser; back to the scene's units (powers times
    a_y^2 / a_h^2 in mW, noise variance times a_y^2, negative log-likelihood plus 2 L M log a_y)."""
    levels = _levels(fits, a_y, a_h, system)
    nll = levels["nll"]
    k_top = nll.shape[1]
    crit = _levels_criterion(nll, penalty)
    crit_out = crit if K is None else torch.full_like(crit, math.nan)
    K = crit.argmin(1) + 1 if K is None else K
    pick = lambda t: t[torch.arange(len(K), device=K.device), K - 1]  # noqa: E731  (the fit of K sources)
    mask = torch.arange(k_top, device=nll.device)[None, :] < K[:, None]
    phi, theta, r, p = (pick(levels[k]) for k in ("phi", "theta", "r", "power"))
    gphi, gth, gr = grid.coords(torch.stack(picks, 1))
    loc = Localisation(phi=phi, theta=theta, r=r, mask=mask, K=K, value=p, grid_phi=gphi, grid_theta=gth, grid_r=gr)
    return SnapshotFit(loc=loc, power=p, noise_var=pick(levels["noise_var"]), nll=pick(nll), criterion=crit_out, levels=levels)


def _levels(fits, a_y, a_h, system) -> dict:
    """The nested fits [(u, nll, mask)] for k = 1..Kl as :attr:`SnapshotFit.levels`, in the scene's units."""
    B, k_top = fits[0][0].shape[0], len(fits)
    out = {k: torch.zeros(B, k_top, k_top, dtype=torch.float64, device=a_y.device) for k in ("phi", "theta", "r", "power")}
    s2 = torch.zeros(B, k_top, dtype=torch.float64, device=a_y.device)
    for k, (u, _, _) in enumerate(fits, start=1):
        ph, th, rr, pp, ss = _unpack(u, k)
        out["phi"][:, k - 1, :k], out["theta"][:, k - 1, :k], out["r"][:, k - 1, :k] = ph, th, rr
        out["power"][:, k - 1, :k], s2[:, k - 1] = pp * ((a_y / a_h).square())[:, None], ss * a_y.square()
    out["noise_var"] = s2
    out["nll"] = _scene_nll(torch.stack([f[1] for f in fits], 1), a_y[:, None], system)
    return out


def _scene_nll(nll: torch.Tensor, a_y: torch.Tensor, system: SystemConfig) -> torch.Tensor:
    """A negative log-likelihood in the fit's normalised units (y / a_y) back in the scene's: C scales by a_y^2, so
    log det C_l gains M log a_y^2 per snapshot (the quadratic form is unchanged)."""
    return nll + 2 * system.L * system.M * a_y.log()


def ml_fit_for(batch: SceneBatch, system: SystemConfig, K=None, **kwargs) -> SnapshotFit:
    """:func:`ml_localise` of a simulated :class:`~workbench.physics.SceneBatch` (its y, H and codes only; pass
    ``K=batch.K`` for the true count, which is then oracle knowledge)."""
    return ml_localise(batch.y, batch.H, batch.codes, system, K=K, **kwargs)
