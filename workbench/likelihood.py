"""The stochastic snapshot model of one scene, and what follows from it: likelihood, score, Fisher information,
the Cramer-Rao bound and each source's array SNR.

y_l ~ CN(0, C_l), C_l = G_l R G_l^H + sigma^2 I_M with G_l = H diag(c_l) (the BS-RIS channel and the l-th RIS
configuration) and R = sum_k p_k a_k a_k^H. Float64/complex128 inside; radians and metres; powers in mW.

Owns: :func:`snapshot_model` (negative log-likelihood, score, Slepian-Bangs Fisher matrix), :func:`snapshot_nll` (the
likelihood alone), :func:`atoms` (b_lk = G_l a_k), :func:`whiten` (the coordinates where a fitted model's covariance
is white) and :func:`inverse_factor` (its inverse in low-rank form), :func:`crb` / :func:`crb_for` and
:func:`array_snr` (each source's per-snapshot SNR on the array). Must not: fit sources (the maximum-likelihood fit is
:mod:`workbench.ml_fit`), localise from a covariance matrix (MUSIC/MVDR are :mod:`workbench.localisation`), hold the
matched filter (:mod:`workbench.matched_filter`), simulate scenes or loop over SNRs (studies do), draw.
"""
from __future__ import annotations

import math

import torch

from .config import ConfigError, SystemConfig
from .physics import SceneBatch, measurement_matrices, steering, steering_derivatives


# ---------------------------------------------------------------------------------------------
# The stochastic snapshot model: likelihood, score and Fisher information
#
# y_l ~ CN(0, C_l), C_l = G_l R G_l^H + sigma^2 I_M, G_l = H diag(c_l), R = sum_k p_k a_k a_k^H, l = 1..L
# independent (i.i.d. symbols, one snapshot per RIS configuration). Every derivative of C_l is a sum of
# outer products of the atoms b_lk = G_l a_k and d_lkc = G_l da_k/dc (c = phi, theta, r), so with
# Z_l = [b_l1..b_lK, d_l11..d_lK3] (M x 4K) and W_l = C_l^-1 Z_l the traces of the score and of the
# Slepian-Bangs Fisher matrix reduce to the small Gram matrices Z^H C^-1 Z and W^H W (:func:`snapshot_model`).
def _steering_jacobian(system: SystemConfig, phi, theta, r) -> tuple[torch.Tensor, torch.Tensor]:
    """Steering vectors A [B,K,N] and their derivatives D [B,K,3,N] in (phi, theta, r), complex128, in closed form
    (:func:`~workbench.physics.steering_derivatives`, whose third coordinate is 1/r: d/dr = -d/d(1/r) / r^2).
    phi, theta, r [B,K] float64."""
    inv_r = 1.0 / r
    A, D, _ = steering_derivatives(system, phi, theta, inv_r, second=False)
    return A, D * torch.stack([torch.ones_like(r), torch.ones_like(r), -inv_r * inv_r], -1)[..., None].to(D.dtype)


