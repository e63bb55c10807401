"""Sub-grid refinement of localisation picks: damped Newton on a covariance's continuous objectives, with the
gradients and Hessians in closed form.

Two objectives of the signal subspace: per source, the spectrum's denominator (MUSIC's 1 - ||F^H a||^2, MVDR's
a^H R^-1 a, and RAP-MUSIC's correlation given the steering vectors already found, :func:`refine_peaks`), and all of a
scene's sources at once, ||P_A^perp E_s||_F^2 (:func:`joint_subspace_refine`). Both work in (phi, theta, 1/r) scaled
by the grid's steps, float64/complex128, on the device of their input; steering derivatives come only from
:func:`workbench.physics.steering_derivatives`.

Owns: both objectives and their derivatives, the two refinements, RAP-MUSIC's correlation
(:func:`_rap_correlation`, :data:`RAP_MIN_RESIDUAL`). Must not: scan grids or pick peaks (:mod:`workbench.localisation`
does, and calls these), count sources, score against the truth, model the snapshots (:mod:`workbench.likelihood`).
"""

from __future__ import annotations

import math

import torch

from .config import SystemConfig
from .grid import Grid
from .physics import steering, steering_derivatives

RAP_MIN_RESIDUAL = 0.05  # RAP-MUSIC ignores grid points with ||P_Q^perp a||^2 below this (|a^H a_found|^2 > 0.95)


def _rap_correlation(q: torch.Tensor, residual: torch.Tensor, min_residual: float = RAP_MIN_RESIDUAL) -> torch.Tensor:
    """RAP-MUSIC's squared subspace correlation ||U^H a||^2 / ||P_Q^perp a||^2 from q = ||U^H a||^2 and
    residual = ||P_Q^perp a||^2 (any shape, real); 0 where the residual is below ``min_residual`` (there the
    ratio is 0/0: the point is one of the found sources, or indistinguishable from one)."""
    ok = residual > min_residual
    return torch.where(ok, q / torch.where(ok, residual, torch.ones_like(residual)), torch.zeros_like(q)).clamp(0.0, 1.0)


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
