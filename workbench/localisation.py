"""Localisation from a covariance: near-field MUSIC (RAP-MUSIC) and MVDR, MDL/AIC.

Everything is batched (covariances [B, N, N], complex) and runs on the device of its input. Steering
vectors come only from :func:`workbench.physics.steering`. Radians and metres inside; degrees only in the
metrics' names (``*_deg``).

Owns: spectra over a :class:`~workbench.grid.Grid`, peak picking (RAP-MUSIC by default; the sub-grid refinement it
calls is :mod:`workbench.refinement`), source counting from eigenvalues. Must not: refine picks itself
(:mod:`workbench.refinement`), score estimates against the truth (:mod:`workbench.metrics`), model the snapshots (the
likelihood and the Cramer-Rao bound are :mod:`workbench.likelihood`, the maximum-likelihood baseline
:mod:`workbench.ml_fit`), simulate scenes or loop over SNRs (the studies in :mod:`workbench.studies.localisation` do),
draw figures.

A spectrum over the grid is a sum of |f_j^H a(g)|^2 over the columns f_j of an N x J matrix F (MUSIC: the
top-K eigenvectors, J = K; MVDR: U (Lambda + delta)^-1/2, J = N), evaluated with the grid's separable
contractions (:mod:`workbench.grid`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from .checks import check_covariance, check_K
from .config import STEERING_MODELS, ConfigError, SystemConfig, check_choice
from .grid import Grid
from .physics import steering
from .refinement import RAP_MIN_RESIDUAL, _rap_correlation, joint_subspace_refine, refine_peaks

METHODS = ("music", "mvdr")
COUNT_METHODS = ("mdl", "aic")


# ---------------------------------------------------------------------------------------------
# Spectra
def _projector_factor(R: torch.Tensor, method: str, K: torch.Tensor | None, loading: float) -> torch.Tensor:
    """F [B,N,J] complex128 such that the spectrum's quadratic form is sum_j |f_j^H a|^2.

    music: the top-max(K) eigenvectors, columns beyond each scene's K zeroed (||E_s^H a||^2);
    mvdr:  U (Lambda_+ + delta)^-1/2 with Lambda_+ the eigenvalues clipped at 0 and delta = loading * tr(R)/N
           (a^H (R_+ + delta I)^-1 a)."""
    lam, U = torch.linalg.eigh(R.to(torch.complex128))  # ascending
    if method == "music":
        kmax = max(int(K.max()), 1)
        rank = kmax - torch.arange(kmax, device=R.device)  # column c of the top block has eigenvalue rank kmax - c
        keep = rank[None, :] <= K[:, None]
        return U[..., -kmax:] * keep[:, None, :]
    lam = lam.clamp_min(0)
    delta = (loading * lam.mean(-1, keepdim=True)).clamp_min(torch.finfo(torch.float64).tiny)
    return U * (lam + delta).rsqrt()[:, None, :]


def _grid_quadratic(F: torch.Tensor, system: SystemConfig, grid: Grid) -> torch.Tensor:
    """sum_j |f_j^H a(g)|^2 = a(g)^H F F^H a(g) over the grid, [B,P,T,Q] real (float32 for complex64 F).

    The cheaper of the grid's two separable contractions by operation count: per column (few columns,
    MUSIC: J (N T Q + N_H P T Q) MACs) or as a quadratic form (MVDR, J = N: N^2 T Q + N_H^2 P T Q MACs)."""
    B, N, J = F.shape
    P, T, Q = grid.shape
    if J * (N * T * Q + system.N_H * P * T * Q) <= N * N * T * Q + system.N_H**2 * P * T * Q:
        resp = grid.response(system, F.conj().transpose(-2, -1))  # a_g^H f_j conjugated, [B,J,P,T,Q]
        return torch.view_as_real(resp).square().sum((-1, 1))
    return grid.quadratic(system, F @ F.mH)


def _exact_quadratic(F: torch.Tensor, system: SystemConfig, grid: Grid, model: str) -> torch.Tensor:
    """sum_j |f_j^H a(g)|^2 over the grid with steering vectors of ``model`` formed point by point (no separable
    contraction): [B,P,T,Q] real. For small grids (the spectrum views); cost B J N P T Q."""
    a = steering(system, grid.phi[:, None, None], grid.theta[None, :, None], grid.r[None, None, :], model=model)
    a = a.to(device=F.device, dtype=F.dtype)  # [P,T,Q,N]
    return torch.view_as_real(torch.einsum("bnj,ptqn->bjptq", F.conj(), a)).square().sum((-1, 1))


def _checked(R: torch.Tensor, system: SystemConfig, grid: Grid | None, method: str) -> tuple[torch.Tensor, Grid]:
    """The covariance as a complex [B,N,N] batch (N = system.N) and the validated grid (default :meth:`Grid.default`)."""
    check_choice("method", method, METHODS)
    R = check_covariance(R, N=system.N, allow_single=True)
    if not R.is_complex():
        R = R.to(torch.complex128 if R.dtype == torch.float64 else torch.complex64)
    grid = Grid.default(system) if grid is None else grid
    grid.validate(system)
    return R, grid


def _spectrum_values(q: torch.Tensor, method: str) -> torch.Tensor:
    """The pseudo-spectrum from the grid quadratic form q: MUSIC 1 / (1 - q) (floored at eps), MVDR 1 / q."""
    if method == "music":
        return 1.0 / (1.0 - q).clamp_min(torch.finfo(q.dtype).eps)
    return 1.0 / q.clamp_min(torch.finfo(q.dtype).tiny)


def spectrum(
    R: torch.Tensor, system: SystemConfig, grid: Grid | None = None, method: str = "music", K=None, loading: float = 1e-3,
    model: str = "separable",
) -> torch.Tensor:
    """Near-field MUSIC or MVDR pseudo-spectrum over ``grid`` (default :meth:`Grid.default`).

    R [B,N,N] (or [N,N]) complex Hermitian: R_true, R_samp, R_pred, R_blend, in any units.
    * ``music``: 1 / (1 - ||E_s^H a||^2), E_s the eigenvectors of the K largest eigenvalues (K int or [B],
      required); a has unit norm, so this equals 1 / ||E_n^H a||^2 with the noise subspace, cheaper.
      The denominator is floored at the dtype's eps (the peak of a noise-free R_true is then 1/eps).
    * ``mvdr``: 1 / (a^H (R_+ + delta I)^-1 a), R_+ = R with negative eigenvalues clipped to 0, diagonal
      loading delta = ``loading`` * tr(R_+)/N (relative to the mean eigenvalue; 1e-3 by default), so it
      is finite for a rank-deficient R_true and in the units of R.
    ``model``: the steering model of the scan. "separable" (default) uses the grid's Kronecker contraction (fast; an
    estimator's approximation, :mod:`workbench.grid`); "exact" or "fresnel" form every steering vector (for small
    grids such as the spectrum views of one scene; a spectrum of the physics then peaks at the true sources).
    Returns [B,P,T,Q], float32 for complex64 input and float64 for complex128 input, on R's device.
    """
    R, grid = _checked(R, system, grid, method)
    if method == "music":
        if K is None:
            raise ConfigError("K: MUSIC needs the number of sources per scene (or use localise(..., K=None) to estimate it)")
        K = check_K(K, R.shape[0], system.N, k_min=0).to(R.device)
    F = _projector_factor(R, method, K, loading).to(R.dtype)
    check_choice("model", model, STEERING_MODELS)
    q = _grid_quadratic(F, system, grid) if model == "separable" else _exact_quadratic(F, system, grid, model)
    return _spectrum_values(q, method)


def music_spectrum(R: torch.Tensor, system: SystemConfig, K, grid: Grid | None = None) -> torch.Tensor:
    """MUSIC spectrum [B,P,T,Q]; see :func:`spectrum`."""
    return spectrum(R, system, grid, "music", K=K)


def mvdr_spectrum(R: torch.Tensor, system: SystemConfig, grid: Grid | None = None, loading: float = 1e-3) -> torch.Tensor:
    """MVDR spectrum [B,P,T,Q]; see :func:`spectrum`."""
    return spectrum(R, system, grid, "mvdr", loading=loading)


# ---------------------------------------------------------------------------------------------
# Peaks and refinement
def find_peaks(spec: torch.Tensor, grid: Grid, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K[b] largest local maxima (26-neighbourhood, edges included) of spec [B,P,T,Q].

    Returns (idx [B,Kp,3] int64 grid indices (p,t,q), value [B,Kp], valid [B,Kp] bool), Kp = max(K, 1);
    a slot is invalid beyond a scene's K or when the spectrum has fewer local maxima than K."""
    B = spec.shape[0]
    pooled = nnf.max_pool3d(spec[:, None], kernel_size=3, stride=1, padding=1)[:, 0]
    vals = torch.where(spec >= pooled, spec, torch.full_like(spec, -math.inf)).reshape(B, -1)
    kp = min(max(int(K.max()) if K.numel() else 1, 1), vals.shape[1])
    value, flat = vals.topk(kp, dim=1)
    valid = (torch.arange(kp, device=spec.device)[None, :] < K[:, None]) & torch.isfinite(value)
    return grid.unravel(flat), value, valid


