"""The matched filter on the snapshots over a steering grid, shared by the beamscan R_samp estimator
(:func:`workbench.estimators.beamscan_covariance`) and the start values of the maximum-likelihood fit
(:func:`workbench.ml_fit.ml_localise`).

With G_l [M,N] the l-th measurement matrix (G_l = H diag(c_l)) and a_g the steering vector of grid point g, the atom
of g in snapshot l is u_lg = G_l a_g [M]. A scene's snapshots y [L,M] are scanned by the normalised matched-filter
power sum_l |u_lg^H y_l|^2 / ||u_lg||^2 (:func:`scan`), its maximum picked (:func:`pick`), the picked atoms' least-
squares fit removed from the snapshots (:func:`project_out`), and the noise variance estimated from the energy left
(:func:`residual_noise_variance`). Given a fitted model's inverse covariance, the same contractions give the log-
likelihood gain of one more source at every grid point (:func:`gain_scan`).

Owns: :func:`atom_norms`, :func:`scan`, :func:`gain_scan`, :func:`pick`, :func:`project_out`, :func:`residual_noise_variance`.
Must not: fit powers or covariances (:mod:`workbench.estimators`), run the likelihood fit
(:mod:`workbench.ml_fit`), or build steering tables (:class:`workbench.grid.Grid` does).

Shapes: B scenes, L snapshots, M measurements per snapshot, N RIS elements, a grid of P x T x Q = size points
(phi x theta x r, flattened in that order). The grid contractions run in complex64.
"""

from __future__ import annotations

import torch

from .config import SystemConfig
from .grid import Grid


