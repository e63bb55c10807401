"""The covariance pipeline of one batch (R_samp -> R_pred -> R_blend -> NMSE) and the operations it is built of.

Owns: hermitise, trace normalisation, diagonal loading (C_EPS), the blend, the R_samp estimators, Fix 1
(:func:`rsamp_for`), Fix 2 and C_EPS (:func:`blend_pipeline`), the NMSE and its target (fact 4:
:func:`nmse_target`), the whole per-batch pipeline (:func:`pipeline`), the factored description of R_blend
that the eigen-terms use when the pipeline has one (:class:`Factored`, :func:`blend_factored`) and spectrum
statistics. The loss, the oracle floor of the diagnostics and the notebooks all call these; none assembles the
pipeline itself.
Must not: hold loss weights, train, or loop over presets or SNRs (that is :mod:`workbench.studies`).

All functions take batch-first complex tensors [..., N, N] (complex64 for compute, complex128 in
gradient checks) and are differentiable unless stated otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_square
from .config import SAMPLE_ESTIMATORS, ConfigError, FixConfig, SystemConfig, check_choice
from .grid import Grid
from .physics import measurement_matrices


def hermitise(R: torch.Tensor) -> torch.Tensor:
    """(R + R^H) / 2. Idempotent."""
    return 0.5 * (R + R.mH)


def trace(R: torch.Tensor) -> torch.Tensor:
    """Real part of the trace, [...]."""
    return torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1)


def frobenius2(X: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm ||X||_F^2 of each matrix of X [..., n, m] (real or complex) -> [...] real: the sum of
    the squared real and imaginary parts (about 20x faster than torch.linalg.matrix_norm on complex64, and exact
    to float rounding)."""
    parts = torch.view_as_real(X.resolve_conj()) if X.is_complex() else X[..., None]
    return parts.square().sum((-3, -2, -1))


def trace_normalise(R: torch.Tensor, target: float | None = None, eps: float = 1e-30) -> torch.Tensor:
    """Scale each matrix so its trace is ``target`` (default N). ``eps`` floors the trace magnitude:
    a vanishing trace is a real NaN/inf source (DESIGN.md fact 5), so it is floored, not divided by."""
    check_square(R)
    target = R.shape[-1] if target is None else target
    tr = trace(R)
    tr = torch.where(tr.abs() < eps, torch.full_like(tr, eps), tr)
    return R * (target / tr)[..., None, None].to(R.dtype)