def _orthonormal_signal_part(E: torch.Tensor, Q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """U = the ``keep``[b] dominant left singular vectors of P_Q^perp E (E [B,N,J], Q [B,N,J'] orthonormal
    columns or zero), other columns zeroed: [B,N,J]."""
    X = E - Q @ (Q.mH @ E)
    U = torch.linalg.svd(X, full_matrices=False)[0]
    return U * (torch.arange(U.shape[-1], device=U.device)[None, :] < keep[:, None])[:, None, :]


def _append_orthonormal(Q: torch.Tensor, a: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[Q, q] with q the unit part of a [B,N] orthogonal to Q [B,N,J] (one Gram-Schmidt step, repeated once
    for accuracy); a zero column where ``valid`` [B] is False: [B,N,J+1]."""
    v = a
    for _ in range(2):
        v = v - (Q @ (Q.mH @ v[..., None]))[..., 0]
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat((Q, (v * valid[:, None])[..., None]), -1)


def sequential_music(
    E: torch.Tensor, system: SystemConfig, grid: Grid, K: torch.Tensor, refine: bool = True, iters: int = 30,
    min_residual: float = RAP_MIN_RESIDUAL, scan_dtype: torch.dtype = torch.complex64,
) -> tuple[torch.Tensor, ...]:
    """RAP-MUSIC (Mosher and Leahy 1999): one source per grid scan, each found steering vector projected out.

    E [B,N,J] complex128 signal-subspace eigenvectors (columns beyond each scene's K zeroed), K [B] int64.
    Scan j maximises the squared subspace correlation between P^perp a(g) and P^perp E over the grid,
    ||U^H a||^2 / ||P^perp a||^2 with P^perp the projector off the j vectors found so far and U the K - j
    dominant directions of P^perp E (:func:`_rap_correlation`), then refines the pick on the same
    continuous objective (:func:`refine_peaks` with ``Q``, complex128; the grid scans run in ``scan_dtype``).
    Scan 0 is plain MUSIC's largest peak. Unlike
    the K largest local maxima of one MUSIC spectrum, this separates two sources that fall into one grid
    peak (closer than about two grid steps): after the first is projected out the second stands alone.
    Then all sources are refined together (:func:`joint_subspace_refine`).
    Returns (idx [B,Kp,3] grid picks, value [B,Kp] the RAP spectrum 1/(1 - correlation) at each pick,
    valid [B,Kp], phi, theta, r [B,Kp] float64), Kp = max(K, 1)."""
    B, N, _ = E.shape
    kp = max(int(K.max()), 1)
    Q = E.new_zeros(B, N, 0)
    residual = torch.ones(B, *grid.shape, dtype=scan_dtype.to_real(), device=E.device)  # ||P^perp a(g)||^2
    out = {k: [] for k in ("idx", "value", "valid", "phi", "theta", "r")}
    for j in range(kp):
        U = _orthonormal_signal_part(E, Q, K - j)
        if j:
            residual = residual - _grid_quadratic(Q[..., -1:].to(scan_dtype), system, grid)
        corr = _rap_correlation(_grid_quadratic(U.to(scan_dtype), system, grid), residual, min_residual).reshape(B, -1)
        best, flat = corr.max(-1)
        idx = grid.unravel(flat)
        valid = (K > j) & (best > 0)
        phi, theta, r = grid.coords(idx)
        if refine and valid.any():
            phi, theta, r = (t[:, 0] for t in refine_peaks(U, system, grid, phi[:, None], theta[:, None], r[:, None],
                                                           valid[:, None], "music", iters, Q=Q))
        Q = _append_orthonormal(Q, steering(system, phi, theta, r).to(E.dtype), valid)
        for k, v in zip(out, (idx, _spectrum_values(best, "music"), valid, phi, theta, r)):
            out[k].append(v)
    idx, value, valid, phi, theta, r = (torch.stack(v, 1) for v in out.values())
    if refine and kp > 1:
        phi, theta, r = joint_subspace_refine(E, system, grid, valid, phi, theta, r, iters)
    return idx, value, valid, phi, theta, r


@dataclass
class Localisation:
    """Estimated sources: phi, theta [B,Kp] radians, r [B,Kp] metres (float64), mask [B,Kp] bool (True for
    a detected source), K [B] int64 (the K used), value [B,Kp] the spectrum at the grid peak, and the
    unrefined grid estimates grid_phi, grid_theta, grid_r [B,Kp]."""

    phi: torch.Tensor
    theta: torch.Tensor
    r: torch.Tensor
    mask: torch.Tensor
    K: torch.Tensor
    value: torch.Tensor
    grid_phi: torch.Tensor
    grid_theta: torch.Tensor
    grid_r: torch.Tensor


def localise(
    R: torch.Tensor,
    system: SystemConfig,
    grid: Grid | None = None,
    method: str = "music",
    K=None,
    refine: bool = True,
    k_method: str = "mdl",
    n_snapshots: int | None = None,
    loading: float = 1e-3,
    iters: int = 30,
    sequential: bool = True,
) -> Localisation:
    """Locate sources: spectrum over the grid, peak picking, sub-grid refinement.

    R [B,N,N] complex Hermitian; K an int or [B] ints in [0, N-1], or None to estimate it per scene by
    ``k_method`` ("mdl" | "aic", :func:`count_sources`, with ``n_snapshots`` defaulting to system.L and the
    count capped at system.K_max). ``loading`` is MVDR's relative diagonal loading (see :func:`spectrum`).

    Peaks: MUSIC with ``sequential`` (default) runs RAP-MUSIC (:func:`sequential_music`), one scan per
    source; otherwise (and for MVDR) the K largest local maxima of one spectrum (:func:`find_peaks`), which
    merges two sources closer than about two grid steps into one peak and then takes a sidelobe as the
    K-th source (measured on noise-free R_true in notebook 05's default run, 16 scenes per SNR: 15-105 deg errors
    in 4 of the 80 scenes, pairs with |a_i^H a_j|^2 = 0.39-0.79).
    """
    R, grid = _checked(R, system, grid, method)
    if K is None:
        K = count_sources(R, system.L if n_snapshots is None else n_snapshots, k_method, k_max=system.K_max)
    K = check_K(K, R.shape[0], system.N, k_min=0).to(R.device)
    F = _projector_factor(R, method, K, loading)
    if method == "music" and sequential:
        idx, value, valid, phi, theta, r = sequential_music(F, system, grid, K, refine, iters, scan_dtype=R.dtype)
        gphi, gth, gr = grid.coords(idx)
        return Localisation(phi=phi, theta=theta, r=r, mask=valid, K=K, value=value, grid_phi=gphi, grid_theta=gth, grid_r=gr)
    spec = _spectrum_values(_grid_quadratic(F.to(R.dtype), system, grid), method)
    idx, value, valid = find_peaks(spec, grid, K)
    gphi, gth, gr = grid.coords(idx)
    if refine and valid.any():
        phi, theta, r = refine_peaks(F, system, grid, gphi, gth, gr, valid, method, iters)
    else:
        phi, theta, r = gphi, gth, gr
    return Localisation(phi=phi, theta=theta, r=r, mask=valid, K=K, value=value, grid_phi=gphi, grid_theta=gth, grid_r=gr)


# ---------------------------------------------------------------------------------------------
# Source counting
def information_criteria(eigvals: torch.Tensor, n_snapshots: int, floor_rel: float | None = None) -> dict[str, torch.Tensor]:
    """Wax-Kailath MDL and AIC for k = 0..N-1 sources from eigenvalues [B,N] (any order): {"mdl", "aic"} [B,N].

    With lambda sorted descending, m = N - k, a(k) and g(k) the arithmetic and geometric means of the m
    smallest eigenvalues, and n = ``n_snapshots``:
        LL(k)  = n m log(a(k) / g(k))          (>= 0; minus the log-likelihood ratio of "m equal eigenvalues")
        MDL(k) = LL(k) + k (2N - k) log(n) / 2
        AIC(k) = 2 LL(k) + 2 k (2N - k)
    Eigenvalues are floored at ``floor_rel`` * lambda_max (default N * eps of the input dtype), so a
    rank-deficient matrix (R_true, a low-rank R_pred) has an exactly flat tail instead of log(0).
    """
    if isinstance(n_snapshots, bool) or not isinstance(n_snapshots, int) or n_snapshots < 1:
        raise ConfigError(f"n_snapshots = {n_snapshots!r}: expected an integer >= 1")
    lam = eigvals.to(torch.float64).sort(dim=-1, descending=True).values
    N = lam.shape[-1]
    if floor_rel is None:
        floor_rel = N * torch.finfo(eigvals.dtype).eps
    lam = torch.maximum(lam, (floor_rel * lam[..., :1]).clamp_min(torch.finfo(torch.float64).tiny))
    tail_sum = lam.flip(-1).cumsum(-1).flip(-1)  # [k] = sum of lam[k:]
    tail_log = lam.log().flip(-1).cumsum(-1).flip(-1)
    k = torch.arange(N, dtype=torch.float64, device=lam.device)
    m = N - k
    LL = n_snapshots * m * ((tail_sum / m).log() - tail_log / m)
    free = k * (2 * N - k)
    return {"mdl": LL + 0.5 * free * math.log(n_snapshots), "aic": 2 * LL + 2 * free}


def count_sources(R: torch.Tensor, n_snapshots: int, method: str = "mdl", k_max: int | None = None, floor_rel: float | None = None) -> torch.Tensor:
    """Number of sources per scene by MDL or AIC (Wax and Kailath 1985), [B] int64 in [0, k_max].

    R [B,N,N] complex Hermitian. Assumptions: the criteria model R as the sample covariance of
    ``n_snapshots`` i.i.d. circular Gaussian N-vectors whose true covariance is rank-k plus sigma^2 I, and
    need n_snapshots >= N for the N - k smallest sample eigenvalues to be non-zero. For the pipeline's
    covariances this does not hold: the L = 16 measurements have M = 16 entries each, so no estimate of
    the N = 144 RIS covariance is a Wishart sample covariance. Then ``n_snapshots`` is only a confidence
    weight: the likelihood term grows like n times the spread of the tail eigenvalues and the penalty
    like log(n). With an exactly flat tail (R_true up to the floor, R_pred + C_EPS I) every n gives the
    rank; with an uneven tail (R_samp, an approximate R_pred) a larger n counts more sources. The
    workbench passes system.L by convention. ``k_max`` defaults to N - 1.
    """
    check_choice("count method", method, COUNT_METHODS)
    if R.ndim == 2:
        R = R[None]
    if R.ndim != 3 or R.shape[-1] != R.shape[-2]:
        raise ConfigError(f"R: expected a tensor of square matrices [B, N, N], got shape {tuple(R.shape)}")
    N = R.shape[-1]
    k_max = N - 1 if k_max is None else k_max
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 0 <= k_max <= N - 1:
        raise ConfigError(f"k_max = {k_max!r} is out of range: allowed [0, N - 1 = {N - 1}]")
    lam = torch.linalg.eigvalsh(R)
    crit = information_criteria(lam, n_snapshots, floor_rel)[method]
    return crit[..., : k_max + 1].argmin(-1)
