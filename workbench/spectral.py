"""Differentiable eigen-terms of the covariance pipeline, each with a selectable backward.

Owns: the eigengap hinge and the subspace-energy term, their backends and the registries that declare them
(:data:`GAP_BACKENDS`, :data:`SUBSPACE_BACKENDS`), the finite-difference gradient estimate, the factored (r x r)
path. Must not: build covariances (:mod:`workbench.covariance`) or weight loss terms (:mod:`workbench.losses`).

Two terms act on a batch of Hermitian covariances R [B,N,N] (complex64 for compute, complex128 in
gradient checks) with a per-scene source count K [B] (int64, 1-based):

* :func:`eigengap_hinge`: relu(margin - (lambda_K - lambda_{K+1})) of R + eps_psd I, eigenvalues descending;
* :func:`subspace_energy`: sum_k a_k^H (I - V_K V_K^H) a_k / K, the energy of the true steering vectors in
  the predicted noise subspace (the MUSIC denominator at the true sources).

The facts this module lets a user check (each has a test in ``tests/test_spectral.py``):

1. **Eigenvalues alone have a finite gradient.** For Hermitian R = V diag(lambda) V^H and a loss of the
   eigenvalues only, dL/dR = V diag(dL/dlambda) V^H: no eigenvalue difference appears in it, so it is finite
   even when 139 eigenvalues coincide after C_EPS loading. ``eigh`` with the vectors unused, ``eigvalsh``,
   ``svd`` and ``exact`` all give this gradient; the eigengap hinge is therefore not a NaN source.
2. **Eigenvectors bring 1/(lambda_i - lambda_j).** The backward of ``torch.linalg.eigh``'s vectors divides
   by every pairwise eigenvalue difference, which C_EPS loading of a low-rank prediction makes exactly zero
   (within the noise subspace, and within the signal subspace when sources have equal power). Complex
   eigenvectors are defined only up to a phase each, so a loss must use phase-invariant quantities (the
   projector V_K V_K^H) or PyTorch raises. The projector onto the top-K subspace depends only on the gap
   lambda_K - lambda_{K+1}: the ``safe`` backward keeps only the signal-noise pairs and is exact and finite.
3. **SVD = eigh for PSD input, but its order is descending.** For a Hermitian PSD matrix the singular values
   are the eigenvalues and the SVD gradient equals the eigh gradient, so swapping one for the other changes
   nothing. ``torch.linalg.svd`` returns them in descending order; flipping them as if they were ascending
   (the later pipeline's ``svd_flipped``, kept here to be shown) takes the gap between the K-th and
   (K+1)-th *smallest* eigenvalues instead, which inverts the hinge.

**Backends as registries.** :data:`GAP_BACKENDS` and :data:`SUBSPACE_BACKENDS` (read-only mappings, the names of
``config.GAP_BACKENDS`` / ``config.SUBSPACE_BACKENDS`` in the same order, checked at import) hold each backend's
function and what it declares: ``finite`` (finite gradient under degeneracy), ``exact`` (the true gradient),
``factored`` (works on a Factored R without an N x N decomposition); :func:`eigengap_hinge` and
:func:`subspace_energy` dispatch through them.

**Factored covariances.** Where the pipeline knows R = F F^H + c I with a thin F [B,N,r]
(:class:`~workbench.covariance.Factored`: ``recommended`` has F = the network's factor, r = K_max), the
``exact`` hinge and the ``safe`` subspace term need no N x N decomposition: with the Gram matrix
F^H F = U diag(s) U^H, the eigenvalues of R are s + c and N - r more equal to c, and the top-K projector is
P = F M F^H with M = U_K diag(1/s_K) U_K^H. The gradient of M is the Daleckii-Krein formula with divided
differences of h(s) = 1/s on the signal part, 0 on the noise part: -1/(s_i s_j) inside the signal part (finite
when sources have equal power), 1/(s_i (s_i - s_j)) across the gap, 0 inside the noise part. It is the exact
derivative of the projector whenever lambda_K > lambda_{K+1}, the same gradient as the full-matrix ``safe``
backward, for an r x r eigh and matmuls. Every other backend uses the formed matrix R: they keep their meaning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from . import config
from .checks import check_covariance, check_K, check_registry
from .config import ConfigError, check_choice
from .covariance import Factored, frobenius2


def _eye_like(R: torch.Tensor) -> torch.Tensor:
    return torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)


def _gap_from_desc(vals: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """lambda_K - lambda_{K+1} per scene, vals [B,n] descending, K [B] 1-based."""
    pair = vals.gather(-1, torch.stack([K - 1, K], dim=-1))
    return pair[:, 0] - pair[:, 1]


def _hinge(vals: torch.Tensor, K: torch.Tensor, margin: float) -> torch.Tensor:
    """The eigengap hinge relu(margin - (lambda_K - lambda_{K+1})) from descending eigenvalues vals [B,n]."""
    return torch.relu(margin - _gap_from_desc(vals, K))


def _signal_mask(K: torch.Tensor, n: int) -> torch.Tensor:
    """[B,n] bool: column j (descending order) belongs to the top-K signal subspace of its scene."""
    return torch.arange(n, device=K.device)[None, :] < K[:, None]


def _relative_floor(vals: torch.Tensor) -> torch.Tensor:
    """[B,1] eps(dtype) * max|vals| per scene: the smallest eigenvalue difference a solver resolves."""
    return torch.finfo(vals.dtype).eps * vals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(vals.dtype).tiny)


# ---------------------------------------------------------------------------------------------
# Factored covariances R = F F^H + c I: everything from the r x r Gram matrix
def _check_factored(X: Factored) -> None:
    """ConfigError unless X.F [B,N,r] is finite and matches X.R [B,N,N], and X.shift is a number >= 0."""
    F, R = X.F, X.R
    if not isinstance(F, torch.Tensor) or F.ndim != 3 or not isinstance(R, torch.Tensor) or R.shape != (*F.shape[:2], F.shape[1]):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (F, R)]
        raise ConfigError(f"Factored: expected F [B,N,r] and R [B,N,N] of the same B and N, got F {shapes[0]}, R {shapes[1]}")
    if not bool(torch.isfinite(F).all()):
        bad = (~torch.isfinite(F).flatten(1).all(-1)).nonzero().flatten()[:5].tolist()
        raise ConfigError(f"Factored.F: non-finite entries (NaN/inf) in scene(s) {bad}: a covariance must be finite")
    if not (isinstance(X.shift, (int, float)) and math.isfinite(X.shift) and X.shift >= 0):
        raise ConfigError(f"Factored.shift = {X.shift!r}: expected a finite number >= 0")


def _double(X: torch.Tensor) -> torch.Tensor:
    """X in double precision (complex128 or float64). The Gram matrix squares the condition number of F: the
    r x r problems are solved in double so that they lose nothing to it (their cost is negligible)."""
    return X.to(torch.complex128 if X.is_complex() else torch.float64)


def _gram_eigvals(F: torch.Tensor, n: int) -> torch.Tensor:
    """The n largest eigenvalues [B,n] (descending, real dtype of F) of F F^H from the Gram matrix F^H F; 0 beyond r."""
    Fd = _double(F)
    s = torch.linalg.eigvalsh(Fd.mH @ Fd).flip(-1).to(F.real.dtype)
    pad = max(n - s.shape[-1], 0)
    return torch.nn.functional.pad(s, (0, pad))[:, :n]


class _SignalInverse(torch.autograd.Function):
    """M = U_K diag(1/s_K) U_K^H for a Hermitian PSD Gram matrix G = U diag(s) U^H [B,r,r] (descending s).

    F M F^H is the projector onto the top-K eigenvectors of F F^H. Backward: the Daleckii-Krein formula
    dM = U (Gamma o (U^H dG U)) U^H with Gamma_ij the divided differences of h = 1/s (signal), 0 (noise):
    -1/(s_i s_j) for two signal indices, 1/(s_i (s_i - s_j)) across the gap, 0 for two noise indices. Exact
    whenever s_K > s_{K+1}; finite under any degeneracy inside either part. At a degenerate boundary (no
    derivative exists) 1/gap and 1/s are bounded by eps * max s instead of inf, as in the full-matrix backward."""

    @staticmethod
    def forward(ctx, G, K):
        s, U = torch.linalg.eigh(G.detach())
        s, U = s.flip(-1), U.flip(-1)
        signal = _signal_mask(K, s.shape[-1])
        floor = _relative_floor(s)
        h = torch.where(signal, 1.0 / s.clamp_min(floor), torch.zeros_like(s))
        ctx.save_for_backward(s, U, signal, h, floor)
        return (U * h[:, None, :].to(U.dtype)) @ U.mH

    @staticmethod
    def backward(ctx, gM):
        s, U, signal, h, floor = ctx.saved_tensors
        both = signal[:, :, None] & signal[:, None, :]
        cross = signal[:, :, None] ^ signal[:, None, :]
        gap = (s[:, :, None] - s[:, None, :]).abs().clamp_min(floor[..., None])
        across = (h[:, :, None] + h[:, None, :]) / gap  # one of the two h is 0
        gamma = torch.where(both, -h[:, :, None] * h[:, None, :], torch.where(cross, across, torch.zeros_like(gap)))
        return U @ (gamma.to(U.dtype) * (U.mH @ gM @ U)) @ U.mH, None


def _inside_factored(F: torch.Tensor, a: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """a_k^H P a_k [B,kmax] (real dtype of F) for P the top-K projector of F F^H: b_k^H M b_k with b_k = F^H a_k
    (:class:`_SignalInverse`), computed in double (:func:`_double`)."""
    Fd, ad = _double(F), _double(a)
    M = _SignalInverse.apply(Fd.mH @ Fd, K)
    b = Fd.mH @ ad.mT  # [B,r,kmax]
    return (b.conj() * (M @ b)).real.sum(-2).to(F.real.dtype)


# ---------------------------------------------------------------------------------------------
# Eigengap hinge
@dataclass
class FiniteDiffRecord:
    """What one ``finite_diff`` gradient estimate cost and how noisy it was.

    n_dirs random Hermitian directions, each costing two batched eigvalsh calls (eigen_solves = 2 * n_dirs
    batched solves of B matrices); step ``delta``; rel_stderr [B]: the estimated standard error of the
    gradient estimate (Frobenius) relative to its norm: ~sqrt(N^2 / n_dirs) for an isotropic estimator."""

    n_dirs: int
    delta: float
    eigen_solves: int
    matrices_solved: int
    rel_stderr: torch.Tensor


def _hinge_eigvalsh(R: torch.Tensor, K: torch.Tensor, margin: float, fd: dict | None = None) -> torch.Tensor:
    """The hinge from torch.linalg.eigvalsh of R [B,N,N] (``fd`` unused: the signature of :attr:`GapBackend.hinge`)."""
    return _hinge(torch.linalg.eigvalsh(R).flip(-1), K, margin)


def _random_hermitian(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Isotropic standard Gaussian Hermitian matrices for the inner product Re tr(X^H Y): E[<G,D> D] = G."""
    G = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=gen)
    return (G + G.mH) / (math.sqrt(2.0) if like.is_complex() else 2.0)


