"""Localisation from a covariance: near-field MUSIC (RAP-MUSIC) and MVDR, MDL/AIC.

Everything is batched (covariances [B, N, N], complex) and runs on the device of its input. Steering
vectors come only from :func:`workbench.physics.steering`. Radians and metres inside; degrees only in the
metrics' names (``*_deg``).

Owns: spectra over a :class:`~workbench.grid.Grid`, peak picking (RAP-MUSIC by default) and refinement,
source counting from eigenvalues. Must not: score estimates against the truth (:mod:`workbench.metrics`), model the snapshots (the likelihood
and the Cramer-Rao bound are :mod:`workbench.likelihood`, the maximum-likelihood baseline :mod:`workbench.ml_fit`), simulate scenes or
loop over SNRs (the studies in :mod:`workbench.studies.localisation` do), draw figures.

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
from .physics import steering, steering_derivatives

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


def _objective(F: torch.Tensor, system: SystemConfig, u: torch.Tensor, scale: torch.Tensor, method: str,
               Q: torch.Tensor | None = None) -> torch.Tensor:
    """Spectrum denominator at scaled points u [B,Kp,3] (phi, theta, 1/r over their grid steps): [B,Kp].

    With ``Q`` [B,N,J] (orthonormal, the steering vectors already found; MUSIC only) the MUSIC quadratic form
    is the RAP-MUSIC correlation ||F^H a||^2 / ||P_Q^perp a||^2 (:func:`_rap_correlation`)."""
    x = u * scale
    a = steering(system, x[..., 0], x[..., 1], 1.0 / x[..., 2])  # [B,Kp,N] complex128
    q = _quadratic_at(F, a)
    if Q is not None:
        q = _rap_correlation(q, 1.0 - _quadratic_at(Q, a))
    return 1.0 - q if method == "music" else q


def _quadratic_at(F: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_j |f_j^H a_k|^2 for F [B,N,J] and vectors a [B,Kp,N]: [B,Kp] real."""
    return torch.view_as_real(torch.einsum("bnj,bkn->bkj", F.conj(), a)).square().sum((-1, -2))