def load(R: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """Diagonal loading R + c I: raises every eigenvalue by c, leaves every gap unchanged."""
    check_square(R)
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    c = torch.as_tensor(c, device=R.device)
    if c.ndim:
        c = c[..., None, None]
    return R + c.to(R.dtype) * eye


def blend(R_pred: torch.Tensor, R_samp: torch.Tensor, beta: float) -> torch.Tensor:
    """(1 - beta) R_pred + beta R_samp: a convex combination, PSD when both are."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta = {beta!r} is out of range: allowed [0, 1]")
    if R_pred.shape != R_samp.shape:
        raise ConfigError(f"R_pred {tuple(R_pred.shape)} and R_samp {tuple(R_samp.shape)}: shapes must match")
    return (1.0 - beta) * R_pred + beta * R_samp


# ---------------------------------------------------------------------------------------------
# Sample-covariance estimators of the RIS-domain covariance from L snapshots.
def ridge_solutions(y: torch.Tensor, G: torch.Tensor | tuple[torch.Tensor, torch.Tensor], ridge: float) -> torch.Tensor:
    """Per-snapshot ridge least squares x_l = G_l^H (G_l G_l^H + ridge I)^-1 y_l.

    y [n,L,M], G [n,L,M,N] -> [n,L,N]. The M x M form is exact and cheaper than the N x N one.
    ``G`` may also be the pair (H [n,M,N], codes [n,L,N]) with G_l = H diag(c_l): then G is never
    formed, x_l = conj(c_l) * (H^H w_l), and for unit-modulus codes (every RIS configuration) the
    Gram matrix G_l G_l^H = H H^H is shared by the L snapshots, so one M x M solve per scene suffices.
    Same result up to float rounding."""
    if isinstance(G, (tuple, list)):
        return _ridge_solutions_factored(y, *G, ridge)
    M = G.shape[-2]
    gram = G @ G.mH + ridge * torch.eye(M, dtype=G.dtype, device=G.device)
    w = torch.linalg.solve(gram, y[..., None])
    return (w.mH @ G).conj()[..., 0, :]  # (G^H w)^T without conjugating the large G


def _ridge_solutions_factored(y: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, ridge: float) -> torch.Tensor:
    """:func:`ridge_solutions` for G_l = H diag(c_l): y [n,L,M], H [n,M,N], codes [n,L,N] -> [n,L,N]."""
    M = H.shape[-2]
    eye = ridge * torch.eye(M, dtype=H.dtype, device=H.device)
    mod2 = codes.real.square() + codes.imag.square()
    if bool(((mod2 - 1).abs() < 1e-5).all()):  # |c| = 1: G_l G_l^H = H H^H for every l
        w = torch.linalg.solve(H @ H.mH + eye, y.mT).mT  # [n,L,M]
    else:
        gram = (H[:, None] * mod2[:, :, None, :].to(H.dtype)) @ H.mH[:, None] + eye
        w = torch.linalg.solve(gram, y[..., None])[..., 0]
    return codes.conj() * (w @ H.conj())  # x_l = conj(c_l) * (H^H w_l)


def _as_G(G: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """G [n,L,M,N] from G itself or from the pair (H, codes)."""
    return measurement_matrices(*G) if isinstance(G, (tuple, list)) else G


def sample_covariance(
    y: torch.Tensor,
    G: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    estimator: str = "seed",
    ridge: float = 1e-3,
    noise_var: torch.Tensor | None = None,
    rank: int | None = 5,
    system: SystemConfig | None = None,
) -> torch.Tensor:
    """Estimate the N x N RIS-domain covariance from snapshots y [n,L,M] and G [n,L,M,N] (or the pair
    (H [n,M,N], codes [n,L,N]) with G_l = H diag(c_l), which the seed estimators use without forming G).

    * ``"seed"``: the original pipeline. Ridge LS per snapshot, mean-centred across snapshots, scatter
      matrix (1/L) sum_l (x_l - mean)(x_l - mean)^H. Each x_l lies in the M-dimensional row space of
      G_l, so this sees at most L*M of N^2 directions; the centring also removes the signal itself
      when symbols are coherent across snapshots.
    * ``"ls_scatter"``: the same without the centring (shows what the centring costs).
    * ``"covariance_matching"``: see :func:`covariance_matching`.
    * ``"beamscan"``: structured, see :func:`beamscan_covariance` (needs ``system``); its power fit uses the
      given ``noise_var`` (the simulator's: oracle knowledge).
    * ``"beamscan_est"``: the same with the noise variance estimated from the snapshots (no oracle).

    Returns [n,N,N], raw units (not normalised, not hermitised beyond what the formula gives).
    """
    check_choice("rsamp_estimator", estimator, SAMPLE_ESTIMATORS)
    if estimator in ("covariance_matching", "beamscan") and noise_var is None:
        raise ConfigError(f"noise_var: the {estimator} estimator needs the noise variance per scene")
    if estimator == "covariance_matching":
        return covariance_matching(y, _as_G(G), noise_var, rank=rank)
    if estimator in ("beamscan", "beamscan_est"):
        if system is None:
            raise ConfigError(f"system: the {estimator} estimator needs the SystemConfig (array geometry)")
        known = noise_var if estimator == "beamscan" else None
        return beamscan_covariance(y, _as_G(G), known, system, n_sources=rank or system.K_max)
    X = ridge_solutions(y, G, ridge)  # [n,L,N]
    if estimator == "seed":
        X = X - X.mean(dim=1, keepdim=True)
    Xc = X.conj() / X.shape[1] ** 0.5
    return Xc.mH @ Xc  # (1/L) sum_l x_l x_l^H, as one [N,L] @ [L,N] product per scene


def _matching_operator(R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """T(R) = sum_l G_l^H G_l R G_l^H G_l: the normal operator of R -> {G_l R G_l^H}_l. [n,N,N]."""
    return (G.mH @ (G @ R[:, None] @ G.mH) @ G).sum(1)


def covariance_matching(y: torch.Tensor, G: torch.Tensor, noise_var: torch.Tensor, iters: int = 20, rank: int | None = 5) -> torch.Tensor:
    """Covariance-matching least squares, then a PSD rank projection.

    Fits R to the per-snapshot outer products, min_R sum_l ||y_l y_l^H - sigma^2 I - G_l R G_l^H||_F^2,
    by ``iters`` conjugate-gradient steps on the normal equations T(R) = sum_l G_l^H (y_l y_l^H -
    sigma^2 I) G_l from R = 0 (early stopping is the regulariser; CG from zero stays in the range of
    the adjoint, i.e. it tends to the minimum-norm fit). The result is hermitised and projected onto
    its ``rank`` largest positive eigenvalues (None: all positive ones).

    Assumes i.i.d. symbols (E[x_l x_l^H] = R for every l) and a known noise variance ``noise_var`` [n].
    With L*M = 256 complex equations for N^2 = 20736 unknowns no unstructured estimator can be accurate:
    this one improves with SNR and beats ``"seed"``, but stays near NMSE 1 (README, estimator table).
    Cost: about ``iters`` * 4 L M N^2 complex MACs per scene.
    """
    M = G.shape[-2]
    eye = torch.eye(M, dtype=y.dtype, device=y.device)
    S = y[..., :, None] * y[..., None, :].conj() - noise_var.to(y.dtype)[:, None, None, None] * eye
    B = (G.mH @ S @ G).sum(1)
    X = torch.zeros_like(B)
    res, P = B.clone(), B.clone()
    rs = _inner(res, res)
    for _ in range(iters):
        AP = _matching_operator(P, G)
        alpha = rs / _inner(P, AP).clamp_min(torch.finfo(rs.dtype).tiny)
        X = X + alpha[:, None, None].to(X.dtype) * P
        res = res - alpha[:, None, None].to(X.dtype) * AP
        rs_new = _inner(res, res)
        P = res + (rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny))[:, None, None].to(X.dtype) * P
        rs = rs_new
    return psd_projection(hermitise(X), rank)


def _inner(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Re tr(A^H B) per matrix, [n]."""
    return (A.conj() * B).real.sum((-2, -1))


def psd_projection(R: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Nearest PSD matrix of rank <= ``rank`` in Frobenius norm: keep the largest positive eigenvalues."""
    ev, V = torch.linalg.eigh(hermitise(R))
    keep = ev.clamp_min(0)
    if rank is not None:
        keep = torch.where(torch.arange(ev.shape[-1], device=ev.device) >= ev.shape[-1] - rank, keep, 0)
    return (V * keep[..., None, :].to(V.dtype)) @ V.mH


BEAMSCAN_GRID = (61, 31, 8)  # phi x theta x r points: 2 deg, 2 deg, 8 ranges uniform in 1/r


def beamscan_covariance(y: torch.Tensor, G: torch.Tensor, noise_var: torch.Tensor, system: SystemConfig,
                        n_sources: int = 5, grid: Grid | None = None, chunk: int = 8) -> torch.Tensor:
    """Structured estimate: matched-filter beamscan in the measurement domain, then covariance matching
    of the powers of the picked steering vectors.

    For every grid point g and snapshot l the response is u_lg = G_l a_g; the normalised matched-filter
    power is P(g) = sum_l |u_lg^H y_l|^2 / ||u_lg||^2. ``n_sources`` points are picked greedily, each
    pick projected out of the snapshots before the next (orthogonal matching pursuit), and their powers
    fitted by least squares to the snapshot outer products, E[y_l y_l^H] = sum_k p_k u_lk u_lk^H +
    sigma^2 I, then clipped at 0. Returns sum_k p_k a_k a_k^H, [n,N,N] in the units of y^2 / |G|^2.

    Assumes i.i.d. symbols and the known noise variance ``noise_var`` [n] (the simulator's: oracle
    knowledge), or, with ``noise_var`` None, estimates it per scene from the energy left after the picks'
    least-squares fit, ||y - U c||^2 / (L (M - n_sources)) (the ML estimate of sigma^2 given the picks, with
    the degrees of freedom the fit used removed; it is biased upward by missed sources). Accuracy is limited
    by the grid (default :data:`BEAMSCAN_GRID`). Cost about L M (N T Q + N_H P T Q) complex MACs per scene for
    the responses, the same per pick for the scan,
    with the grid's separable contraction (:meth:`~workbench.grid.Grid.response`)."""
    n, L, M, N = G.shape
    grid = Grid.uniform(system, *BEAMSCAN_GRID) if grid is None else grid
    out = []
    for s in range(0, n, chunk):
        Gc, yc = G[s:s + chunk], y[s:s + chunk]
        b = Gc.shape[0]
        # ||G_l a_g||^2 for every grid point: the rows of G_l contracted with the steering tables, one snapshot at
        # a time so the [b,M,grid] response stays in cache (3.5x faster than all snapshots at once)
        norm2 = torch.empty(b, L, grid.size, dtype=G.real.dtype, device=G.device)
        for ell in range(L):
            u = grid.response(system, Gc[:, ell])  # [b,M,P,T,Q]
            norm2[:, ell] = (u.real.square() + u.imag.square()).sum(1).reshape(b, -1)
        norm2 = norm2.clamp_min(torch.finfo(norm2.dtype).tiny)  # [b,L,grid]
        resid = yc
        picks, atoms = [], []
        for _ in range(n_sources):
            back = (Gc.mH @ resid[..., None])[..., 0]  # G_l^H r_l, [b,L,N]
            scan = torch.view_as_real(grid.response(system, back.conj())).square().sum(-1).reshape(b, L, -1)  # |a_g^H G_l^H r_l|^2
            g = (scan / norm2).sum(1).argmax(-1)
            a = grid.vectors(system, grid.unravel(g), dtype=G.dtype)  # [b,N]
            u = (Gc @ a[:, None, :, None])[..., 0]  # [b,L,M]
            resid = resid - u * ((u.conj() * resid).sum(-1, keepdim=True) / u.abs().pow(2).sum(-1, keepdim=True).clamp_min(1e-38))
            picks.append(a)
            atoms.append(u)
        A = torch.stack(picks, 1)  # [b,K,N]
        Uk = torch.stack(atoms, 2)  # [b,L,K,M]
        if noise_var is None:
            fit = torch.linalg.lstsq(Uk.mT, yc[..., None]).solution  # joint LS on the picked atoms, per snapshot
            rest = yc - (Uk.mT @ fit)[..., 0]
            nv = rest.abs().square().sum((1, 2)) / (L * max(M - n_sources, 1))
        else:
            nv = noise_var[s:s + chunk].to(G.real.dtype)
        gram = (Uk.conj() @ Uk.mT).abs().pow(2).sum(1)  # sum_l |u_lj^H u_lk|^2, [b,K,K]
        rhs = ((Uk.conj() * yc[:, :, None, :]).sum(-1).abs().pow(2) - nv[:, None, None] * Uk.abs().pow(2).sum(-1)).sum(1)
        gram = gram + 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(n_sources, device=G.device)
        p = torch.linalg.solve(gram, rhs).clamp_min(0)  # [b,K]
        out.append(torch.einsum("bkn,bk,bkm->bnm", A, p.to(A.dtype), A.conj()))
    return torch.cat(out)


def rsamp_raw(batch, fixes: FixConfig, system: SystemConfig) -> torch.Tensor:
    """The estimator's R_samp of a :class:`~workbench.physics.SceneBatch`, before Fix 1: [n,N,N] complex64 in
    raw units. The seed estimators run on the factored (H, codes) form; the structured ones form G."""
    return sample_covariance(batch.y, (batch.H, batch.codes), fixes.rsamp_estimator, system.ridge, batch.noise_var,
                             rank=system.K_max, system=system)


def apply_fix1(R_raw: torch.Tensor, fixes: FixConfig) -> torch.Tensor:
    """Fix 1: hermitise R_samp and trace-normalise it to N when ``fixes.rsamp_normalise``; else unchanged."""
    return trace_normalise(hermitise(R_raw)) if fixes.rsamp_normalise else R_raw


def rsamp_for(batch, fixes: FixConfig, system: SystemConfig) -> torch.Tensor:
    """R_samp as the pipeline uses it: :func:`rsamp_raw`, then :func:`apply_fix1`."""
    return apply_fix1(rsamp_raw(batch, fixes, system), fixes)


def predicted_covariance(A: torch.Tensor, qr_retraction: bool) -> torch.Tensor:
    """R_pred = A A^H from the network's factor A [B,N,K_max] (not normalised: the network sets the scale,
    and the blend's trace normalisation, Fix 2's knob, is what can change it). With ``qr_retraction`` (the
    seed pipeline) A is first replaced by the Q of its reduced QR decomposition: R_pred becomes a projector
    of trace K_max, and QR's backward divides by the diagonal of R (a NaN source for a rank-deficient A)."""
    if qr_retraction:
        A = torch.linalg.qr(A, mode="reduced").Q
    return A @ A.mH


def blend_pipeline(R_pred: torch.Tensor, R_samp: torch.Tensor, fixes: FixConfig) -> torch.Tensor:
    """R_blend under ``fixes``: blend, then (Fix 2 turned it off) trace-normalise, then load by C_EPS."""
    R = blend(R_pred, R_samp, fixes.beta)
    if fixes.rblend_trace_normalise:
        R = trace_normalise(R)
    return load(R, fixes.c_eps) if fixes.c_eps else R


# ---------------------------------------------------------------------------------------------
# R_blend in factored form: F F^H + c I with a thin F, so eigen-terms need only an r x r problem.
@dataclass
class Factored:
    """A batch of Hermitian PSD matrices together with a thin factor: R = F F^H + shift I.

    R [B,N,N] the matrices themselves (what every full-matrix path uses); F [B,N,r] complex, the dtype of R,
    r small (K_max in ``recommended``; K_max + rank(R_samp) with a blend); shift: float >= 0 (C_EPS). R and F
    hang on the same autograd graph. The eigenpairs of R other than the shift come from the r x r Gram matrix
    F^H F (:mod:`workbench.spectral`); every other eigenvalue of R equals ``shift``."""

    R: torch.Tensor
    F: torch.Tensor
    shift: float


def _factor_tolerance(dtype: torch.dtype, n: int) -> float:
    """Relative Frobenius error accepted as 'exact to rounding' for a rank-revealing factor of an n x n matrix."""
    return 32.0 * n**0.5 * torch.finfo(dtype).eps


@torch.no_grad()
def low_rank_factor(R: torch.Tensor, rank: int, oversample: int = 4, seed: int = 0) -> torch.Tensor | None:
    """F [B,N,r] with F F^H = R to rounding, r <= rank + oversample, or None when no such factor exists.

    R [B,N,N] Hermitian (complex64/complex128), not differentiated. Randomized range finder (Halko, Martinsson &
    Tropp 2011): Y = R Omega with a seeded Gaussian Omega [N,p], p = rank + oversample; Q = qr(Y).Q; the p x p
    matrix T = Q^H R Q = U diag(t) U^H; F = Q U diag(sqrt(t)) over the t above rounding. Exact (with probability
    one) for PSD matrices of rank <= p, with matmuls, one QR and one p x p eigh: no N x N decomposition. The
    result is checked: None when ||R - F F^H||_F > tol ||R||_F for some matrix (rank above p, or R not PSD),
    tol = 32 sqrt(N) eps(dtype). r is the largest numerical rank in the batch (a matrix of lower rank gets columns
    that are zero to rounding)."""
    N = R.shape[-1]
    p = min(rank + oversample, N)
    gen = torch.Generator(device=R.device).manual_seed(seed)
    omega = torch.randn(N, p, dtype=R.dtype, device=R.device, generator=gen)
    Q = torch.linalg.qr(R @ omega).Q
    t, U = torch.linalg.eigh(hermitise(Q.mH @ R @ Q))
    t, U = t.flip(-1), U.flip(-1)
    tol = _factor_tolerance(R.real.dtype, N)
    keep = max(1, int((t > tol * t[:, :1].abs()).sum(-1).max()))
    F = (Q @ U[..., :keep]) * t[:, None, :keep].clamp_min(0).sqrt().to(R.dtype)
    err2 = frobenius2(R - F @ F.mH) / frobenius2(R).clamp_min(torch.finfo(t.dtype).tiny)
    return F if bool((err2 <= tol**2).all()) else None


def blend_factored(A: torch.Tensor, R_samp: torch.Tensor, R_blend: torch.Tensor, fixes: FixConfig) -> Factored | None:
    """R_blend of :func:`blend_pipeline` as a :class:`Factored`, or None where the config or R_samp has no such form.

    A [B,N,k] the prediction's factor (R_pred = A A^H), R_samp [B,N,N], R_blend [B,N,N] = blend_pipeline(A A^H,
    R_samp, fixes). (1 - beta) A A^H + beta R_samp + C_EPS I = F F^H + C_EPS I with F = [sqrt(1 - beta) A,
    sqrt(beta) F_samp] and F_samp F_samp^H = R_samp (:func:`low_rank_factor`, rank <= k + 4; not needed at beta = 0).
    None with the QR retraction or the blend's trace normalisation (the seed's pipeline keeps the full-matrix
    path), when R_samp carries a gradient, or when R_samp has no exact low-rank factor (e.g. the seed estimator,
    rank L - 1 = 15)."""
    if fixes.qr_retraction or fixes.rblend_trace_normalise:
        return None
    F = A
    if fixes.beta > 0:
        if R_samp.requires_grad:
            return None
        F_samp = low_rank_factor(R_samp, A.shape[-1])
        if F_samp is None:
            return None
        F = torch.cat([(1.0 - fixes.beta) ** 0.5 * A, fixes.beta**0.5 * F_samp.to(A.dtype)], dim=-1)
    return Factored(R=R_blend, F=F, shift=float(fixes.c_eps))


def reference(R_true: torch.Tensor) -> torch.Tensor:
    """R_ref: R_true trace-normalised to N, the scale every NMSE is measured in."""
    return trace_normalise(R_true)


def nmse_target(R_ref: torch.Tensor, R_samp: torch.Tensor, fixes: FixConfig) -> torch.Tensor:
    """What R_blend is compared with (DESIGN fact 4). With ``nmse_same_preprocessing`` the reference goes
    through the same blend, normalisation and loading as the prediction, so an exact prediction scores 0;
    without it (the seed) the target is the bare R_ref, and loading only the prediction side puts a floor
    under the NMSE."""
    return blend_pipeline(R_ref, R_samp, fixes) if fixes.nmse_same_preprocessing else R_ref


@dataclass
class Covariances:
    """The covariance pipeline of one batch, all [B,N,N] complex64: R_pred, R_samp, R_blend, the reference
    R_ref (trace-normalised R_true) and the NMSE target (:func:`nmse_target`); ``factored``: R_blend with its
    thin factor (:func:`blend_factored`) when the pipeline found one, else None."""

    R_pred: torch.Tensor
    R_samp: torch.Tensor
    R_blend: torch.Tensor
    R_ref: torch.Tensor
    target: torch.Tensor
    factored: Factored | None = None

    def nmse(self) -> torch.Tensor:
        """The NMSE term per scene [B]: R_blend against the target."""
        return nmse(self.R_blend, self.target)

    def eigen_input(self) -> torch.Tensor | Factored:
        """R_blend as the eigen-terms take it: the :class:`Factored` description when there is one, else R_blend."""
        return self.R_blend if self.factored is None else self.factored


def pipeline(R_pred: torch.Tensor, R_samp: torch.Tensor, R_true: torch.Tensor, fixes: FixConfig,
             factor: torch.Tensor | None = None) -> Covariances:
    """Run the pipeline of ``fixes`` on a prediction: blend with R_samp, Fix 2, C_EPS, and the NMSE target.
    An oracle prediction is ``pipeline(reference(R_true), R_samp, R_true, fixes)``.

    ``factor``: the network's A [B,N,K_max] with R_pred = predicted_covariance(A, fixes.qr_retraction), if known;
    then ``factored`` is set wherever :func:`blend_factored` allows it."""
    R_ref = reference(R_true)
    R_blend = blend_pipeline(R_pred, R_samp, fixes)
    factored = None if factor is None else blend_factored(factor, R_samp, R_blend, fixes)
    return Covariances(R_pred=R_pred, R_samp=R_samp, R_blend=R_blend, R_ref=R_ref,
                       target=nmse_target(R_ref, R_samp, fixes), factored=factored)


@torch.no_grad()
def oracle_nmse(R_true: torch.Tensor, R_samp: torch.Tensor, fixes: FixConfig) -> torch.Tensor:
    """The NMSE term [n] of an exact prediction R_pred = R_ref put through the same pipeline as a prediction
    (the QR retraction is left out: it would change the oracle itself). Zero when both sides share the
    preprocessing; otherwise the floor that loading only the prediction side puts under the loss (fact 4)."""
    return pipeline(reference(R_true), R_samp, R_true, fixes).nmse()


def nmse(R_hat: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """||R_hat - R||_F^2 / ||R||_F^2 per matrix, [...] (real)."""
    return frobenius2(R_hat - R) / frobenius2(R)


# ---------------------------------------------------------------------------------------------
def numerical_rank(eigvals: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Number of eigenvalues above rtol * max|eigenvalue|; rtol defaults to N * eps(dtype) (as in
    numpy.linalg.matrix_rank). eigvals [..., N] real -> [...] int64."""
    n = eigvals.shape[-1]
    rtol = n * torch.finfo(eigvals.dtype).eps if rtol is None else rtol
    top = eigvals.abs().amax(-1, keepdim=True)
    return (eigvals.abs() > rtol * top).sum(-1)


@torch.no_grad()
def spectrum_stats(R: torch.Tensor, K: torch.Tensor | int | None = None, rtol: float | None = None) -> dict[str, torch.Tensor]:
    """Spectrum statistics of Hermitian matrices [..., N, N] (not differentiable).

    Returns fro [...], trace [...], eigvals [..., N] (descending), rank [...] at relative tolerance
    ``rtol`` (default N * eps), cond [...] (lambda_max / lambda_min, inf when lambda_min <= 0), and,
    when K is given, gap [...] = lambda_K - lambda_{K+1} (1-based, descending order).
    """
    check_square(R)
    ev = torch.linalg.eigvalsh(hermitise(R)).flip(-1)
    out = {
        "fro": frobenius2(R).sqrt(),
        "trace": trace(R) if R.is_complex() else torch.diagonal(R, dim1=-2, dim2=-1).sum(-1),
        "eigvals": ev,
        "rank": numerical_rank(ev, rtol),
        "cond": torch.where(ev[..., -1] > 0, ev[..., 0] / ev[..., -1], torch.full_like(ev[..., 0], float("inf"))),
    }
    if K is not None:
        K = torch.as_tensor(K, device=R.device).expand(ev.shape[:-1])
        idx = (K - 1).clamp(0, ev.shape[-1] - 2)[..., None]
        out["gap"] = (ev.gather(-1, idx) - ev.gather(-1, idx + 1))[..., 0]
    return out