@torch.no_grad()
def finite_diff_gap_gradient(R: torch.Tensor, K: torch.Tensor, margin: float = 0.03, n_dirs: int = 32, delta: float = 1e-3,
                             seed: int = 0) -> tuple[torch.Tensor, FiniteDiffRecord]:
    """Stochastic central-difference estimate of d hinge / dR (the seed's alternative 4), per scene.

    R [B,N,N] Hermitian (already loaded), K [B]. For each of ``n_dirs`` random Hermitian directions D
    (isotropic Gaussian) the directional derivative (h(R + delta D) - h(R - delta D)) / (2 delta) is measured
    by two batched eigvalsh calls, and the estimate is mean_s d_s D_s (unbiased up to O(delta^2)). Returns
    (grad [B,N,N], :class:`FiniteDiffRecord` with its cost and rel_stderr [B])."""
    gen = torch.Generator(device=R.device).manual_seed(seed)
    acc = torch.zeros_like(R)
    acc2 = torch.zeros(R.shape[0], dtype=R.real.dtype, device=R.device)
    for _ in range(n_dirs):
        D = _random_hermitian(R, gen)
        d = (_hinge_eigvalsh(R + delta * D, K, margin) - _hinge_eigvalsh(R - delta * D, K, margin)) / (2 * delta)
        g = d[:, None, None].to(R.dtype) * D
        acc += g
        acc2 += frobenius2(g)
    mean = acc / n_dirs
    mean_norm2 = frobenius2(mean)
    var = (acc2 / n_dirs - mean_norm2).clamp_min(0.0) * n_dirs / max(n_dirs - 1, 1)
    rel = torch.sqrt(var / n_dirs) / mean_norm2.sqrt().clamp_min(torch.finfo(R.real.dtype).tiny)
    return mean, FiniteDiffRecord(n_dirs, delta, 2 * n_dirs, 2 * n_dirs * R.shape[0], rel)