def _apply(G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """G_l v_k for G [B,L,M,N] and vectors V [B,K,N]: [B,L,K,M] complex128, as one [L M, N] x [N, K] product per
    scene (no copy of G) in G's precision (the ML fit passes a complex64 G: 2x faster, errors ~1e-7 relative)."""
    B, L, M, N = G.shape
    return (G.reshape(B, L * M, N) @ V.to(G.dtype).mT).reshape(B, L, M, -1).transpose(-1, -2).to(torch.complex128)


def _snapshot_cholesky(b: torch.Tensor, power: torch.Tensor, noise_var: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor [B,L,M,M] of C_l = sum_k p_k b_lk b_lk^H + sigma^2 I: b [B,L,K,M], power [B,K],
    noise_var [B]."""
    M = b.shape[-1]
    eye = torch.eye(M, dtype=b.dtype, device=b.device)
    C = torch.einsum("bk,blkm,blkn->blmn", power.to(b.dtype), b, b.conj()) + noise_var.to(b.dtype)[:, None, None, None] * eye
    return torch.linalg.cholesky(C)


def _snapshot_inverse(b: torch.Tensor, power: torch.Tensor, noise_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C_l^-1 [B,L,M,M] and log det C_l [B,L] of C_l (:func:`_snapshot_cholesky`). (The explicit inverse: batched
    ``cholesky_solve`` of these 16 x 16 systems was measured 14x slower on CPU than ``cholesky_inverse`` and a
    product.)"""
    chol = _snapshot_cholesky(b, power, noise_var)
    return torch.cholesky_inverse(chol), 2 * torch.diagonal(chol, dim1=-2, dim2=-1).real.log().sum(-1)


def _nll(Cinv: torch.Tensor, logdet: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood sum_l [log det C_l + y_l^H C_l^-1 y_l] (without L M log pi), [B], from
    :func:`_snapshot_inverse` and the snapshots y [B,L,M]."""
    return (logdet + (y.conj() * (Cinv @ y[..., None])[..., 0]).real.sum(-1)).sum(-1)


def snapshot_model(
    system: SystemConfig, G: torch.Tensor, phi, theta, r, power, noise_var, mask=None, y: torch.Tensor | None = None,
    nuisance: bool = True,
) -> dict[str, torch.Tensor]:
    """Fisher information, and with snapshots ``y`` the score and the negative log-likelihood, of the
    stochastic model above, float64.

    G [B,L,M,N] complex (:func:`~workbench.physics.measurement_matrices`); phi, theta [B,K] rad, r [B,K] m,
    power [B,K], noise_var [B] (any consistent units), mask [B,K] bool (None: all real), y [B,L,M].
    Parameters, in this order: (phi_k, theta_k, r_k) for k = 1..K (index 3k + c), then, when ``nuisance``,
    p_1..p_K and sigma^2 (P = 4K+1; else P = 3K). Returns {"fisher": [B,P,P]
    F_ij = sum_l Re tr(C_l^-1 dC_l/dth_i C_l^-1 dC_l/dth_j) (padded slots: identity block, decoupled),
    and with y: "score": [B,P] the gradient of the log-likelihood (zero in padded slots),
    "nll": [B] sum_l log det C_l + y_l^H C_l^-1 y_l}."""
    dev, c128, f64 = G.device, torch.complex128, torch.float64
    phi, theta, r, power = (torch.as_tensor(t, device=dev).to(f64) for t in (phi, theta, r, power))
    mask = torch.ones_like(phi, dtype=torch.bool) if mask is None else torch.as_tensor(mask, device=dev)
    s2 = torch.as_tensor(noise_var, device=dev).to(f64).reshape(-1)
    B, K = phi.shape
    L, M = G.shape[1], G.shape[2]
    p = power * mask
    A, D = _steering_jacobian(system, phi, theta, torch.where(mask, r, torch.ones_like(r)))
    b = _apply(G, A) * mask[:, None, :, None]  # [B,L,K,M]
    d = _apply(G, D.reshape(B, 3 * K, -1)).reshape(B, L, K, 3, M) * mask[:, None, :, None, None]  # [B,L,K,3,M]
    Cinv, logdet = _snapshot_inverse(b, p, s2)
    Z = torch.cat((b, d.reshape(B, L, 3 * K, M)), 2).mT  # [B,L,M,4K]
    W = Cinv @ Z
    gram = Z.mH @ W  # Z^H C^-1 Z, [B,L,4K,4K]
    bb, bd = gram[..., :K, :K], gram[..., :K, K:].reshape(B, L, K, K, 3)  # b_k^H C^-1 b_j, b_k^H C^-1 d_jc
    dd = gram[..., K:, K:].reshape(B, L, K, 3, K, 3)
    pp = p[:, :, None, None, None] * p[:, None, None, :, None]
    # F[(k,c),(j,e)] = 2 p_k p_j Re sum_l (b_k^H C^-1 d_je  b_j^H C^-1 d_kc + b_k^H C^-1 b_j  d_je^H C^-1 d_kc)
    F_ll = 2 * pp * (torch.einsum("blkje,bljkc->bkcje", bd, bd) + torch.einsum("blkj,bljekc->bkcje", bb, dd)).real
    blocks = [[F_ll.reshape(B, 3 * K, 3 * K)]]
    pmask = mask.repeat_interleave(3, dim=1)
    bd_own = torch.diagonal(bd, dim1=2, dim2=3).permute(0, 1, 3, 2)  # b_k^H C^-1 d_kc, [B,L,K,3]
    if nuisance:
        gram2 = W.mH @ W  # Z^H C^-2 Z
        bd2_own = torch.diagonal(gram2[..., :K, K:].reshape(B, L, K, K, 3), dim1=2, dim2=3).permute(0, 1, 3, 2)
        F_lp = 2 * p[:, :, None, None] * torch.einsum("blkj,bljkc->bkcj", bb, bd).real  # [B,K,3,K]
        F_pp = bb.abs().square().sum(1)
        F_ls = 2 * p[:, :, None] * bd2_own.real.sum(1)  # [B,K,3]
        F_ps = torch.diagonal(gram2[..., :K, :K], dim1=-2, dim2=-1).real.sum(1)  # [B,K]
        F_ss = Cinv.abs().square().sum((1, 2, 3))
        F_lp, F_ls = F_lp.reshape(B, 3 * K, K), F_ls.reshape(B, 3 * K, 1)
        blocks = [[blocks[0][0], F_lp, F_ls], [F_lp.mT, F_pp, F_ps[:, :, None]], [F_ls.mT, F_ps[:, None, :], F_ss[:, None, None]]]
        pmask = torch.cat((pmask, mask, torch.ones(B, 1, dtype=torch.bool, device=dev)), dim=1)
    out = {"fisher": torch.cat([torch.cat(row, -1) for row in blocks], -2) + torch.diag_embed((~pmask).to(f64))}
    if y is not None:
        y = y.to(c128)
        w = (Cinv @ y[..., None])[..., 0]  # C^-1 y, [B,L,M]
        om = (Z.conj() * w[..., :, None]).sum(-2)  # Z^H C^-1 y, [B,L,4K]
        ob, od = om[..., :K], om[..., K:].reshape(B, L, K, 3)
        score = [(2 * p[:, :, None] * (ob.conj()[..., None] * od - bd_own).real.sum(1)).reshape(B, 3 * K)]
        if nuisance:
            bb_own = torch.diagonal(bb, dim1=-2, dim2=-1).real
            score += [(ob.abs().square() - bb_own).sum(1),
                      (w.abs().square().sum(-1) - torch.diagonal(Cinv, dim1=-2, dim2=-1).real.sum(-1)).sum(1, keepdim=True)]
        out["score"] = torch.cat(score, -1)
        out["nll"] = _nll(Cinv, logdet, y)
    return out


# ---------------------------------------------------------------------------------------------
# Cramer-Rao bound
def fisher_information(
    system: SystemConfig, H, codes, phi, theta, r, power, noise_var, mask=None, nuisance: bool = True
) -> torch.Tensor:
    """Fisher information of the stochastic measurement model, [B,P,P] float64 (Slepian-Bangs).

    The model of :func:`snapshot_model` with G_l = H diag(c_l): H [B,M,N], codes [B,L,N] complex; phi,
    theta [B,K] rad, r [B,K] m, power [B,K] mW, noise_var [B] (per complex entry), mask [B,K] bool (None:
    all real). Parameters: (phi_k, theta_k, r_k) for k = 1..K (index 3k + c), then, when ``nuisance``, the
    powers p_1..p_K and sigma^2 (P = 4K+1; otherwise P = 3K and the powers and noise variance are known).
    Padded sources get an identity block (decoupled, ignored).
    """
    G = measurement_matrices(H.to(torch.complex128), codes.to(torch.complex128))
    return snapshot_model(system, G, phi, theta, r, power, noise_var, mask, nuisance=nuisance)["fisher"]


def crb(system: SystemConfig, H, codes, phi, theta, r, power, noise_var, mask=None, nuisance: bool = True, chunk: int = 32) -> torch.Tensor:
    """Cramer-Rao bound on (phi, theta, r) per source, [B,K,3] float64 variances (rad^2, rad^2, m^2).

    The stochastic (unconditional) model of :func:`fisher_information` with the scene's actual H and RIS
    codes: i.i.d. CN(0, 1) symbols, uncorrelated sources. ``nuisance=True`` (default): the source powers
    and the noise variance are unknown nuisance parameters, the bound is the location block of the full
    inverse Fisher matrix (never below the known-powers bound); ``nuisance=False``: they are known.
    The Fisher matrix is inverted after Jacobi scaling (the parameters' units differ by ~10 decades).
    Padded slots (mask False) are NaN. Raises ConfigError for a coherent-symbol system (the model then
    does not hold). Scenes are processed ``chunk`` at a time.
    """
    if system.coherent:
        raise ConfigError("system.coherent = True: the stochastic CRB assumes i.i.d. symbols per snapshot (coherent = False)")
    phi = torch.as_tensor(phi)
    mask = torch.ones(phi.shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
    out = []
    for s in range(0, phi.shape[0], chunk):
        sl = slice(s, s + chunk)
        Fim = fisher_information(
            system, H[sl], codes[sl], phi[sl], theta[sl], r[sl], power[sl], torch.as_tensor(noise_var).reshape(-1)[sl], mask[sl], nuisance
        )
        d = Fim.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
        inv = torch.linalg.inv(Fim * d[:, :, None] * d[:, None, :]) * d[:, :, None] * d[:, None, :]
        K = phi.shape[1]
        out.append(inv.diagonal(dim1=-2, dim2=-1)[:, : 3 * K].reshape(-1, K, 3))
    bound = torch.cat(out)
    return torch.where(mask.to(bound.device)[..., None], bound, torch.full_like(bound, math.nan))


def crb_for(batch: SceneBatch, system: SystemConfig, nuisance: bool = True) -> torch.Tensor:
    """:func:`crb` of a simulated :class:`~workbench.physics.SceneBatch`: [n,K_max,3] float64, NaN when padded."""
    return crb(system, batch.H, batch.codes, batch.phi, batch.theta, batch.r, batch.power, batch.noise_var, batch.mask, nuisance)


def array_snr(system: SystemConfig, H, codes, phi, theta, r, power, noise_var, mask=None) -> torch.Tensor:
    """Each source's per-snapshot array SNR p_k mean_l ||G_l a_k||^2 / sigma^2 [B,K] float64 (linear; G_l = H diag(c_l),
    exact steering): the signal power a source alone puts on the M antennas per snapshot over the noise there.
    H [B,M,N], codes [B,L,N] complex; phi, theta [B,K] rad, r [B,K] m, power [B,K] mW, noise_var [B] mW; mask [B,K]
    bool (None: all real): 0 in padded slots. The detector prunes on it; the studies bin misses by it (with the true
    powers and noise variance it is oracle knowledge, used for analysis only)."""
    c128, f64 = torch.complex128, torch.float64
    Hc, C = H.to(c128), codes.to(c128)
    Qm = (Hc.mH @ Hc) * (C.mH @ C) / C.shape[1]  # mean_l ||G_l a||^2 = a^H Qm a
    r = r.to(f64) if mask is None else torch.where(mask, r.to(f64), torch.full_like(r, system.r_max_m, dtype=f64))
    a = steering(system, phi.to(f64), theta.to(f64), r)
    snr = power.to(f64) * torch.einsum("bkn,bnm,bkm->bk", a.conj(), Qm, a).real / noise_var.to(f64)[:, None]
    return snr if mask is None else snr * mask


def atoms(system: SystemConfig, G: torch.Tensor, phi, theta, r, mask: torch.Tensor | None = None) -> torch.Tensor:
    """b_lk = G_l a(phi_k, theta_k, r_k), [B,L,K,M] complex128. With ``mask`` [B,K]: the atoms of unmasked slots are
    zero (their r, which may be a placeholder, is not used)."""
    if mask is None:
        return _apply(G, steering(system, phi, theta, r))
    return _apply(G, steering(system, phi, theta, torch.where(mask, r, torch.ones_like(r)))) * mask[:, None, :, None]


def whiten(G: torch.Tensor, y: torch.Tensor, b: torch.Tensor, power: torch.Tensor, noise_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The measurement matrices and snapshots in the coordinates where the fitted model's covariance is white:
    (T_l G_l, T_l y_l) with T_l = chol(C_l)^-1, so T_l C_l T_l^H = I (C_l of the sources b [B,L,K,M] with powers
    [B,K] and the noise variance [B], as in the likelihood). G [B,L,M,N], y [B,L,M] -> ([B,L,M,N], [B,L,M]),
    complex128 (the learned localiser's whitened re-reading; :func:`inverse_factor` gives what one more source needs
    without transforming G)."""
    chol = _snapshot_cholesky(b, power, noise_var)
    Gw = torch.linalg.solve_triangular(chol, G.to(chol.dtype), upper=False)
    yw = torch.linalg.solve_triangular(chol, y[..., None].to(chol.dtype), upper=False)[..., 0]
    return Gw, yw


def inverse_factor(b: torch.Tensor, power: torch.Tensor, noise_var: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fitted model's inverse covariance in low-rank form, C_l^-1 = (I - E_l E_l^H) / sigma^2, and what it leaves of
    the snapshots, r_l = (I - E_l E_l^H) y_l = sigma^2 C_l^-1 y_l. b [B,L,K,M] the fitted sources' atoms, power [B,K]
    (0: no part), noise_var [B], y [B,L,M] -> (E [B,L,M,K], r [B,L,M]), complex128.

    With U_l = [sqrt(p_k) b_lk]_k (M x K) and R_l R_l^H = sigma^2 I + U_l^H U_l (Cholesky, K x K), E_l = U_l R_l^-H
    (Woodbury). I - E E^H keeps sigma^2 / (sigma^2 + lambda) of each fitted direction of energy lambda: the stochastic
    counterpart of projecting the atoms out (:func:`workbench.matched_filter.project_out`), which it becomes as
    sigma^2 -> 0. One more source u_l then changes the likelihood through u^H C^-1 u = (||u||^2 - ||E^H u||^2) / sigma^2
    and u^H C^-1 y = u^H r / sigma^2 alone (:func:`workbench.matched_filter.gain_scan`)."""
    U = b.mT.to(torch.complex128) * power.clamp_min(0).sqrt().to(torch.complex128)[:, None, None, :]  # [B,L,M,K]
    K = U.shape[-1]
    eye = torch.eye(K, dtype=U.dtype, device=U.device)
    R = torch.linalg.cholesky(U.mH @ U + noise_var.to(U.dtype)[:, None, None, None] * eye)
    E = torch.linalg.solve_triangular(R, U.mH, upper=False).mH  # U R^-H
    y = y.to(U.dtype)
    return E, y - (E @ (E.mH @ y[..., None]))[..., 0]


def snapshot_nll(system: SystemConfig, G: torch.Tensor, phi, theta, r, power, noise_var, mask, y: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood alone (no score, no Fisher matrix: the cheap test of a proposed step), [B]: G
    [B,L,M,N], phi, theta, r, power [B,K] (r ignored and power zeroed where ``mask`` [B,K] is False), noise_var [B], y
    [B,L,M]; as :func:`snapshot_model`'s "nll"."""
    b = atoms(system, G, phi, theta, r, mask)
    return _nll(*_snapshot_inverse(b, power * mask, noise_var), y)
