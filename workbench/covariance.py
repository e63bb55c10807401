"""The covariance pipeline of one batch (R_samp -> R_pred -> R_blend -> NMSE) and the operations it is built of.

Owns: hermitise, trace normalisation, diagonal loading (C_EPS, :func:`diagonal_load`), the blend, the PSD rank
projection, Fix 2 and C_EPS (:func:`blend_pipeline`), the NMSE and its target (fact 4: :func:`nmse_target`), the
whole per-batch pipeline (:func:`pipeline`), the factored description of R_blend that the eigen-terms use when the
pipeline has one (:class:`Factored`, :func:`blend_factored`) and spectrum statistics. The loss, the oracle floor of
the diagnostics and the notebooks all call these; none assembles the pipeline itself.
Must not: estimate R_samp from snapshots (:mod:`workbench.estimators`, Fix 1 included), hold loss weights, train,
or loop over presets or SNRs (that is :mod:`workbench.studies`).

All functions take batch-first complex tensors [..., N, N] (complex64 for compute, complex128 in
gradient checks) and are differentiable unless stated otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_square
from .config import ConfigError, FixConfig


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
    a vanishing trace is a real NaN/inf source, so it is floored, not divided by."""
    check_square(R)
    target = R.shape[-1] if target is None else target
    tr = trace(R)
    tr = torch.where(tr.abs() < eps, torch.full_like(tr, eps), tr)
    return R * (target / tr)[..., None, None].to(R.dtype)


def diagonal_load(R: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
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
def psd_projection(R: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Nearest PSD matrix of rank <= ``rank`` in Frobenius norm: keep the largest positive eigenvalues."""
    ev, V = torch.linalg.eigh(hermitise(R))
    keep = ev.clamp_min(0)
    if rank is not None:
        keep = torch.where(torch.arange(ev.shape[-1], device=ev.device) >= ev.shape[-1] - rank, keep, 0)
    return (V * keep[..., None, :].to(V.dtype)) @ V.mH


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
    return diagonal_load(R, fixes.c_eps) if fixes.c_eps else R


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
    """What R_blend is compared with (fact 4). With ``nmse_same_preprocessing`` the reference goes
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
