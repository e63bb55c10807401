"""Differentiable eigen-terms of the covariance pipeline, each with a selectable backward (DESIGN.md 3, 6).

Two terms act on a batch of Hermitian covariances R [B,N,N] (complex64 for compute, complex128 in
gradient checks) with a per-scene source count K [B] (int64, 1-based):

* :func:`eigengap_hinge`: relu(margin - (lambda_K - lambda_{K+1})) of R + eps_psd I, eigenvalues descending;
* :func:`subspace_energy`: sum_k a_k^H (I - V_K V_K^H) a_k / K, the energy of the true steering vectors in
  the predicted noise subspace (the MUSIC denominator at the true sources).

The facts this module lets a user check (each has a test in ``tests/test_spectral.py``):

1. **Eigenvalues alone have a finite gradient.** For Hermitian R = V diag(lambda) V^H and a loss of the
   eigenvalues only, dL/dR = V diag(dL/dlambda) V^H: no eigenvalue difference appears in it, so it is finite
   even when 139 eigenvalues coincide after C_EPS loading. ``eigh`` with the vectors unused, ``eigvalsh``,
   ``svd`` and ``topk`` all give this gradient; the eigengap hinge is therefore not a NaN source.
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

The ``topk`` engine (:func:`top_eigvals`, :func:`top_eigh`) finds only the few largest eigenpairs by a
batched Chebyshev-filtered block subspace iteration with Rayleigh-Ritz (Zhou & Saad 2007): batched matrix
products only, no per-matrix LAPACK call on the N x N matrices (DESIGN.md section 6).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from . import config
from .checks import check_covariance, check_K
from .config import ConfigError, check_choice

GAP_BACKENDS = config.GAP_BACKENDS
SUBSPACE_BACKENDS = config.SUBSPACE_BACKENDS
SOLVERS = ("eigh", "topk")  # where the ``safe`` subspace backward gets its eigenvectors


def _eye_like(R: torch.Tensor) -> torch.Tensor:
    return torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)


# ---------------------------------------------------------------------------------------------
# The topk engine: Chebyshev-filtered block subspace iteration
def _default_tol(dtype: torch.dtype) -> float:
    return 1e-11 if dtype in (torch.float64, torch.complex128) else 2e-5


_TOPK_CACHE: dict = {}  # the last top_eigh result, reused for the same tensor (same object, same version)
LAST_TOPK: dict = {}  # cost of the last top_eigh call: iterations, matmuls (R @ block), degrees, block, rel_residual [B]


@torch.no_grad()
def top_eigh(R: torch.Tensor, k: int, iters: int | None = None, tol: float | None = None, psd: bool = True, block: int | None = None, seed: int = 0):
    """The k largest eigenpairs of a batch of Hermitian matrices, without a full eigendecomposition.

    R [B,N,N] complex64/complex128 (or real), Hermitian; k in 1..N. Returns (values [B,k] real,
    descending; vectors [B,N,k] with R v ~ lambda v, orthonormal). Not differentiable (see
    :func:`top_eigvals` for the differentiable values).

    Method: a block of ``block`` (default min(N, 2k + 4)) vectors is filtered by a Chebyshev polynomial of
    R that damps the interval [a, b] (a = 0 for ``psd=True``, else a Gershgorin lower bound; b = the smallest
    current Ritz value) and grows the eigenvalues above it, then orthonormalised (QR) and rotated by
    Rayleigh-Ritz. The polynomial degree adapts so that the spread of the amplification stays within the
    precision of the dtype (one device sync per iteration for the whole batch, never one per scene). Stops
    when every one of the k residuals ||R v - lambda v|| is below ``tol`` * |lambda_1| (default 2e-5 for
    single precision, 1e-11 for double), or after exactly ``iters`` iterations if given. The cost of the
    last call is in ``LAST_TOPK``.
    ``psd=True`` assumes R has no eigenvalue below 0 (true for loaded covariances). The last result is
    cached for the same tensor object at the same version (the hinge and the subspace term share one solve)."""
    key = (R._version, iters, tol, psd, block, seed)
    hit = _TOPK_CACHE.get("ref")
    if hit is not None and hit() is R and _TOPK_CACHE["key"] == key and _TOPK_CACHE["k"] >= k:
        LAST_TOPK["cache_hit"] = True
        return _TOPK_CACHE["vals"][:, :k], _TOPK_CACHE["vecs"][..., :k]
    vals, vecs = _top_eigh(R.detach(), k, iters, tol, psd, block, seed)
    _TOPK_CACHE.update(ref=weakref.ref(R), key=key, k=k, vals=vals, vecs=vecs)
    return vals, vecs


def _top_eigh(R, k, iters, tol, psd, block, seed):
    B, N = R.shape[0], R.shape[-1]
    p = min(N, block if block is not None else 2 * k + 4)
    if not 1 <= k <= p:
        raise ConfigError(f"k = {k} is out of range: allowed 1..{p} (block {p}, N = {N})")
    rdt = R.real.dtype
    tol = _default_tol(R.dtype) if tol is None else tol
    eps_mach = torch.finfo(rdt).eps
    gen = torch.Generator(device=R.device).manual_seed(seed)
    X = torch.randn(B, N, p, dtype=R.dtype, device=R.device, generator=gen)
    if p == N:  # the block is the whole space: one Rayleigh-Ritz is exact
        iters = 1
    if psd:
        a = torch.zeros(B, 1, 1, dtype=rdt, device=R.device)
    else:
        diag = torch.diagonal(R, dim1=-2, dim2=-1).real
        a = (diag - (R.abs().sum(-1) - diag.abs())).min(-1).values[:, None, None]
    degree, max_degree, max_outer = 1, 24, 60 if iters is None else iters
    theta, matmuls, degrees = None, 0, []
    for it in range(max_outer):
        if theta is not None:
            b = theta[:, -1][:, None, None]
            c = 0.5 * (a + b)
            e = (0.5 * (b - a)).clamp_min(1e-3 * theta[:, :1, None].abs().clamp_min(torch.finfo(rdt).tiny))
            # Scaled three-term recurrence: Z_j = T_j((R - c)/e) X / t_j with t_j = T_j(x_1) (scalar per matrix),
            # so the dominant component stays O(1) without computing norms.
            inv_e, c_e = 1.0 / e, c / e
            x1 = ((theta[:, :1, None] - c) * inv_e).clamp_min(1.0 + 1e-6)
            t0, t1 = torch.ones_like(x1), x1
            Y0, Y1 = X, (R @ X * inv_e - c_e * X) / x1
            for _ in range(degree - 1):
                t2 = 2.0 * x1 * t1 - t0
                Y2 = (R @ Y1 * inv_e - c_e * Y1) * (2.0 * t1 / t2) - Y0 * (t0 / t2)
                Y0, Y1, t0, t1 = Y1, Y2, t1, t2
            X = Y1
            matmuls += degree
            degrees.append(degree)
        X = torch.linalg.qr(X).Q
        RX = R @ X
        T = X.mH @ RX
        theta, S = torch.linalg.eigh(0.5 * (T + T.mH))
        theta, S = theta.flip(-1), S.flip(-1)
        X, RX = X @ S, RX @ S
        Dk = RX[..., :k] - X[..., :k] * theta[:, None, :k]
        res = (Dk.conj() * Dk).real.sum(-2).sqrt() if Dk.is_complex() else Dk.square().sum(-2).sqrt()
        rel = (res / theta[:, :1].abs().clamp_min(torch.finfo(rdt).tiny)).amax(-1)
        worst = float(rel.max())  # one sync per iteration for the whole batch
        if (iters is None and worst <= tol) or it + 1 == max_outer:
            break
        # Degree: keep T_m(x_1)/T_m(x_k) * eps * contamination below ~1e-2, so the QR still resolves the k-th
        # direction next to the (much more amplified) first one.
        b = theta[:, -1:]
        c, e = 0.5 * (a[:, :, 0] + b), (0.5 * (b - a[:, :, 0])).clamp_min(1e-3 * theta[:, :1].abs())
        x1 = ((theta[:, :1] - c) / e).clamp_min(1.0)
        xk = ((theta[:, k - 1 : k] - c) / e).clamp_min(1.0)
        spread = float((torch.acosh(x1) - torch.acosh(xk)).max())
        budget = math.log(1e-2 / (eps_mach * max(min(worst * 10, 1.0), eps_mach)))
        degree = int(max(1, min(max_degree, budget / max(spread, 1e-6))))
    LAST_TOPK.update(cache_hit=False, iterations=it + 1, matmuls=matmuls + it + 1, degrees=degrees, block=p, rel_residual=rel)
    return theta[:, :k], X[..., :k]


class _TopEigvals(torch.autograd.Function):
    """values = top-k eigenvalues of R; backward V_k diag(g) V_k^H (DESIGN fact 1), exact for distinct values."""

    @staticmethod
    def forward(ctx, R, k, iters, tol, psd):
        vals, vecs = top_eigh(R, k, iters=iters, tol=tol, psd=psd)
        ctx.save_for_backward(vecs)
        return vals

    @staticmethod
    def backward(ctx, g):
        (V,) = ctx.saved_tensors
        return (V * g.to(V.dtype)[:, None, :]) @ V.mH, None, None, None, None


def top_eigvals(R: torch.Tensor, k: int, iters: int | None = None, tol: float | None = None, psd: bool = True) -> torch.Tensor:
    """The k largest eigenvalues [B,k] (real, descending) of Hermitian R [B,N,N], differentiable.

    The ``topk`` engine: :func:`top_eigh` in the forward; the backward is V_k diag(g) V_k^H with the
    computed top eigenvectors, the exact eigenvalue gradient wherever the k values are distinct from their
    neighbours. ``iters``/``tol``/``psd`` as in :func:`top_eigh`."""
    return _TopEigvals.apply(R, int(k), iters, tol, psd)


# ---------------------------------------------------------------------------------------------
# Eigengap hinge
@dataclass
class FiniteDiffRecord:
    """What the last ``finite_diff`` backward cost and how noisy it was.

    n_dirs random Hermitian directions, each costing two batched eigvalsh calls (eigen_solves = 2 * n_dirs
    batched solves of B matrices); step ``delta``; rel_stderr [B]: the estimated standard error of the
    gradient estimate (Frobenius) relative to its norm: ~sqrt(N^2 / n_dirs) for an isotropic estimator."""

    n_dirs: int
    delta: float
    eigen_solves: int
    matrices_solved: int
    rel_stderr: torch.Tensor


LAST_FINITE_DIFF: FiniteDiffRecord | None = None


def _gap_from_desc(vals: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    pair = vals.gather(-1, torch.stack([K - 1, K], dim=-1))
    return pair[:, 0] - pair[:, 1]


def _hinge_eigvalsh(R: torch.Tensor, K: torch.Tensor, margin: float) -> torch.Tensor:
    return torch.relu(margin - _gap_from_desc(torch.linalg.eigvalsh(R).flip(-1), K))


def _random_hermitian(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Isotropic standard Gaussian Hermitian matrices for the inner product Re tr(X^H Y): E[<G,D> D] = G."""
    G = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=gen)
    return (G + G.mH) / (math.sqrt(2.0) if like.is_complex() else 2.0)