class _FiniteDiffHinge(torch.autograd.Function):
    """Forward exact (eigvalsh); backward :func:`finite_diff_gap_gradient`, its record appended to ``records`` if given."""

    @staticmethod
    def forward(ctx, R, K, margin, n_dirs, delta, seed, records):
        ctx.save_for_backward(R.detach(), K)
        ctx.args = (margin, n_dirs, delta, seed, records)
        with torch.no_grad():
            return _hinge_eigvalsh(R, K, margin)

    @staticmethod
    def backward(ctx, g):
        R, K = ctx.saved_tensors
        margin, n_dirs, delta, seed, records = ctx.args
        est, record = finite_diff_gap_gradient(R, K, margin, n_dirs, delta, seed)
        if records is not None:
            records.append(record)
        return g.to(est.dtype)[:, None, None] * est, None, None, None, None, None, None


def eigengap_hinge(
    R: torch.Tensor | Factored,
    K,
    margin: float = 0.03,
    eps_psd: float = 1e-4,
    backend: str = "eigh",
    *,
    fd_dirs: int = 32,
    fd_delta: float = 1e-3,
    fd_seed: int = 0,
    fd_records: list[FiniteDiffRecord] | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Per-scene eigengap hinge relu(margin - (lambda_K - lambda_{K+1})) of R + eps_psd I.

    R [B,N,N] complex Hermitian (complex64 or complex128), or a :class:`~workbench.covariance.Factored`
    (R = F F^H + c I); K [B] int64, 1 <= K <= N-1; eigenvalues in descending order (lambda_1 largest).
    Returns [B], real dtype of R. ``backend``:

    * ``"eigh"``: torch.linalg.eigh, vectors returned and unused (the seed's);
    * ``"svd"``: torch.linalg.svd (vectors unused), singular values descending and indexed as such;
    * ``"svd_flipped"``: WRONG on purpose, the later pipeline's bug: flips the descending singular values as
      if they were ascending, so it measures the gap between the K-th and (K+1)-th *smallest* eigenvalues;
    * ``"eigvalsh"``: torch.linalg.eigvalsh;
    * ``"finite_diff"``: forward exact (eigvalsh); backward a stochastic central-difference estimate over
      ``fd_dirs`` random Hermitian directions of step ``fd_delta`` (cost 2 * fd_dirs batched eigen-solves;
      each backward appends its :class:`FiniteDiffRecord` to ``fd_records`` when a list is given);
    * ``"exact"``: eigvalsh's value and gradient; on a Factored R from the r x r Gram matrix F^H F (the gap
      does not depend on c or eps_psd), else by torch.linalg.eigvalsh.

    All but ``finite_diff`` and ``svd_flipped`` have the same value and gradient V diag(g) V^H (fact 1). Every
    backend but ``exact`` works on the formed matrix (a Factored's R)."""
    check_choice("gap_backend", backend, config.GAP_BACKENDS)
    entry = GAP_BACKENDS[backend]
    if isinstance(R, Factored):
        if entry.factored:
            if validate:
                _check_factored(R)
            B, N = R.F.shape[:2]
            K = (check_K(K, B, N) if validate else K.to(torch.int64)).to(R.F.device)
            return entry.hinge_factored(R.F, K, margin)
        R = R.R
    if validate:
        check_covariance(R)
    B, N = R.shape[0], R.shape[-1]
    K = check_K(K, B, N) if validate else K.to(torch.int64)
    K = K.to(R.device)
    fd = {"n_dirs": fd_dirs, "delta": fd_delta, "seed": fd_seed, "records": fd_records}
    return entry.hinge(R + eps_psd * _eye_like(R), K, margin, fd)


def _hinge_eigh(Rl, K, margin, fd):
    return _hinge(torch.linalg.eigh(Rl)[0].flip(-1), K, margin)


def _hinge_svd(Rl, K, margin, fd):
    return _hinge(torch.linalg.svd(Rl)[1], K, margin)  # descending


def _hinge_svd_flipped(Rl, K, margin, fd):
    return _hinge(torch.linalg.svd(Rl)[1].flip(-1), K, margin)  # the bug: ascending values used as if descending


def _hinge_finite_diff(Rl, K, margin, fd):
    return _FiniteDiffHinge.apply(Rl, K, margin, fd["n_dirs"], fd["delta"], fd["seed"], fd["records"])


def _hinge_gram(F, K, margin):
    return _hinge(_gram_eigvals(F, int(K.max()) + 1), K, margin)


@dataclass(frozen=True)
class GapBackend:
    """One backend of :func:`eigengap_hinge`.

    hinge(Rl [B,N,N] = R + eps_psd I, K [B] int64, margin, fd {"n_dirs", "delta", "seed", "records"}) -> [B], on the
    formed matrix; hinge_factored(F [B,N,r], K, margin) -> [B] on a :class:`~workbench.covariance.Factored`'s thin
    factor, or None where the backend forms R (:attr:`factored`). finite: the gradient is finite when eigenvalues
    coincide. exact: the value is the hinge of lambda_K - lambda_{K+1} and the gradient its true gradient (svd_flipped
    measures another gap; finite_diff estimates the gradient). stochastic: the backward is a random estimate costing
    extra eigen-solves per direction. summary: one line for tables and menus."""

    hinge: Callable[..., torch.Tensor]
    hinge_factored: Callable[..., torch.Tensor] | None
    finite: bool
    exact: bool
    stochastic: bool
    summary: str

    @property
    def factored(self) -> bool:
        """Works on a Factored R = F F^H + c I from the r x r Gram matrix, without forming or decomposing N x N."""
        return self.hinge_factored is not None


GAP_BACKENDS: Mapping[str, GapBackend] = MappingProxyType({
    "eigh": GapBackend(_hinge_eigh, None, finite=True, exact=True, stochastic=False,
                       summary="torch.linalg.eigh, vectors returned and unused (the seed's)"),
    "svd": GapBackend(_hinge_svd, None, finite=True, exact=True, stochastic=False,
                      summary="torch.linalg.svd, singular values descending and indexed as such"),
    "svd_flipped": GapBackend(_hinge_svd_flipped, None, finite=True, exact=False, stochastic=False,
                              summary="WRONG on purpose: the descending singular values flipped as if ascending"),
    "eigvalsh": GapBackend(_hinge_eigvalsh, None, finite=True, exact=True, stochastic=False, summary="torch.linalg.eigvalsh"),
    "finite_diff": GapBackend(_hinge_finite_diff, None, finite=True, exact=False, stochastic=True,
                              summary="eigvalsh forward; backward a central-difference estimate over random directions"),
    "exact": GapBackend(_hinge_eigvalsh, _hinge_gram, finite=True, exact=True, stochastic=False,
                        summary="eigvalsh's value and gradient; on a Factored R from the r x r Gram matrix"),
})
check_registry("spectral.GAP_BACKENDS", GAP_BACKENDS, "config.GAP_BACKENDS", config.GAP_BACKENDS)


# ---------------------------------------------------------------------------------------------
# Subspace term
class _SafeProjectorEigh(torch.autograd.Function):
    """P = V_K V_K^H from a full eigh; backward keeps only signal-noise pairs (exact when lambda_K > lambda_{K+1})."""

    @staticmethod
    def forward(ctx, R, K):
        L, V = torch.linalg.eigh(R.detach())
        L, V = L.flip(-1), V.flip(-1)
        s = _signal_mask(K, R.shape[-1])
        Vs = V * s[:, None, :].to(V.dtype)
        ctx.save_for_backward(L, V, s)
        return Vs @ Vs.mH

    @staticmethod
    def backward(ctx, gP):
        L, V, s = ctx.saved_tensors
        cross = s[:, :, None] ^ s[:, None, :]
        diff = (L[:, :, None] - L[:, None, :]).abs()
        # At an exactly degenerate boundary the projector is not differentiable: bound 1/gap instead of inf.
        F = torch.where(cross, 1.0 / diff.clamp_min(_relative_floor(L)[..., None]), torch.zeros_like(diff))
        inner = V.mH @ gP @ V
        return V @ (F.to(V.dtype) * inner) @ V.mH, None


class _LorentzianEigh(torch.autograd.Function):
    """eigh (descending) whose backward replaces 1/(lambda_j - lambda_i) by (lambda_j - lambda_i)/((..)^2 + eps)."""

    @staticmethod
    def forward(ctx, R, eps):
        L, V = torch.linalg.eigh(R.detach())
        L, V = L.flip(-1), V.flip(-1)
        ctx.save_for_backward(L, V)
        ctx.eps = eps
        return L, V

    @staticmethod
    def backward(ctx, gL, gV):
        L, V = ctx.saved_tensors
        E = L[:, None, :] - L[:, :, None]  # E_ij = lambda_j - lambda_i
        F = E / (E * E + ctx.eps)
        F.diagonal(dim1=-2, dim2=-1).zero_()
        inner = torch.zeros_like(V) if gV is None else V.mH @ gV
        inner = 0.5 * (inner - inner.mH)
        inner = F.to(V.dtype) * inner
        if gL is not None:
            inner = inner + torch.diag_embed(gL.to(V.dtype))
        return V @ inner @ V.mH, None


def _check_subspace_inputs(B: int, N: int, a_true, mask, K) -> torch.Tensor:
    """Validate a_true [B,K_max,N], mask [B,K_max] and K [B] against a batch of B N x N covariances; returns K (int64)."""
    if not isinstance(a_true, torch.Tensor) or a_true.ndim != 3 or a_true.shape[0] != B or a_true.shape[-1] != N:
        shape = tuple(a_true.shape) if isinstance(a_true, torch.Tensor) else type(a_true).__name__
        raise ConfigError(f"a_true: expected steering vectors [B={B}, K_max, N={N}], got {shape}")
    kmax = a_true.shape[1]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, kmax):
        shape = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ConfigError(f"mask: expected a bool tensor [B={B}, K_max={kmax}], got {shape}")
    if not bool(torch.isfinite(a_true).all()):
        raise ConfigError("a_true: non-finite entries (NaN/inf)")
    K = check_K(K, B, N)
    if bool((K > kmax).any()):
        raise ConfigError(f"K: value {int(K.max())} exceeds K_max = {kmax} (the number of steering-vector slots in a_true)")
    if bool((mask.sum(-1).to(K.device) != K).any()):
        raise ConfigError("mask: the number of True slots per scene must equal K")
    return K


def _inside_safe(R: torch.Tensor, a: torch.Tensor, K: torch.Tensor, lorentzian_eps: float) -> torch.Tensor:
    """a_k^H P a_k [B,kmax] with P the top-K projector of R [B,N,N] (:class:`_SafeProjectorEigh`)."""
    P = _SafeProjectorEigh.apply(R, K)
    return (a.conj() * (a @ P.mT)).real.sum(-1)  # a^H P a, P Hermitian


def _inside_vectors(V: torch.Tensor, a: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """||V_K^H a_k||^2 [B,kmax] from eigenvectors V [B,N,N] in descending order of their eigenvalues."""
    kmax = a.shape[1]
    Vk = V[..., :kmax] * _signal_mask(K, kmax)[:, None, :].to(V.dtype)
    return (a.conj() @ Vk).abs().square().sum(-1)  # ||V_K^H a_k||^2 per slot


def _inside_eigh(R, a, K, lorentzian_eps):
    return _inside_vectors(torch.linalg.eigh(R)[1].flip(-1), a, K)


def _inside_detach(R, a, K, lorentzian_eps):
    return _inside_vectors(torch.linalg.eigh(R)[1].flip(-1).detach(), a, K)


def _inside_lorentzian(R, a, K, lorentzian_eps):
    return _inside_vectors(_LorentzianEigh.apply(R, lorentzian_eps)[1], a, K)


def subspace_energy(
    R: torch.Tensor | Factored,
    a_true: torch.Tensor,
    mask: torch.Tensor,
    K,
    backend: str = "safe",
    lorentzian_eps: float = 1e-6,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Energy of the true steering vectors in the predicted noise subspace, per scene.

    R [B,N,N] Hermitian PSD (complex64/complex128), or a :class:`~workbench.covariance.Factored` (R = F F^H + c I);
    a_true [B,K_max,N] steering vectors (unit norm; the formula uses ||a||^2 - ||V_K^H a||^2, so it holds for
    any norm); mask [B,K_max] bool, True for the K real sources; K [B] int64, 1 <= K <= min(K_max, N-1).
    Returns [B] real: sum_{valid k} a_k^H (I - V_K V_K^H) a_k / K, V_K the top-K eigenvectors of R. Only the
    projector V_K V_K^H enters, so the value and every backward are invariant to eigenvector phases. ``backend``:

    * ``"eigh"``: plain autograd through torch.linalg.eigh's vectors (inf/NaN when eigenvalues coincide);
    * ``"detach"``: the vectors detached (seed alternative 1): finite, but this term's gradient w.r.t. R is 0;
    * ``"lorentzian"``: eigh whose backward broadens 1/(li - lj) to (li - lj)/((li - lj)^2 + lorentzian_eps);
    * ``"safe"``: custom backward with only the signal-noise pairs: exact whenever lambda_K > lambda_{K+1},
      finite under any degeneracy inside the signal or the noise subspace. On a Factored R it needs only the
      r x r Gram matrix F^H F (module docstring, :class:`_SignalInverse`); else a full eigh of R.

    Every backend but ``safe`` works on the formed matrix (a Factored's R)."""
    check_choice("subspace_backend", backend, config.SUBSPACE_BACKENDS)
    entry = SUBSPACE_BACKENDS[backend]
    factored = isinstance(R, Factored) and entry.factored
    if isinstance(R, Factored) and not factored:
        R = R.R
    X = R.F if factored else R  # the tensor the term is computed from
    if validate:
        if factored:
            _check_factored(R)
        else:
            check_covariance(R)
        K = _check_subspace_inputs(X.shape[0], X.shape[1], a_true, mask, K)
    K = K.to(torch.int64).to(X.device)
    a = a_true.to(X.dtype)
    w = mask.to(X.real.dtype)
    norm2 = (a.conj() * a).real.sum(-1)  # [B,kmax]
    inside = entry.inside_factored(R.F, a, K) if factored else entry.inside(R, a, K, lorentzian_eps)
    energy = ((norm2 - inside) * w).sum(-1) / K.to(w.dtype)
    if entry.zero_gradient and R.requires_grad:
        energy = energy + 0.0 * torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1)  # keep a (zero) gradient path
    return energy


@dataclass(frozen=True)
class SubspaceBackend:
    """One backend of :func:`subspace_energy`.

    inside(R [B,N,N], a [B,K_max,N], K [B], lorentzian_eps) -> a_k^H V_K V_K^H a_k [B,K_max] from an N x N
    decomposition of the formed R; inside_factored(F [B,N,r], a, K) -> the same from a
    :class:`~workbench.covariance.Factored`'s thin factor, or None where the backend forms R (:attr:`factored`).
    finite: the gradient is finite when eigenvalues coincide (inside the signal or the noise subspace). exact: the
    gradient is the true gradient of the projector (whenever lambda_K > lambda_{K+1}). zero_gradient: the term's
    gradient w.r.t. R is 0 (the vectors are detached). summary: one line for tables and menus."""

    inside: Callable[..., torch.Tensor]
    inside_factored: Callable[..., torch.Tensor] | None
    finite: bool
    exact: bool
    zero_gradient: bool
    summary: str

    @property
    def factored(self) -> bool:
        """Works on a Factored R = F F^H + c I from the r x r Gram matrix, without forming or decomposing N x N."""
        return self.inside_factored is not None


SUBSPACE_BACKENDS: Mapping[str, SubspaceBackend] = MappingProxyType({
    "eigh": SubspaceBackend(_inside_eigh, None, finite=False, exact=True, zero_gradient=False,
                            summary="plain autograd through torch.linalg.eigh's vectors (inf/NaN when eigenvalues coincide)"),
    "detach": SubspaceBackend(_inside_detach, None, finite=True, exact=False, zero_gradient=True,
                              summary="eigh's vectors detached: finite, but the term's gradient is 0"),
    "lorentzian": SubspaceBackend(_inside_lorentzian, None, finite=True, exact=False, zero_gradient=False,
                                  summary="eigh whose backward broadens 1/(li - lj) to (li - lj)/((li - lj)^2 + eps)"),
    "safe": SubspaceBackend(_inside_safe, _inside_factored, finite=True, exact=True, zero_gradient=False,
                            summary="custom backward with only the signal-noise pairs; on a Factored R from the r x r Gram"),
})
check_registry("spectral.SUBSPACE_BACKENDS", SUBSPACE_BACKENDS, "config.SUBSPACE_BACKENDS", config.SUBSPACE_BACKENDS)