def _quadratic_derivatives(F: torch.Tensor, a, da, d2a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q = sum_j |f_j^H a|^2 and its gradient and Hessian from a vector's derivatives: F [B,N,J], a [B,Kp,N],
    da [B,Kp,P,N], d2a [B,Kp,P,P,N] -> q [B,Kp], dq [B,Kp,P], d2q [B,Kp,P,P] real (dq_i = 2 Re v^H v_i,
    d2q_ij = 2 Re (v_j^H v_i + v^H v_ij) with v = F^H a)."""
    Fc = F.conj()
    v = torch.einsum("bnj,bkn->bkj", Fc, a)
    vi = torch.einsum("bnj,bkpn->bkpj", Fc, da)
    vij = torch.einsum("bnj,bkpqn->bkpqj", Fc, d2a)
    q = torch.view_as_real(v).square().sum((-1, -2))
    dq = 2 * (v.conj()[:, :, None] * vi).real.sum(-1)
    d2q = 2 * ((vi.conj()[:, :, None] * vi[:, :, :, None]).real.sum(-1) + (v.conj()[:, :, None, None] * vij).real.sum(-1))
    return q, dq, d2q


def _objective_derivatives(F: torch.Tensor, system: SystemConfig, u: torch.Tensor, scale: torch.Tensor, method: str,
                           Q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_objective` at u [B,Kp,3] with its gradient [B,Kp,3] and Hessian [B,Kp,3,3] in u, in closed form
    (:func:`~workbench.physics.steering_derivatives`; what autograd's double backward gives, without its cost). With
    ``Q`` the RAP-MUSIC ratio q / (1 - t) by the quotient rule, zero with zero derivatives where
    :func:`_rap_correlation` gives 0 or clamps, as autograd would."""
    x = u * scale
    a, da, d2a = steering_derivatives(system, x[..., 0], x[..., 1], x[..., 2])
    da = da * scale[:, None].to(da.dtype)  # d/du = scale d/dx
    d2a = d2a * (scale[:, None] * scale[None, :])[..., None].to(d2a.dtype)
    q, dq, d2q = _quadratic_derivatives(F, a, da, d2a)
    if Q is not None:
        t, dt, d2t = _quadratic_derivatives(Q, a, da, d2a)
        residual = 1.0 - t
        ok = residual > RAP_MIN_RESIDUAL
        res = torch.where(ok, residual, torch.ones_like(residual))
        rho = q / res
        # d(q / res) with d res = -dt: (dq + rho dt) / res, and its derivative again
        drho = (dq + rho[..., None] * dt) / res[..., None]
        d2rho = (d2q + drho[..., :, None] * dt[..., None, :] + drho[..., None, :] * dt[..., :, None]
                 + rho[..., None, None] * d2t) / res[..., None, None]
        inside = ok & (rho >= 0.0) & (rho <= 1.0)  # where the clamp passes the gradient
        q = _rap_correlation(q, residual)
        dq = torch.where(inside[..., None], drho, torch.zeros_like(drho))
        d2q = torch.where(inside[..., None, None], d2rho, torch.zeros_like(d2rho))
    return (1.0 - q, -dq, -d2q) if method == "music" else (q, dq, d2q)


def refine_peaks(
    F: torch.Tensor, system: SystemConfig, grid: Grid, phi, theta, r, valid, method: str, iters: int = 10,
    Q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-grid refinement: damped Newton (Levenberg-Marquardt) on the continuous spectrum denominator.

    F [B,N,J] from the spectrum's eigen-decomposition; phi, theta, r [B,Kp] start points (grid peaks);
    ``Q`` [B,N,J'] the orthonormalised steering vectors found before (RAP-MUSIC's objective, see :func:`_objective`).
    Works in (phi, theta, 1/r) scaled by the grid steps, float64, with the gradient and Hessian in closed form
    (:func:`_objective_derivatives`: autograd's double backward here took 22 of notebook 05's 47 s under a profiler); a
    step is at most one grid cell, is kept only when it lowers the denominator, and stays inside the field of view.
    At most ``iters`` steps, fewer once every slot's step changes the denominator by less than 1e-9 relative
    (converged) or its damping is at the cap. Two sources in one grid peak leave a long curved valley in the
    denominator: 10 steps were measured too few there (0.4-1.6 deg errors on 2 of 12 such pairs), 30 enough.
    Returns refined (phi, theta, r) [B,Kp] float64."""
    dev = F.device
    F = F.to(torch.complex128)
    scale = grid.steps().to(dev)
    x0 = torch.stack((phi, theta, 1.0 / r), -1).to(dev, torch.float64)
    pm, tm = math.radians(system.phi_max_deg), math.radians(system.theta_max_deg)
    lo = torch.tensor([-pm, -tm, 1.0 / system.r_max_m], dtype=torch.float64, device=dev) / scale
    hi = torch.tensor([pm, tm, 1.0 / system.r_min_m], dtype=torch.float64, device=dev) / scale
    u = torch.minimum(torch.maximum(x0 / scale, lo), hi)
    eye = torch.eye(3, dtype=torch.float64, device=dev)
    mu = torch.full(u.shape[:-1], 1e-3, dtype=torch.float64, device=dev)
    for _ in range(iters):
        f, g, Hs = _objective_derivatives(F, system, u, scale, method, Q)
        damp = mu * Hs.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)
        step = -torch.linalg.solve(Hs + damp[..., None, None] * eye, g[..., None])[..., 0]
        step = torch.nan_to_num(step) / step.norm(dim=-1, keepdim=True).clamp_min(1.0)
        u_new = torch.minimum(torch.maximum(u + step, lo), hi)
        with torch.no_grad():
            f_new = _objective(F, system, u_new, scale, method, Q)
        ok = (f_new < f) & valid
        u = torch.where(ok[..., None], u_new, u)
        mu = torch.where(ok, mu * 0.3, mu * 10.0).clamp(1e-12, 1e12)
        if bool((((f - f_new).abs() <= 1e-9 * f.abs() + 1e-13) | (mu >= 1e12) | ~valid).all()):
            break
    x = u.detach() * scale
    return x[..., 0], x[..., 1], 1.0 / x[..., 2]


RAP_MIN_RESIDUAL = 0.05  # RAP-MUSIC ignores grid points with ||P_Q^perp a||^2 below this (|a^H a_found|^2 > 0.95)


def _rap_correlation(q: torch.Tensor, residual: torch.Tensor, min_residual: float = RAP_MIN_RESIDUAL) -> torch.Tensor:
    """RAP-MUSIC's squared subspace correlation ||U^H a||^2 / ||P_Q^perp a||^2 from q = ||U^H a||^2 and
    residual = ||P_Q^perp a||^2 (any shape, real); 0 where the residual is below ``min_residual`` (there the
    ratio is 0/0: the point is one of the found sources, or indistinguishable from one)."""
    ok = residual > min_residual
    return torch.where(ok, q / torch.where(ok, residual, torch.ones_like(residual)), torch.zeros_like(q)).clamp(0.0, 1.0)


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


def _subspace_fit(E: torch.Tensor, A: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E's least-squares fit on the columns of A [B,N,kp] (invalid columns zero): the Gram matrix used [B,kp,kp], the
    coefficients C [B,kp,J] and the residual R = E - A C = P_A^perp E [B,N,J]."""
    gram = A.mH @ A + torch.diag_embed((~valid).to(A.dtype))
    # two slots on one point make the Gram matrix singular: a relative ridge keeps the residual defined (and large)
    gram = gram + 1e-12 * gram.diagonal(dim1=-2, dim2=-1).real.amax(-1)[:, None, None] * torch.eye(gram.shape[-1], dtype=A.dtype, device=A.device)
    coef = torch.linalg.solve(gram, A.mH @ E)
    return gram, coef, E - A @ coef


def _subspace_residual(E: torch.Tensor, system: SystemConfig, u: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """||P_A^perp E||_F^2 [B] for the steering vectors A [B,N,kp] at scaled points u [B,kp,3] (invalid slots left out)."""
    x = u * scale
    A = steering(system, x[..., 0], x[..., 1], 1.0 / x[..., 2]).mT * valid[:, None, :]  # [B,N,kp]
    return torch.view_as_real(_subspace_fit(E, A, valid)[2]).square().sum((-3, -2, -1))


def _subspace_derivatives(E: torch.Tensor, system: SystemConfig, u: torch.Tensor, scale: torch.Tensor,
                          valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_subspace_residual` f = ||R||^2, R = P_A^perp E, with its gradient [B,P] and Hessian [B,P,P] in u [B,kp,3]
    flattened (P = 3 kp, parameter p = 3 k + i moves column k of A), in closed form (variable projection, Golub and
    Pereyra). With d_p = dA/du_p's column (column k(p)), c_p = C's row k(p) and s_p = R^H d_p (both [J]), G the Gram
    matrix and x . y = sum_j x_j y_j: df/du_p = -2 Re c_p . s_p (A^H R = 0); d2f/du_p du_q = -2 Re [T1 + T2 + T3] with
    T1 = -(w_q^H d_p)(c_q^H c_p) - (v_q^H d_p)(s_q . c_p) from dR_q = -w_q c_q^T - v_q (d_q^H R) (w_q = P_A^perp d_q,
    v_q = A G^-1 e_k(q)), T2 = c_p . (R^H d2_pq) (one column's second derivative, so k(p) = k(q) only) and
    T3 = (G^-1)_k(p)k(q) s_q^H s_p - (G^-1 A^H d_q)_k(p) c_q . s_p from dC_q. Equal to autograd's double backward up to
    the Gram matrix's 1e-12 ridge (tests/test_localisation.py)."""
    B, kp, _ = u.shape
    x = u * scale
    a, da, d2a = steering_derivatives(system, x[..., 0], x[..., 1], x[..., 2])
    live = valid.to(a.dtype)
    A = a.mT * live[:, None, :]
    D = (da * scale[:, None].to(da.dtype) * live[..., None, None]).reshape(B, 3 * kp, -1)  # [B,P,N]
    d2 = d2a * (scale[:, None] * scale[None, :])[..., None].to(d2a.dtype) * live[..., None, None, None]
    gram, C, R = _subspace_fit(E, A, valid)
    Ginv = torch.linalg.inv(gram)
    col = torch.arange(kp, device=u.device).repeat_interleave(3)  # k(p)
    Cp = C[:, col]  # [B,P,J]
    S = torch.einsum("bpn,bnj->bpj", D.conj(), R).conj()  # s_p = R^H d_p
    f = torch.view_as_real(R).square().sum((-3, -2, -1))
    g = -2 * (Cp * S).real.sum(-1)
    GAd = torch.einsum("bkl,bpl->bpk", Ginv, torch.einsum("bnk,bpn->bpk", A.conj(), D))  # (G^-1 A^H d_p)_k
    W = D - torch.einsum("bnk,bpk->bpn", A, GAd)
    V = (A @ Ginv).mT[:, col]  # [B,P,N]
    inner = lambda X, Y: torch.einsum("bqn,bpn->bpq", X.conj(), Y)  # noqa: E731  [b,p,q] = X_q^H Y_p
    T1 = -(inner(W, D) * inner(Cp, Cp) + inner(V, D) * inner(S.conj(), Cp))
    s2 = torch.einsum("bkimn,bnj->bkimj", d2.conj(), R).conj()  # R^H d2 per column k: [B,kp,3,3,J]
    T2 = torch.einsum("bkij,bkimj,kl->bkilm", C.unsqueeze(2).expand(-1, -1, 3, -1), s2, torch.eye(kp, dtype=s2.dtype, device=u.device))
    T2 = T2.reshape(B, 3 * kp, 3 * kp)
    T3 = Ginv[:, col][:, :, col] * inner(S, S) - GAd[:, :, col].mT * inner(Cp.conj(), S)
    H = -2 * (T1 + T2 + T3).real
    return f, g, H


def joint_subspace_refine(E: torch.Tensor, system: SystemConfig, grid: Grid, valid: torch.Tensor, phi, theta, r,
                          iters: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All sources of a scene refined together: damped Newton on ||P_A^perp E_s||_F^2, the signal subspace E_s [B,N,J]
    (complex128) outside the span of the K steering vectors A (MUSIC's subspace-fitting form, zero at the truth for a
    noise-free covariance). One source at a time, RAP-MUSIC can leave two close sources off their joint optimum, and
    the separable grid can start a refinement in the wrong basin (measured on noise-free R_true under the exact model:
    a pair 2.6 deg apart at 3.2 and 4.2 m, one source 4.2 deg off; exact after this step). The joint problem has 3K
    coordinates (phi, theta, 1/r scaled by the grid steps), with the gradient and Hessian in closed form
    (:func:`_subspace_derivatives`). A step is kept only where it lowers
    the residual and stays in the field of view. Returns (phi, theta, r) [B,kp] float64."""
    dev = E.device
    E = E.to(torch.complex128)
    B, kp = phi.shape
    scale = grid.steps().to(dev)
    pm, tm = math.radians(system.phi_max_deg), math.radians(system.theta_max_deg)
    lo = (torch.tensor([-pm, -tm, 1.0 / system.r_max_m], dtype=torch.float64, device=dev) / scale).repeat(kp)
    hi = (torch.tensor([pm, tm, 1.0 / system.r_min_m], dtype=torch.float64, device=dev) / scale).repeat(kp)
    u = (torch.stack((phi, theta, 1.0 / r), -1).to(dev, torch.float64) / scale).reshape(B, 3 * kp)
    free = valid.repeat_interleave(3, 1)
    P = 3 * kp
    eye = torch.eye(P, dtype=torch.float64, device=dev)
    mu = torch.full((B,), 1e-3, dtype=torch.float64, device=dev)
    f_of = lambda v: _subspace_residual(E, system, v.reshape(B, kp, 3), scale, valid)  # noqa: E731
    for _ in range(iters):
        f, g, Hs = _subspace_derivatives(E, system, u.reshape(B, kp, 3), scale, valid)
        g = g * free
        Hs = torch.where(free[:, :, None] & free[:, None, :], Hs, eye.expand(B, P, P))
        damp = mu * Hs.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)
        step = -torch.linalg.solve(Hs + damp[:, None, None] * eye, g[..., None])[..., 0]
        step = torch.nan_to_num(step) / step.reshape(B, kp, 3).norm(dim=-1).amax(-1, keepdim=True).clamp_min(1.0)  # <= 1 cell per source
        u_new = torch.minimum(torch.maximum(u + step * free, lo), hi)
        with torch.no_grad():
            f_new = f_of(u_new)
        ok = f_new < f
        u = torch.where(ok[:, None], u_new, u)
        mu = torch.where(ok, mu * 0.3, mu * 10.0).clamp(1e-12, 1e12)
        if bool((((f - f_new).abs() <= 1e-12 * f.abs() + 1e-20) | (mu >= 1e12)).all()):
            break
    x = u.detach().reshape(B, kp, 3) * scale
    return x[..., 0], x[..., 1], 1.0 / x[..., 2]


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