@torch.no_grad()
def finite_diff_gap_gradient(R: torch.Tensor, K: torch.Tensor, margin: float = 0.03, n_dirs: int = 32, delta: float = 1e-3, seed: int = 0):
    """Stochastic central-difference estimate of d hinge / dR (the seed's alternative 4), per scene.

    R [B,N,N] Hermitian (already loaded), K [B]. For each of ``n_dirs`` random Hermitian directions D
    (isotropic Gaussian) the directional derivative (h(R + delta D) - h(R - delta D)) / (2 delta) is measured
    by two batched eigvalsh calls, and the estimate is mean_s d_s D_s (unbiased up to O(delta^2)). Returns
    (grad [B,N,N], rel_stderr [B]) and stores a :class:`FiniteDiffRecord` in ``LAST_FINITE_DIFF``."""
    global LAST_FINITE_DIFF
    gen = torch.Generator(device=R.device).manual_seed(seed)
    acc = torch.zeros_like(R)
    acc2 = torch.zeros(R.shape[0], dtype=R.real.dtype, device=R.device)
    for _ in range(n_dirs):
        D = _random_hermitian(R, gen)
        d = (_hinge_eigvalsh(R + delta * D, K, margin) - _hinge_eigvalsh(R - delta * D, K, margin)) / (2 * delta)
        g = d[:, None, None].to(R.dtype) * D
        acc += g
        acc2 += torch.linalg.matrix_norm(g) ** 2
    mean = acc / n_dirs
    mean_norm2 = torch.linalg.matrix_norm(mean) ** 2
    var = (acc2 / n_dirs - mean_norm2).clamp_min(0.0) * n_dirs / max(n_dirs - 1, 1)
    rel = torch.sqrt(var / n_dirs) / mean_norm2.sqrt().clamp_min(torch.finfo(R.real.dtype).tiny)
    LAST_FINITE_DIFF = FiniteDiffRecord(n_dirs, delta, 2 * n_dirs, 2 * n_dirs * R.shape[0], rel)
    return mean, rel