def atom_norms(system: SystemConfig, grid: Grid, G: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """||G_l a_g||^2 for every snapshot and grid point: G [B,L,M,N] complex -> [B,L,P*T*Q] float32, floored at
    float32's smallest normal (a scan divides by it). The rows of G_l are contracted with the steering tables
    (:meth:`~workbench.grid.Grid.response`, complex64) one snapshot at a time for ``chunk`` scenes, so that the
    [chunk,M,P,T,Q] response stays in cache (measured 1.4-1.7x faster than all snapshots at once; |u|^2 as
    re^2 + im^2 is 3x faster than through ``view_as_real`` here)."""
    B, L = G.shape[:2]
    n2 = torch.empty(B, L, grid.size, dtype=torch.float32, device=G.device)
    for s in range(0, B, chunk):
        Gc = G[s:s + chunk].to(torch.complex64)
        for ell in range(L):
            u = grid.response(system, Gc[:, ell])  # [b,M,P,T,Q]
            n2[s:s + chunk, ell] = (u.real.square() + u.imag.square()).sum(1).reshape(Gc.shape[0], -1)
    return n2.clamp_min(torch.finfo(n2.dtype).tiny)


def scan(system: SystemConfig, grid: Grid, G: torch.Tensor, resid: torch.Tensor, norm2: torch.Tensor) -> torch.Tensor:
    """Normalised matched-filter power sum_l |(G_l a_g)^H r_l|^2 / ||G_l a_g||^2 of the snapshots resid [B,L,M]
    at every grid point g: [B,P*T*Q] float32. G [B,L,M,N]; norm2 [B,L,P*T*Q] = ||G_l a_g||^2
    (:func:`atom_norms`). Normalised per snapshot: |u^H r|^2 / ||u||^2 <= ||u_true||^2 |s_l|^2 for noise-free r
    (Cauchy-Schwarz), so the true source is the maximum; normalising the sum over snapshots by the summed norm
    instead has no such bound (measured: wrong picks at 20 dB). G_l^H r_l is formed in G's dtype, the grid
    contraction (:meth:`~workbench.grid.Grid.response`) in complex64."""
    return (_snapshot_power(system, grid, G, resid) / norm2).sum(1)


def _snapshot_power(system: SystemConfig, grid: Grid, G: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """|(G_l a_g)^H r_l|^2 per snapshot and grid point: [B,L,P*T*Q] float32 (G_l^H r_l in G's dtype, the grid
    contraction in complex64)."""
    back = (G.mH @ resid[..., None].to(G.dtype))[..., 0].to(torch.complex64)  # G_l^H r_l, [B,L,N]
    return torch.view_as_real(grid.response(system, back.conj())).square().sum(-1).reshape(*back.shape[:2], -1)


GAIN_POWERS = tuple(2.0 ** j for j in range(-2, 3))  # multiples of the score step's power tried per grid point


def gain_scan(system: SystemConfig, grid: Grid, G: torch.Tensor, norm2: torch.Tensor, E: torch.Tensor, r: torch.Tensor,
              noise_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-likelihood gain of one more source at every grid point, and its power, given a fitted model: G
    [B,L,M,N], norm2 [B,L,P*T*Q] = ||G_l a_g||^2 (:func:`atom_norms`), the model's inverse covariance in low-rank form E
    [B,L,M,K] and what it leaves of the snapshots r [B,L,M] (:func:`workbench.likelihood.inverse_factor`), noise_var
    [B] -> (gain [B,P*T*Q] nats, power [B,P*T*Q] in the units of y^2 / G^2), float32.

    With u_lg = G_l a_g, w_lg = u^H C_l^-1 u = (||u||^2 - ||E_l^H u||^2) / sigma^2 and q_lg = |u^H C_l^-1 y_l|^2 =
    |u^H r_l|^2 / sigma^4 (K + 1 grid contractions per snapshot, against M for the atom norms of whitened matrices), a
    source of power p at g changes the negative log-likelihood by sum_l [log(1 + p w_lg) - p q_lg / (1 + p w_lg)]
    (determinant lemma and Sherman-Morrison); the gain is minus its minimum over p > 0, searched over
    :data:`GAIN_POWERS` times the score step p0 = sum_l (q - w) / sum_l w^2 (the maximiser when all w_lg are equal).
    Unlike :func:`scan` on a :func:`project_out` residual, this scores a new source under the stochastic model the fit
    uses: projecting a strong source's atom out of every snapshot also removes most of a weak source wherever the two
    atoms are nearly collinear, as they are when H is close to rank one (a Rician LoS channel); the model's inverse
    removes only what the fitted powers explain."""
    s2 = noise_var.to(torch.float64)[:, None, None]
    # sum_k |e_lk^H G_l a_g|^2: the atom norms of the K rows of E_l^H G_l
    explained = atom_norms(system, grid, E.mH @ G.to(E.dtype)) if E.shape[-1] else 0.0
    w = ((norm2 - explained) / s2.float()).clamp_min(torch.finfo(norm2.dtype).tiny)
    q = _snapshot_power(system, grid, G, r / s2.sqrt()) / s2.float()
    p0 = ((q - w).sum(1) / w.square().sum(1)).clamp_min(torch.finfo(w.dtype).tiny)
    gain, power = torch.full_like(p0, -torch.inf), p0.clone()
    for f in GAIN_POWERS:
        x = (p0 * f)[:, None] * w
        g = ((p0 * f)[:, None] * q / (1 + x) - torch.log1p(x)).sum(1)
        better = g > gain
        gain, power = torch.where(better, g, gain), torch.where(better, p0 * f, power)
    return gain, power


def pick(grid: Grid, power: torch.Tensor) -> torch.Tensor:
    """The grid point of largest power per scene: power [B,P*T*Q] (:func:`scan`) -> indices [B,3] int64
    (phi, theta, r) into ``grid`` (:meth:`~workbench.grid.Grid.coords`, :meth:`~workbench.grid.Grid.vectors`)."""
    return grid.unravel(power.argmax(-1))


def project_out(y: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """The snapshots y [B,L,M] with their least-squares fit on the atoms U [B,L,K,M] removed, per snapshot:
    y_l - U_l^T c_l with c_l = argmin ||y_l - U_l^T c||. [B,L,M], y's dtype (U is cast to it). K = 0: y itself.

    By the normal equations (U^H U + eps I) c = U^H y, eps = 10 machine epsilons of the largest atom energy (floored
    at the smallest normal number: all-zero atoms, e.g. padded slots, give c = 0): ``torch.linalg.lstsq`` on CPU (MKL)
    was measured to differ from run to run at 1e-12 relative, which made the ML fit and the localiser not bitwise
    reproducible; a K x K solve is."""
    if U.shape[2] == 0:
        return y
    Ut = U.mT.to(y.dtype)  # [B,L,M,K]
    gram = Ut.mH @ Ut  # [B,L,K,K]
    real = gram.real.dtype
    eps = (10 * torch.finfo(real).eps * gram.diagonal(dim1=-2, dim2=-1).real.amax(-1)).clamp_min(torch.finfo(real).tiny)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + eps[..., None, None] * eye, Ut.mH @ y[..., None])
    return y - (Ut @ coef)[..., 0]


def residual_noise_variance(rest: torch.Tensor, k: int) -> torch.Tensor:
    """Noise variance per complex entry from the residual rest [B,L,M] of a least-squares fit on k atoms per
    snapshot (:func:`project_out`): ||rest||^2 / (L (M - k)), [B] real. The ML estimate of sigma^2 given the
    atoms, with the k degrees of freedom per snapshot the fit used removed (M - k floored at 1); biased upward
    by sources the atoms miss."""
    L, M = rest.shape[-2:]
    return rest.abs().square().sum((1, 2)) / (L * max(M - k, 1))
