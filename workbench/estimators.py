"""The R_samp estimators: every estimate of the N x N RIS-domain covariance from a scene's L snapshots, and the
registry that names them (:data:`ESTIMATORS`) with what each one knows and assumes.

A scene gives snapshots y [n,L,M] and measurement matrices G_l = H diag(c_l) [n,L,M,N] (the BS-RIS channel H
[n,M,N] and the RIS codes c_l [n,L,N], both known to the receiver). An estimator may also use oracle knowledge,
declared in its :class:`Estimator` entry (``oracle``): ``sample_covariance`` hands the simulator's noise variance
only to the estimators that declare it, and raises when one of those gets none.

Owns: :func:`ridge_solutions`, :func:`covariance_matching`, :func:`beamscan_covariance` (its grid
:data:`BEAMSCAN_GRID`), the registry :data:`ESTIMATORS` with :func:`sample_covariance` dispatching through it,
:func:`oracle_knowledge`, and R_samp as the pipeline uses it: :func:`rsamp_raw`, Fix 1 (:func:`normalise_rsamp`),
:func:`rsamp_for`.
Must not: blend, load or score covariances (:mod:`workbench.covariance`), hold the matched filter
(:mod:`workbench.matched_filter`), or loop over presets or SNRs (:mod:`workbench.studies`).

All estimates are [n,N,N] complex (the dtype of y and G) in raw units (y^2 / |G|^2) unless stated otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from . import config
from .checks import check_registry
from .config import ConfigError, FixConfig, SystemConfig, check_choice
from .covariance import hermitise, psd_projection, trace_normalise
from .grid import Grid
from .matched_filter import atom_norms, pick, project_out, residual_noise_variance, scan
from .physics import measurement_matrices

Measurements = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # G [n,L,M,N], or the pair (H [n,M,N], codes [n,L,N])


# ---------------------------------------------------------------------------------------------
# Unstructured estimators: per-snapshot least squares, covariance matching
def ridge_solutions(y: torch.Tensor, G: Measurements, ridge: float) -> torch.Tensor:
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


def _as_G(G: Measurements) -> torch.Tensor:
    """G [n,L,M,N] from G itself or from the pair (H, codes)."""
    return measurement_matrices(*G) if isinstance(G, (tuple, list)) else G


def _scatter(X: torch.Tensor) -> torch.Tensor:
    """(1/L) sum_l x_l x_l^H of X [n,L,N], as one [N,L] @ [L,N] product per scene: [n,N,N]."""
    Xc = X.conj() / X.shape[1] ** 0.5
    return Xc.mH @ Xc


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


# ---------------------------------------------------------------------------------------------
# Structured estimator: the matched filter over a steering grid, then a power fit
BEAMSCAN_GRID = (61, 31, 8)  # phi x theta x r points: 2 deg, 2 deg, 8 ranges uniform in 1/r


def beamscan_covariance(y: torch.Tensor, G: torch.Tensor, noise_var: torch.Tensor | None, system: SystemConfig,
                        n_sources: int = 5, grid: Grid | None = None, chunk: int = 8) -> torch.Tensor:
    """Structured estimate: matched-filter beamscan in the measurement domain, then covariance matching
    of the powers of the picked steering vectors.

    y [n,L,M], G [n,L,M,N] complex. For every grid point g and snapshot l the atom is u_lg = G_l a_g; the
    normalised matched-filter power is P(g) = sum_l |u_lg^H r_l|^2 / ||u_lg||^2 (:func:`workbench.matched_filter.scan`).
    ``n_sources`` points are picked greedily (matching pursuit): after each pick its atom's least-squares fit is
    removed from the current residual r (:func:`workbench.matched_filter.project_out` on that one atom; the earlier
    atoms are not refitted), starting from r = y. The picks' powers are then fitted by least squares to the snapshot
    outer products, E[y_l y_l^H] = sum_k p_k u_lk u_lk^H + sigma^2 I, and clipped at 0. Returns sum_k p_k a_k a_k^H,
    [n,N,N] in the units of y^2 / |G|^2.

    Assumes i.i.d. symbols and the known noise variance ``noise_var`` [n] (the simulator's: oracle
    knowledge), or, with ``noise_var`` None, estimates it per scene from the energy left after the joint
    least-squares fit of y on all picked atoms (:func:`workbench.matched_filter.residual_noise_variance` with
    k = n_sources). Accuracy is limited by the grid (default :data:`BEAMSCAN_GRID`, Kronecker-separable: the
    steering model of :meth:`~workbench.grid.Grid.response`). Cost about L M (N T Q + N_H P T Q) complex MACs per
    scene for the atom norms, the same per pick for the scan. ``chunk`` scenes at a time."""
    n, L, M, N = G.shape
    grid = Grid.uniform(system, *BEAMSCAN_GRID) if grid is None else grid
    out = []
    for s in range(0, n, chunk):
        Gc, yc = G[s:s + chunk], y[s:s + chunk]
        norm2 = atom_norms(system, grid, Gc, chunk=chunk)  # [b,L,grid]
        resid = yc
        picks, atoms = [], []
        for _ in range(n_sources):
            a = grid.vectors(system, pick(grid, scan(system, grid, Gc, resid, norm2)), dtype=G.dtype)  # [b,N]
            u = (Gc @ a[:, None, :, None])[..., 0]  # [b,L,M]
            resid = project_out(resid, u[:, :, None])
            picks.append(a)
            atoms.append(u)
        A = torch.stack(picks, 1)  # [b,K,N]
        Uk = torch.stack(atoms, 2)  # [b,L,K,M]
        if noise_var is None:
            nv = residual_noise_variance(project_out(yc, Uk), n_sources)
        else:
            nv = noise_var[s:s + chunk].to(G.real.dtype)
        gram = (Uk.conj() @ Uk.mT).abs().pow(2).sum(1)  # sum_l |u_lj^H u_lk|^2, [b,K,K]
        rhs = ((Uk.conj() * yc[:, :, None, :]).sum(-1).abs().pow(2) - nv[:, None, None] * Uk.abs().pow(2).sum(-1)).sum(1)
        gram = gram + 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(n_sources, device=G.device)
        p = torch.linalg.solve(gram, rhs).clamp_min(0)  # [b,K]
        out.append(torch.einsum("bkn,bk,bkm->bnm", A, p.to(A.dtype), A.conj()))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The registry
NOISE_VARIANCE = "noise variance"  # the one oracle quantity an estimator may declare


@dataclass(frozen=True)
class Estimator:
    """One R_samp estimator as :func:`sample_covariance` runs it.

    fn(y [n,L,M], G, ridge, noise_var [n] or None, rank, system) -> [n,N,N]: G is G [n,L,M,N] or the pair
    (H, codes) (:data:`Measurements`); ``noise_var`` is None unless ``oracle`` declares it.
    oracle: what it knows beyond y, H and the codes: () or ("noise variance",) (the simulator's, per scene).
    steering_model: the steering model it assumes ("separable": a Kronecker-separable steering grid,
    :class:`~workbench.grid.Grid`), None for an unstructured estimator. needs_system: it reads the
    :class:`~workbench.config.SystemConfig` (the array geometry). summary: one line for tables and menus."""

    fn: Callable[..., torch.Tensor]
    oracle: tuple[str, ...]
    steering_model: str | None
    needs_system: bool
    summary: str


def _seed(y, G, ridge, noise_var, rank, system):
    X = ridge_solutions(y, G, ridge)  # [n,L,N]
    return _scatter(X - X.mean(dim=1, keepdim=True))


def _ls_scatter(y, G, ridge, noise_var, rank, system):
    return _scatter(ridge_solutions(y, G, ridge))


def _covariance_matching(y, G, ridge, noise_var, rank, system):
    return covariance_matching(y, _as_G(G), noise_var, rank=rank)


def _beamscan(y, G, ridge, noise_var, rank, system):
    return beamscan_covariance(y, _as_G(G), noise_var, system, n_sources=rank or system.K_max)


ESTIMATORS: Mapping[str, Estimator] = MappingProxyType({
    "seed": Estimator(_seed, oracle=(), steering_model=None, needs_system=False,
                      summary="the original pipeline: per-snapshot ridge least squares, mean-centred, scatter matrix"),
    "ls_scatter": Estimator(_ls_scatter, oracle=(), steering_model=None, needs_system=False,
                            summary="per-snapshot ridge least squares, scatter matrix without the centring"),
    "covariance_matching": Estimator(_covariance_matching, oracle=(NOISE_VARIANCE,), steering_model=None, needs_system=False,
                                     summary="least-squares fit to the snapshot outer products (CG), PSD rank projection"),
    "beamscan": Estimator(_beamscan, oracle=(NOISE_VARIANCE,), steering_model="separable", needs_system=True,
                          summary="matched-filter picks on a steering grid, powers fitted with the true noise variance"),
    "beamscan_est": Estimator(_beamscan, oracle=(), steering_model="separable", needs_system=True,
                              summary="the same, noise variance estimated from the residual of the picks' fit"),
})
check_registry("estimators.ESTIMATORS", ESTIMATORS, "config.SAMPLE_ESTIMATORS", config.SAMPLE_ESTIMATORS)


def oracle_knowledge(estimator: str) -> str:
    """What ``estimator`` knows beyond the scene's measurements, in words: "none", or "true noise variance"
    (from :attr:`Estimator.oracle`). ConfigError for an unknown name."""
    check_choice("rsamp_estimator", estimator, config.SAMPLE_ESTIMATORS)
    return ", ".join(f"true {what}" for what in ESTIMATORS[estimator].oracle) or "none"


def sample_covariance(
    y: torch.Tensor,
    G: Measurements,
    estimator: str = "seed",
    ridge: float = 1e-3,
    noise_var: torch.Tensor | None = None,
    rank: int | None = 5,
    system: SystemConfig | None = None,
) -> torch.Tensor:
    """Estimate the N x N RIS-domain covariance from snapshots y [n,L,M] and G [n,L,M,N] (or the pair
    (H [n,M,N], codes [n,L,N]) with G_l = H diag(c_l), which the seed estimators use without forming G),
    with the estimator of that name in :data:`ESTIMATORS`:

    * ``"seed"``: the original pipeline. Ridge LS per snapshot (:func:`ridge_solutions`, ``ridge``), mean-centred
      across snapshots, scatter matrix (1/L) sum_l (x_l - mean)(x_l - mean)^H. Each x_l lies in the M-dimensional
      row space of G_l, so this sees at most L*M of N^2 directions; the centring also removes the signal itself
      when symbols are coherent across snapshots.
    * ``"ls_scatter"``: the same without the centring (shows what the centring costs).
    * ``"covariance_matching"``: :func:`covariance_matching` (projected to ``rank``), with ``noise_var``.
    * ``"beamscan"``: structured, :func:`beamscan_covariance` with ``rank`` picks (None: system.K_max); its power fit
      uses the given ``noise_var`` (the simulator's: oracle knowledge).
    * ``"beamscan_est"``: the same with the noise variance estimated from the snapshots (no oracle).

    ``noise_var`` [n] reaches only the estimators whose :attr:`Estimator.oracle` declares it, and must then be
    given; ``system`` must be given where :attr:`Estimator.needs_system`. ConfigError otherwise, naming the field.
    Returns [n,N,N], raw units (not normalised, not hermitised beyond what the formula gives).
    """
    check_choice("rsamp_estimator", estimator, config.SAMPLE_ESTIMATORS)
    entry = ESTIMATORS[estimator]
    if NOISE_VARIANCE in entry.oracle and noise_var is None:
        raise ConfigError(f"noise_var: the {estimator} estimator needs the noise variance per scene (oracle knowledge)")
    if entry.needs_system and system is None:
        raise ConfigError(f"system: the {estimator} estimator needs the SystemConfig (array geometry)")
    return entry.fn(y, G, ridge, noise_var if NOISE_VARIANCE in entry.oracle else None, rank, system)


# ---------------------------------------------------------------------------------------------
# R_samp as the pipeline uses it
def rsamp_raw(batch, fixes: FixConfig, system: SystemConfig) -> torch.Tensor:
    """The estimator's R_samp of a :class:`~workbench.physics.SceneBatch`, before Fix 1: [n,N,N] complex64 in
    raw units. The seed estimators run on the factored (H, codes) form; the structured ones form G."""
    return sample_covariance(batch.y, (batch.H, batch.codes), fixes.rsamp_estimator, system.ridge, batch.noise_var,
                             rank=system.K_max, system=system)


def normalise_rsamp(R_raw: torch.Tensor, fixes: FixConfig) -> torch.Tensor:
    """Fix 1: hermitise R_samp [n,N,N] and trace-normalise it to N when ``fixes.rsamp_normalise``; else unchanged."""
    return trace_normalise(hermitise(R_raw)) if fixes.rsamp_normalise else R_raw


def rsamp_for(batch, fixes: FixConfig, system: SystemConfig) -> torch.Tensor:
    """R_samp as the pipeline uses it: :func:`rsamp_raw`, then Fix 1 (:func:`normalise_rsamp`)."""
    return normalise_rsamp(rsamp_raw(batch, fixes, system), fixes)