class _FiniteDiffHinge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, R, K, margin, n_dirs, delta, seed):
        ctx.save_for_backward(R.detach(), K)
        ctx.args = (margin, n_dirs, delta, seed)
        with torch.no_grad():
            return _hinge_eigvalsh(R, K, margin)

    @staticmethod
    def backward(ctx, g):
        R, K = ctx.saved_tensors
        margin, n_dirs, delta, seed = ctx.args
        est, _ = finite_diff_gap_gradient(R, K, margin, n_dirs, delta, seed)
        return g.to(est.dtype)[:, None, None] * est, None, None, None, None, None


def eigengap_hinge(
    R: torch.Tensor,
    K,
    margin: float = 0.03,
    eps_psd: float = 1e-4,
    backend: str = "eigh",
    *,
    fd_dirs: int = 32,
    fd_delta: float = 1e-3,
    fd_seed: int = 0,
    topk_iters: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Per-scene eigengap hinge relu(margin - (lambda_K - lambda_{K+1})) of R + eps_psd I.

    R [B,N,N] complex Hermitian (complex64 or complex128); K [B] int64, 1 <= K <= N-1; eigenvalues in
    descending order (lambda_1 largest). Returns [B], real dtype of R. ``backend``:

    * ``"eigh"``: torch.linalg.eigh, vectors returned and unused (the seed's);
    * ``"svd"``: torch.linalg.svd (vectors unused), singular values descending and indexed as such;
    * ``"svd_flipped"``: WRONG on purpose, the later pipeline's bug: flips the descending singular values as
      if they were ascending, so it measures the gap between the K-th and (K+1)-th *smallest* eigenvalues;
    * ``"eigvalsh"``: torch.linalg.eigvalsh;
    * ``"finite_diff"``: forward exact (eigvalsh); backward a stochastic central-difference estimate over
      ``fd_dirs`` random Hermitian directions of step ``fd_delta`` (cost 2 * fd_dirs batched eigen-solves;
      spread in ``LAST_FINITE_DIFF``, see :func:`finite_diff_gap_gradient`);
    * ``"topk"``: only the max(K)+1 largest eigenvalues, by :func:`top_eigvals` (exact gradient where the
      top eigenvalues are distinct).

    All but ``finite_diff`` and ``svd_flipped`` have the same value and gradient V diag(g) V^H (fact 1)."""
    check_choice("gap_backend", backend, GAP_BACKENDS)
    if validate:
        check_covariance(R)
    B, N = R.shape[0], R.shape[-1]
    K = check_K(K, B, N) if validate else K.to(torch.int64)
    K = K.to(R.device)
    if backend == "topk":  # eigenvalues of R + eps I are those of R plus eps: solve on R (shared with subspace_energy)
        vals = top_eigvals(R, int(K.max()) + 1, iters=topk_iters) + eps_psd
        return torch.relu(margin - _gap_from_desc(vals, K))
    Rl = R + eps_psd * _eye_like(R)
    if backend == "finite_diff":
        return _FiniteDiffHinge.apply(Rl, K, margin, fd_dirs, fd_delta, fd_seed)
    if backend == "eigh":
        vals = torch.linalg.eigh(Rl)[0].flip(-1)
    elif backend == "eigvalsh":
        vals = torch.linalg.eigvalsh(Rl).flip(-1)
    elif backend == "svd":
        vals = torch.linalg.svd(Rl)[1]  # descending
    elif backend == "svd_flipped":
        vals = torch.linalg.svd(Rl)[1].flip(-1)  # the bug: ascending values used as if descending
    return torch.relu(margin - _gap_from_desc(vals, K))


# ---------------------------------------------------------------------------------------------
# Subspace term
def _signal_mask(K: torch.Tensor, n: int) -> torch.Tensor:
    """[B,n] bool: column j (descending order) belongs to the top-K signal subspace of its scene."""
    return torch.arange(n, device=K.device)[None, :] < K[:, None]


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
        floor = torch.finfo(L.dtype).eps * L.abs().amax(-1)[:, None, None].clamp_min(torch.finfo(L.dtype).tiny)
        F = torch.where(cross, 1.0 / diff.clamp_min(floor), torch.zeros_like(diff))
        inner = V.mH @ gP @ V
        return V @ (F.to(V.dtype) * inner) @ V.mH, None


def _batched_cg(apply_A, rhs: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Conjugate gradients on independent Hermitian positive definite systems, one per column of rhs [B,N,c]."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = (r.conj() * r).real.sum(-2, keepdim=True)
    stop = (tol * torch.linalg.vector_norm(rhs, dim=-2, keepdim=True)) ** 2
    tiny = torch.finfo(rr.dtype).tiny
    active = rr > stop
    for it in range(max_iter):
        LAST_TOPK["cg_iterations"] = it  # cost of the last safe/topk backward
        if not bool(active.any()):
            break
        Ap = apply_A(p)
        pAp = (p.conj() * Ap).real.sum(-2, keepdim=True)
        # roundoff can make a nearly singular system look indefinite: freeze such a column at its
        # current iterate instead of dividing by a non-positive curvature (which gave inf, then NaN)
        active = active & (pAp > 0)
        alpha = torch.where(active, rr / pAp.clamp_min(tiny), torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = (r.conj() * r).real.sum(-2, keepdim=True)
        p = torch.where(active, r + (rr_new / rr.clamp_min(tiny)) * p, p)
        rr = torch.where(active, rr_new, rr)
        active = active & (rr > stop)
    return x


class _SafeProjectorTopk(torch.autograd.Function):
    """P = V_K V_K^H with V from the topk engine; the same signal-noise backward without the noise eigenvectors.

    sum_{j in noise} v_j v_j^H / (lambda_i - lambda_j) = (lambda_i I - R_N)^{-1} restricted to the noise
    subspace, with R_N = (I - P) R (I - P); it is applied by conjugate gradients (positive definite there
    whenever lambda_i > lambda_{K+1}; one iteration when the noise eigenvalues coincide)."""

    @staticmethod
    def forward(ctx, R, K, kmax, iters):
        L, V = top_eigh(R, kmax, iters=iters)
        s = _signal_mask(K, kmax)
        Vs = V * s[:, None, :].to(V.dtype)
        ctx.save_for_backward(R.detach(), L, Vs, s)
        return Vs @ Vs.mH

    @staticmethod
    def backward(ctx, gP):
        R, L, Vs, s = ctx.saved_tensors
        # Exact only as far as the topk vectors are converged: with lambda_K close to the noise floor, an
        # eigenvector residual of ~1e-5 was measured to give a finite but wrong gradient (relative error ~0.9
        # on 2 of 16 scenes; README, open issues). solver="eigh" is exact there.

        def noise(y):  # (I - P) y without forming P
            return y - Vs @ (Vs.mH @ y)

        shifts = torch.cat([L, L], dim=-1)[:, None, :].to(R.dtype)  # [B,1,2k]
        rhs = noise(torch.cat([gP @ Vs, gP.mH @ Vs], dim=-1))  # zero columns for j >= K_b
        tol = _default_tol(R.dtype) * 1e-1
        XY = _batched_cg(lambda y: shifts * y - noise(R @ noise(y)), rhs, tol, max_iter=R.shape[-1])
        X, Y = XY.chunk(2, dim=-1)
        return X @ Vs.mH + Vs @ Y.mH, None, None, None


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


def _check_subspace_inputs(R, a_true, mask, K):
    check_covariance(R)
    B, N = R.shape[0], R.shape[-1]
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


def subspace_energy(
    R: torch.Tensor,
    a_true: torch.Tensor,
    mask: torch.Tensor,
    K,
    backend: str = "safe",
    lorentzian_eps: float = 1e-6,
    *,
    solver: str = "eigh",
    topk_iters: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Energy of the true steering vectors in the predicted noise subspace, per scene.

    R [B,N,N] Hermitian PSD (complex64/complex128); a_true [B,K_max,N] steering vectors (unit norm; the
    formula uses ||a||^2 - ||V_K^H a||^2, so it holds for any norm); mask [B,K_max] bool, True for the K
    real sources; K [B] int64, 1 <= K <= min(K_max, N-1). Returns [B] real:
    sum_{valid k} a_k^H (I - V_K V_K^H) a_k / K, V_K the top-K eigenvectors of R. Only the projector
    V_K V_K^H enters, so the value and every backward are invariant to eigenvector phases. ``backend``:

    * ``"eigh"``: plain autograd through torch.linalg.eigh's vectors (inf/NaN when eigenvalues coincide);
    * ``"detach"``: the vectors detached (seed alternative 1): finite, but this term's gradient w.r.t. R is 0;
    * ``"lorentzian"``: eigh whose backward broadens 1/(li - lj) to (li - lj)/((li - lj)^2 + lorentzian_eps);
    * ``"safe"``: custom backward with only the signal-noise pairs: exact whenever lambda_K > lambda_{K+1},
      finite under any degeneracy inside the signal or the noise subspace. ``solver="topk"`` takes the top
      K_max eigenvectors from :func:`top_eigh` and applies the noise resolvent by conjugate gradients
      instead of a full eigendecomposition."""
    check_choice("subspace_backend", backend, SUBSPACE_BACKENDS)
    check_choice("solver", solver, SOLVERS)
    K = _check_subspace_inputs(R, a_true, mask, K) if validate else K.to(torch.int64)
    K = K.to(R.device)
    kmax = a_true.shape[1]
    a = a_true.to(R.dtype)
    w = mask.to(R.real.dtype)
    norm2 = (a.conj() * a).real.sum(-1)  # [B,kmax]
    if backend == "safe":
        if solver == "topk":
            P = _SafeProjectorTopk.apply(R, K, kmax, topk_iters)
        else:
            P = _SafeProjectorEigh.apply(R, K)
        inside = (a.conj() * (a @ P.mT)).real.sum(-1)  # a^H P a, P Hermitian
    else:
        if backend == "lorentzian":
            _, V = _LorentzianEigh.apply(R, lorentzian_eps)
        else:
            L, V = torch.linalg.eigh(R)
            V = V.flip(-1)
            if backend == "detach":
                V = V.detach()
        Vk = V[..., :kmax] * _signal_mask(K, kmax)[:, None, :].to(V.dtype)
        inside = (a.conj() @ Vk).abs().square().sum(-1)  # ||V_K^H a_k||^2 per slot
    energy = ((norm2 - inside) * w).sum(-1) / K.to(w.dtype)
    if backend == "detach" and R.requires_grad:
        energy = energy + 0.0 * torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1)  # keep a (zero) gradient path
    return energy
