"""Localisation from a covariance: near-field MUSIC and MVDR, MDL/AIC, the Cramer-Rao bound, matching metrics.

Everything is batched (covariances [B, N, N], complex) and runs on the device of its input. Steering
vectors come only from :func:`workbench.physics.steering`. Radians and metres inside; degrees only in the
metrics' names (``*_deg``).

Search grid and its cost. The Fresnel phase of element i = v N_H + h splits into a row part and a
column part, phase = k0 [x_h sin(phi) cos(theta) - x_h^2/(2r)] + k0 [z_v sin(theta) - z_v^2/(2r)], so
a(phi, theta, r) = kron(a_z(theta, r), a_x(phi, theta, r)), and both factors are ``steering`` of the
1 x N_V and N_H x 1 sub-arrays. A spectrum over the grid is a sum of |f_j^H a(g)|^2 over the columns f_j
of an N x J matrix F (MUSIC: the top-K eigenvectors, J = K; MVDR: U (Lambda + delta)^-1/2, J = N).
Contracting the column index v with a_z first costs J (N T Q + N_H P T Q) complex MACs per scene instead
of J N P T Q with the full steering table; for MVDR the quadratic form a_x^H M_tq a_x with one N_H x N_H
matrix M_tq per (theta, r) costs N^2 T Q + N_H^2 P T Q. The tables take P T Q N_H + T Q N_V entries
instead of P T Q N (see :meth:`Grid.memory_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as nnf
from scipy.optimize import linear_sum_assignment

from .config import ConfigError, SystemConfig, resolve_device
from .physics import SceneBatch, measurement_matrices, simulate, steering

METHODS = ("music", "mvdr")
COUNT_METHODS = ("mdl", "aic")


# ---------------------------------------------------------------------------------------------
# The search grid
@dataclass(frozen=True, eq=False)
class Grid:
    """A search grid over the field of view.

    phi [P], theta [T] (radians) and r [Q] (metres): 1-D float64 CPU tensors, strictly increasing. The
    spectrum over the grid has shape [B, P, T, Q]. Build with :meth:`default` or :meth:`uniform`; a grid
    from raw tensors is checked against a system by :meth:`validate` (every estimator calls it).
    """

    phi: torch.Tensor
    theta: torch.Tensor
    r: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("phi", "theta", "r"):
            t = torch.as_tensor(getattr(self, name), dtype=torch.float64).detach().cpu().reshape(-1)
            if t.numel() == 0 or not torch.isfinite(t).all():
                raise ConfigError(f"grid.{name}: expected a non-empty 1-D array of finite values, got {t.tolist()}")
            if t.numel() > 1 and not (t[1:] > t[:-1]).all():
                raise ConfigError(f"grid.{name}: values must be strictly increasing")
            object.__setattr__(self, name, t)

    @classmethod
    def uniform(cls, system: SystemConfig, n_phi: int, n_theta: int, n_r: int) -> Grid:
        """n_phi x n_theta x n_r points: phi and theta uniform over +-phi_max, +-theta_max; r uniform in 1/r
        over [1/r_max, 1/r_min] (the Fresnel term is linear in 1/r, so this spaces range cells evenly)."""
        for name, n in (("n_phi", n_phi), ("n_theta", n_theta), ("n_r", n_r)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"grid.{name} = {n!r}: expected an integer >= 1")
        pm, tm = math.radians(system.phi_max_deg), math.radians(system.theta_max_deg)
        phi = torch.linspace(-pm, pm, n_phi, dtype=torch.float64) if n_phi > 1 else torch.zeros(1, dtype=torch.float64)
        theta = torch.linspace(-tm, tm, n_theta, dtype=torch.float64) if n_theta > 1 else torch.zeros(1, dtype=torch.float64)
        if n_r > 1:
            r = 1.0 / torch.linspace(1.0 / system.r_min_m, 1.0 / system.r_max_m, n_r, dtype=torch.float64)
        else:
            r = torch.tensor([2.0 / (1.0 / system.r_min_m + 1.0 / system.r_max_m)], dtype=torch.float64)
        grid = cls(phi, theta, r)
        grid.validate(system)
        return grid

    @classmethod
    def default(cls, system: SystemConfig, step_deg: float = 2.0, n_r: int = 16) -> Grid:
        """The default grid: ``step_deg`` in phi and theta, ``n_r`` ranges uniform in 1/r.

        For the default system (12 x 12 RIS, +-60 deg x +-30 deg, 0.5..10 m) this is 61 x 31 x 16 = 30,256
        points. The half-power beam is about 2/N_H rad ~ 10 deg wide at broadside, so 2 deg gives 5 points
        per beam; the range resolution in 1/r is about lambda/x_max^2 ~ 0.44 1/m over a span of 1.9 1/m,
        so 16 ranges give 3-4 points per range cell. Tables: 2.9 MB separable (complex64), 34.9 MB as a
        full steering table; one float32 spectrum is 121 kB per scene.
        """
        if not (isinstance(step_deg, (int, float)) and step_deg > 0):
            raise ConfigError(f"grid.step_deg = {step_deg!r}: expected a number > 0 (degrees)")
        n_phi = int(round(2 * system.phi_max_deg / step_deg)) + 1
        n_theta = int(round(2 * system.theta_max_deg / step_deg)) + 1
        return cls.uniform(system, n_phi, n_theta, n_r)

    def validate(self, system: SystemConfig) -> None:
        """Fail with ConfigError when a grid point lies outside the system's field of view."""
        tol = 1e-9
        limits = {
            "phi": (-math.radians(system.phi_max_deg), math.radians(system.phi_max_deg), "system.phi_max_deg", math.degrees),
            "theta": (-math.radians(system.theta_max_deg), math.radians(system.theta_max_deg), "system.theta_max_deg", math.degrees),
            "r": (system.r_min_m, system.r_max_m, "system.r_min_m/r_max_m", float),
        }
        for name, (lo, hi, source, show) in limits.items():
            t = getattr(self, name)
            if t.min() < lo - tol or t.max() > hi + tol:
                unit = "m" if name == "r" else "deg"
                raise ConfigError(
                    f"grid.{name} spans [{show(t.min().item()):.6g}, {show(t.max().item()):.6g}] {unit}: outside the field of view "
                    f"[{show(lo):.6g}, {show(hi):.6g}] {unit} ({source})"
                )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.phi.numel(), self.theta.numel(), self.r.numel())

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def steps(self) -> torch.Tensor:
        """Typical spacing (phi rad, theta rad, 1/r in 1/m), [3] float64; 1 where an axis has one point."""
        inv_r = 1.0 / self.r
        out = [(t.max() - t.min()).item() / (t.numel() - 1) if t.numel() > 1 else 1.0 for t in (self.phi, self.theta, inv_r)]
        return torch.tensor(out, dtype=torch.float64)

    def memory_bytes(self, system: SystemConfig, dtype: torch.dtype = torch.complex64) -> dict[str, int]:
        """Bytes of the separable steering tables, of a full [P,T,Q,N] table, and of one real spectrum."""
        item = torch.empty((), dtype=dtype).element_size()
        P, T, Q = self.shape
        return {
            "separable": item * (P * T * Q * system.N_H + T * Q * system.N_V),
            "full": item * P * T * Q * system.N,
            "spectrum_per_scene": (item // 2) * P * T * Q,
        }

    def factors(self, system: SystemConfig, device=None, dtype: torch.dtype = torch.complex64) -> tuple[torch.Tensor, torch.Tensor]:
        """Separable steering tables a_x [P,T,Q,N_H] and a_z [T,Q,N_V] (cached per system/device/dtype),
        with a(phi_p, theta_t, r_q)[v N_H + h] = a_z[t,q,v] a_x[p,t,q,h]."""
        key = (system.N_H, system.N_V, system.carrier_hz, system.spacing_wavelengths, str(device), dtype)
        if key not in self._cache:
            self.validate(system)
            ph, th, r = self.phi[:, None, None], self.theta[None, :, None], self.r[None, None, :]
            ax = _subarray_steering(system, system.N_H, 1, ph, th, r)  # [P,T,Q,N_H]
            az = _subarray_steering(system, 1, system.N_V, torch.zeros(()), th[0], r[0])  # [T,Q,N_V]
            self._cache[key] = (ax.to(device=device, dtype=dtype), az.to(device=device, dtype=dtype))
        return self._cache[key]

    def steering_table(self, system: SystemConfig, device=None, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
        """The full steering table [P,T,Q,N] straight from :func:`steering` (for checks and benchmarks)."""
        self.validate(system)
        a = steering(system, self.phi[:, None, None], self.theta[None, :, None], self.r[None, None, :])
        return a.to(device=device, dtype=dtype)


def _subarray_steering(system: SystemConfig, n_h: int, n_v: int, phi, theta, r) -> torch.Tensor:
    """``steering`` of the n_h x n_v sub-array that shares the system's row (n_v = 1) or column (n_h = 1)
    coordinates: the sub-array sits at z = 0 (resp. x = 0), which drops the other half of the phase."""
    n = n_h * n_v
    if n == 1:
        shape = torch.broadcast_shapes(torch.as_tensor(phi).shape, torch.as_tensor(theta).shape, torch.as_tensor(r).shape)
        return torch.ones(*shape, 1, dtype=torch.complex128)
    sub = system.replace(N_H=n_h, N_V=n_v, K_min=1, K_max=1)
    return steering(sub, torch.as_tensor(phi, dtype=torch.float64), theta, r)


# ---------------------------------------------------------------------------------------------
# Input checks
def _check_covariance(R: torch.Tensor, system: SystemConfig, name: str = "R") -> torch.Tensor:
    """A complex [B,N,N] Hermitian batch with N = system.N ([N,N] is promoted to [1,N,N])."""
    if not isinstance(R, torch.Tensor):
        raise ConfigError(f"{name}: expected a torch.Tensor [B, N, N], got {type(R).__name__}")
    if R.ndim == 2:
        R = R[None]
    N = system.N
    if R.ndim != 3 or R.shape[-2:] != (N, N):
        raise ConfigError(f"{name}: expected shape [B, {N}, {N}] (N = system.N), got {tuple(R.shape)}")
    if not R.is_complex():
        R = R.to(torch.complex128 if R.dtype == torch.float64 else torch.complex64)
    if not torch.isfinite(torch.view_as_real(R)).all():
        raise ConfigError(f"{name}: contains NaN or inf")
    rtol = 1e-4 if R.dtype == torch.complex64 else 1e-10
    asym = torch.linalg.matrix_norm(R - R.mH)
    scale = torch.linalg.matrix_norm(R)
    bad = asym > rtol * scale + torch.finfo(scale.dtype).tiny
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ConfigError(
            f"{name}[{i}] is not Hermitian: ||R - R^H||_F / ||R||_F = {(asym[i] / scale[i]).item():.3g} > {rtol:g}; "
            "pass a covariance (workbench.covariance.hermitise if it is one up to rounding)"
        )
    return R


def _check_K(K, B: int, N: int, device) -> torch.Tensor:
    """Number of sources per scene, int or [B] -> [B] int64 in [0, N-1]."""
    K = torch.as_tensor(K, device=device)
    if K.is_floating_point() or K.is_complex() or K.dtype == torch.bool:
        raise ConfigError(f"K: expected integers, got dtype {K.dtype}")
    K = K.to(torch.int64).reshape(-1)
    if K.numel() == 1:
        K = K.expand(B)
    if K.numel() != B:
        raise ConfigError(f"K: expected an int or one value per scene ({B}), got {K.numel()} values")
    if (K < 0).any() or (K > N - 1).any():
        raise ConfigError(f"K = {K.tolist()} is out of range: allowed [0, N - 1 = {N - 1}] (a subspace method needs a noise subspace)")
    return K.clone()


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not allowed: choose one of {', '.join(map(repr, choices))}")


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


def _grid_quadratic(F: torch.Tensor, system: SystemConfig, grid: Grid, max_bytes: int = 2**23) -> torch.Tensor:
    """sum_j |f_j^H a(g)|^2 = a(g)^H F F^H a(g) over the grid, [B,P,T,Q] real (float32 for complex64 F).

    Two separable evaluations (module docstring), the cheaper one by operation count, in chunks of scenes
    whose largest intermediate stays under ``max_bytes``:
    * columns (few columns, MUSIC): contract v with a_z, then h with a_x: J (N T Q + N_H P T Q) MACs;
    * quadratic form (MVDR, J = N): M_tq = (a_z^H (x) I) F F^H (a_z (x) I), an N_H x N_H matrix per (t, q),
      then a_x^H M_tq a_x: N^2 T Q + N_H^2 P T Q MACs (about 40 times fewer than J N P T Q)."""
    B, N, J = F.shape
    N_H, N_V = system.N_H, system.N_V
    rdtype = torch.float32 if F.dtype == torch.complex64 else torch.float64
    ax, az = grid.factors(system, device=F.device, dtype=F.dtype)
    P, T, Q = grid.shape
    axT = ax.permute(1, 2, 3, 0)  # [T,Q,N_H,P]
    item = torch.empty((), dtype=F.dtype).element_size()
    columns = J * (N * T * Q + N_H * P * T * Q) <= N * N * T * Q + N_H * N_H * P * T * Q
    out = torch.empty(B, P, T, Q, dtype=rdtype, device=F.device)
    per_scene = item * P * T * Q * (J if columns else N_H)
    bc = max(1, max_bytes // per_scene)
    for b in range(0, B, bc):
        Fb = F[b : b + bc]
        n = Fb.shape[0]
        if columns:
            W = torch.einsum("bvhj,tqv->tqbjh", Fb.conj().reshape(n, N_V, N_H, J), az).reshape(T, Q, n * J, N_H)
            Z = torch.view_as_real(W @ axT).square().sum(-1).reshape(T, Q, n, J, P).sum(3)  # [T,Q,n,P]
            out[b : b + bc] = Z.permute(2, 3, 0, 1)
        else:
            Qm = (Fb @ Fb.mH).reshape(n, N_V, N_H, N_V, N_H)
            M = torch.einsum("tqv,bvhwk,tqw->btqhk", az.conj(), Qm, az)  # [n,T,Q,N_H,N_H]
            X = M @ axT  # [n,T,Q,N_H,P]
            out[b : b + bc] = (axT.conj() * X).sum(-2).real.permute(0, 3, 1, 2)
    return out


def spectrum(
    R: torch.Tensor, system: SystemConfig, grid: Grid | None = None, method: str = "music", K=None, loading: float = 1e-3
) -> torch.Tensor:
    """Near-field MUSIC or MVDR pseudo-spectrum over ``grid`` (default :meth:`Grid.default`).

    R [B,N,N] (or [N,N]) complex Hermitian: R_true, R_samp, R_pred, R_blend, in any units.
    * ``music``: 1 / (1 - ||E_s^H a||^2), E_s the eigenvectors of the K largest eigenvalues (K int or [B],
      required); a has unit norm, so this equals 1 / ||E_n^H a||^2 with the noise subspace, cheaper.
      The denominator is floored at the dtype's eps (the peak of a noise-free R_true is then 1/eps).
    * ``mvdr``: 1 / (a^H (R_+ + delta I)^-1 a), R_+ = R with negative eigenvalues clipped to 0, diagonal
      loading delta = ``loading`` * tr(R_+)/N (relative to the mean eigenvalue; 1e-3 by default), so it
      is finite for a rank-deficient R_true and in the units of R.
    Returns [B,P,T,Q], float32 for complex64 input and float64 for complex128 input, on R's device.
    """
    _check_choice("method", method, METHODS)
    R = _check_covariance(R, system)
    grid = Grid.default(system) if grid is None else grid
    grid.validate(system)
    if method == "music":
        if K is None:
            raise ConfigError("K: MUSIC needs the number of sources per scene (or use localise(..., K=None) to estimate it)")
        K = _check_K(K, R.shape[0], system.N, R.device)
    F = _projector_factor(R, method, K, loading).to(R.dtype)
    q = _grid_quadratic(F, system, grid)
    if method == "music":
        return 1.0 / (1.0 - q).clamp_min(torch.finfo(q.dtype).eps)
    return 1.0 / q.clamp_min(torch.finfo(q.dtype).tiny)


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
    P, T, Q = grid.shape
    pooled = nnf.max_pool3d(spec[:, None], kernel_size=3, stride=1, padding=1)[:, 0]
    vals = torch.where(spec >= pooled, spec, torch.full_like(spec, -math.inf)).reshape(B, -1)
    kp = min(max(int(K.max()) if K.numel() else 1, 1), vals.shape[1])
    value, flat = vals.topk(kp, dim=1)
    valid = (torch.arange(kp, device=spec.device)[None, :] < K[:, None]) & torch.isfinite(value)
    idx = torch.stack((flat // (T * Q), (flat // Q) % T, flat % Q), dim=-1)
    return idx, value, valid


def _objective(F: torch.Tensor, system: SystemConfig, u: torch.Tensor, scale: torch.Tensor, method: str) -> torch.Tensor:
    """Spectrum denominator at scaled points u [B,Kp,3] (phi, theta, 1/r over their grid steps): [B,Kp]."""
    x = u * scale
    a = steering(system, x[..., 0], x[..., 1], 1.0 / x[..., 2])  # [B,Kp,N] complex128
    q = torch.view_as_real(torch.einsum("bnj,bkn->bkj", F.conj(), a)).square().sum((-1, -2))
    return 1.0 - q if method == "music" else q


def refine_peaks(
    F: torch.Tensor, system: SystemConfig, grid: Grid, phi, theta, r, valid, method: str, iters: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-grid refinement: damped Newton (Levenberg-Marquardt) on the continuous spectrum denominator.

    F [B,N,J] from the spectrum's eigen-decomposition; phi, theta, r [B,Kp] start points (grid peaks).
    Works in (phi, theta, 1/r) scaled by the grid steps, float64, with the gradient and Hessian by
    autograd through ``steering``; a step is at most one grid cell, is kept only when it lowers the
    denominator, and stays inside the field of view. Returns refined (phi, theta, r) [B,Kp] float64."""
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
        uu = u.detach().requires_grad_(True)
        f = _objective(F, system, uu, scale, method)
        (g,) = torch.autograd.grad(f.sum(), uu, create_graph=True)
        Hs = torch.stack([torch.autograd.grad(g[..., i].sum(), uu, retain_graph=True)[0] for i in range(3)], -2).detach()
        g, f = g.detach(), f.detach()
        damp = mu * Hs.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-30)
        step = -torch.linalg.solve(Hs + damp[..., None, None] * eye, g[..., None])[..., 0]
        step = torch.nan_to_num(step) / step.norm(dim=-1, keepdim=True).clamp_min(1.0)
        u_new = torch.minimum(torch.maximum(u + step, lo), hi)
        with torch.no_grad():
            f_new = _objective(F, system, u_new, scale, method)
        ok = (f_new < f) & valid
        u = torch.where(ok[..., None], u_new, u)
        mu = torch.where(ok, mu * 0.3, mu * 10.0).clamp(1e-12, 1e12)
    x = u.detach() * scale
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
    iters: int = 10,
) -> Localisation:
    """Locate sources: spectrum over the grid, the K largest local maxima, sub-grid refinement.

    R [B,N,N] complex Hermitian; K an int or [B] ints in [0, N-1], or None to estimate it per scene by
    ``k_method`` ("mdl" | "aic", :func:`count_sources`, with ``n_snapshots`` defaulting to system.L and the
    count capped at system.K_max). ``loading`` is MVDR's relative diagonal loading (see :func:`spectrum`).
    """
    _check_choice("method", method, METHODS)
    R = _check_covariance(R, system)
    grid = Grid.default(system) if grid is None else grid
    grid.validate(system)
    if K is None:
        K = count_sources(R, system.L if n_snapshots is None else n_snapshots, k_method, k_max=system.K_max)
    K = _check_K(K, R.shape[0], system.N, R.device)
    F = _projector_factor(R, method, K, loading)
    q = _grid_quadratic(F.to(R.dtype), system, grid)
    spec = 1.0 / (1.0 - q).clamp_min(torch.finfo(q.dtype).eps) if method == "music" else 1.0 / q.clamp_min(torch.finfo(q.dtype).tiny)
    idx, value, valid = find_peaks(spec, grid, K)
    gphi, gth, gr = (ax.to(R.device)[idx[..., i]] for i, ax in enumerate((grid.phi, grid.theta, grid.r)))
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
    _check_choice("count method", method, COUNT_METHODS)
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


# ---------------------------------------------------------------------------------------------
# Cramer-Rao bound
def fisher_information(
    system: SystemConfig, H, codes, phi, theta, r, power, noise_var, mask=None, nuisance: bool = True
) -> torch.Tensor:
    """Fisher information of the stochastic measurement model, [B,P,P] float64 (Slepian-Bangs).

    Model: y_l ~ CN(0, C_l), C_l = G_l R G_l^H + sigma^2 I_M, G_l = H diag(c_l), R = sum_k p_k a_k a_k^H,
    l = 1..L independent (i.i.d. symbols, one snapshot per RIS configuration), and
        F_ij = sum_l Re tr(C_l^-1 dC_l/dth_i C_l^-1 dC_l/dth_j).
    H [B,M,N], codes [B,L,N] complex; phi, theta [B,K] rad, r [B,K] m, power [B,K] mW, noise_var [B]
    (per complex entry), mask [B,K] bool (None: all real). Parameters, in this order: (phi_k, theta_k,
    r_k) for k = 1..K (index 3k + c), then, when ``nuisance``, the powers p_1..p_K and sigma^2 (P = 4K+1;
    otherwise P = 3K and the powers and noise variance are known). Steering derivatives by forward-mode
    autograd through ``steering``. Padded sources get an identity block (decoupled, ignored).
    """
    dev = H.device
    c128, f64 = torch.complex128, torch.float64
    H, codes = H.to(c128), codes.to(c128)
    phi, theta, r, power = (torch.as_tensor(t, device=dev).to(f64) for t in (phi, theta, r, power))
    mask = torch.ones_like(phi, dtype=torch.bool) if mask is None else mask.to(dev)
    noise_var = torch.as_tensor(noise_var, device=dev).to(f64).reshape(-1)
    B, K = phi.shape
    r = torch.where(mask, r, torch.ones_like(r))
    p = power * mask
    A = steering(system, phi, theta, r)
    primals = (phi, theta, r)
    tangents = [tuple(torch.ones_like(x) if j == i else torch.zeros_like(x) for j, x in enumerate(primals)) for i in range(3)]
    D = torch.stack(
        [torch.func.jvp(lambda *x: steering(system, *x), primals, t)[1] for t in tangents],
        dim=2,
    )  # [B,K,3,N]
    G = measurement_matrices(H, codes)  # [B,L,M,N]
    L, M = G.shape[1], G.shape[2]
    b = torch.einsum("blmn,bkn->blkm", G, A)
    db = torch.einsum("blmn,bkcn->blkcm", G, D)
    eye = torch.eye(M, dtype=c128, device=dev)
    C = torch.einsum("bk,blkm,blkn->blmn", p.to(c128), b, b.conj()) + noise_var.to(c128)[:, None, None, None] * eye
    outer = db[..., :, None] * b.conj()[:, :, :, None, None, :]  # [B,L,K,3,M,M]
    dC = (p.to(c128)[:, None, :, None, None, None] * (outer + outer.mH)).permute(0, 2, 3, 1, 4, 5).reshape(B, 3 * K, L, M, M)
    pmask = mask.repeat_interleave(3, dim=1)
    if nuisance:
        dP = (b[..., :, None] * b.conj()[..., None, :] * mask[:, None, :, None, None]).permute(0, 2, 1, 3, 4)  # [B,K,L,M,M]
        dS = eye.expand(B, 1, L, M, M)
        dC = torch.cat((dC, dP, dS), dim=1)
        pmask = torch.cat((pmask, mask, torch.ones(B, 1, dtype=torch.bool, device=dev)), dim=1)
    W = torch.linalg.solve(C[:, None], dC)  # C^-1 dC, [B,P,L,M,M]
    Fim = torch.einsum("bilxy,bjlyx->bij", W, W).real
    return Fim + torch.diag_embed((~pmask).to(f64))


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


# ---------------------------------------------------------------------------------------------
# Matching metrics
DEFAULT_TOLERANCES = {"phi_deg": 5.0, "theta_deg": 5.0, "r_m": 1.0}


def _tolerances(tol: dict | None) -> np.ndarray:
    t = {**DEFAULT_TOLERANCES, **(tol or {})}
    unknown = sorted(set(t) - set(DEFAULT_TOLERANCES))
    if unknown:
        raise ConfigError(f"tolerances: unknown key(s) {unknown}; allowed: {sorted(DEFAULT_TOLERANCES)}")
    for k, v in t.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"tolerances.{k} = {v!r}: expected a number > 0")
    return np.array([math.radians(t["phi_deg"]), math.radians(t["theta_deg"]), t["r_m"]])


def match(pred: np.ndarray, true: np.ndarray, tolerances: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of predicted to true sources.

    pred [P,3], true [T,3]: rows (phi rad, theta rad, r m). The cost is the Euclidean norm of the errors
    divided by the tolerances (so the three units are comparable). Rectangular problems keep every
    possible pair: min(P, T) matches, nothing dropped; P or T = 0 gives no match.
    Returns (pred_idx, true_idx), int arrays of length min(P, T).
    """
    pred, true = np.asarray(pred, dtype=np.float64).reshape(-1, 3), np.asarray(true, dtype=np.float64).reshape(-1, 3)
    if len(pred) == 0 or len(true) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    scale = _tolerances(tolerances)
    cost = np.linalg.norm((pred[:, None, :] - true[None, :, :]) / scale, axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def _rows(phi, theta, r, mask, b: int) -> np.ndarray:
    m = np.asarray(mask[b], dtype=bool)
    return np.stack([np.asarray(phi[b], dtype=np.float64)[m], np.asarray(theta[b], dtype=np.float64)[m], np.asarray(r[b], dtype=np.float64)[m]], -1)


def match_metrics(est: Localisation, true_phi, true_theta, true_r, true_mask, tolerances: dict | None = None) -> dict[str, float]:
    """Detection and accuracy metrics over a batch, plain floats.

    A Hungarian pair is a detection (true positive) when |dphi| <= tol_phi, |dtheta| <= tol_theta and
    |dr| <= tol_r (defaults 5 deg, 5 deg, 1 m; ``tolerances`` dict with keys phi_deg, theta_deg, r_m).
    precision = TP / predicted, recall = TP / true, F1 = 2 TP / (predicted + true), each 1.0 when its
    denominator is 0. RMSE of phi, theta (degrees) and r (metres) over *all* Hungarian pairs (detected
    or not; NaN when there is none), so gross errors count. k_accuracy: fraction of scenes whose
    number of detected sources equals the true K.
    """
    tol = _tolerances(tolerances)
    to_np = lambda t: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)  # noqa: E731
    ep, et, er, em = (to_np(t) for t in (est.phi, est.theta, est.r, est.mask))
    tp_, tt_, tr_, tm_ = (to_np(t) for t in (true_phi, true_theta, true_r, true_mask))
    tp = n_pred = n_true = k_ok = 0
    sq = []
    for b in range(len(em)):
        pred, true = _rows(ep, et, er, em, b), _rows(tp_, tt_, tr_, tm_, b)
        n_pred, n_true, k_ok = n_pred + len(pred), n_true + len(true), k_ok + int(len(pred) == len(true))
        i, j = match(pred, true, tolerances)
        err = np.abs(pred[i] - true[j])
        tp += int((err <= tol).all(-1).sum())
        sq.append(err**2)
    sq = np.concatenate(sq) if sq else np.zeros((0, 3))
    rmse = np.sqrt(sq.mean(0)) if len(sq) else np.full(3, math.nan)
    return {
        "tp": float(tp),
        "n_pred": float(n_pred),
        "n_true": float(n_true),
        "precision": tp / n_pred if n_pred else 1.0,
        "recall": tp / n_true if n_true else 1.0,
        "f1": 2 * tp / (n_pred + n_true) if n_pred + n_true else 1.0,
        "rmse_phi_deg": float(np.degrees(rmse[0])),
        "rmse_theta_deg": float(np.degrees(rmse[1])),
        "rmse_r_m": float(rmse[2]),
        "n_matched": float(len(sq)),
        "k_accuracy": k_ok / len(em) if len(em) else math.nan,
    }


# ---------------------------------------------------------------------------------------------
# Evaluation for the notebook
def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def localisation_vs_snr(
    system: SystemConfig,
    snrs_db: Sequence[float],
    n_per_snr: int,
    covariances: dict[str, Callable[[SceneBatch], torch.Tensor]],
    method: str = "music",
    seed: int = 0,
    grid: Grid | None = None,
    use_true_k: bool = True,
    k_method: str = "mdl",
    n_snapshots: int | None = None,
    tolerances: dict | None = None,
    nuisance: bool = True,
    device: str = "cpu",
) -> dict:
    """RMSE, detection and counting versus SNR for several covariance sources, with sqrt(CRB).

    For each SNR s: ``n_per_snr`` scenes from ``simulate(system with snr fixed at s, seed + i)``; for each
    name, R = covariances[name](batch) [n,N,N] (e.g. ``lambda b: b.R_true``, an R_samp estimator, a
    model's R_pred) is localised by ``method`` with the true K (``use_true_k``) or the K counted by
    ``k_method``, and matched to the truth (:func:`match_metrics`). ``k_accuracy`` always scores the count
    of ``k_method`` (``n_snapshots`` default system.L, capped at system.K_max) against the true K.
    sqrt_crb: sqrt of the CRB averaged over all sources at that SNR (comparable to the RMSE over sources).
    Returns plain lists/floats (NaN as None), ready for json.dump:
    {"snr_db", "method", "n_per_snr", "tolerances", "sqrt_crb": {"phi_deg", "theta_deg", "r_m"},
     "covariances": {name: {"rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "precision", "recall", "f1",
     "k_accuracy"}}}, each a list over snrs_db.
    """
    _check_choice("method", method, METHODS)
    _check_choice("k_method", k_method, COUNT_METHODS)
    if isinstance(n_per_snr, bool) or not isinstance(n_per_snr, int) or n_per_snr < 1:
        raise ConfigError(f"n_per_snr = {n_per_snr!r}: expected an integer >= 1")
    if not covariances:
        raise ConfigError("covariances: expected at least one name -> callable(batch) -> R")
    _tolerances(tolerances)
    grid = Grid.default(system) if grid is None else grid
    grid.validate(system)
    n_snap = system.L if n_snapshots is None else n_snapshots
    dev = resolve_device(device)
    keys = ("rmse_phi_deg", "rmse_theta_deg", "rmse_r_m", "precision", "recall", "f1", "k_accuracy")
    res = {name: {k: [] for k in keys} for name in covariances}
    bound = {"phi_deg": [], "theta_deg": [], "r_m": []}
    for i, snr in enumerate(snrs_db):
        sys_s = system.replace(snr_db_min=float(snr), snr_db_max=float(snr))
        batch = simulate(sys_s, n_per_snr, seed=seed + i, device=dev)
        c = crb_for(batch, sys_s, nuisance)[batch.mask]  # [sources, 3]
        rms = c.mean(0).sqrt().cpu().tolist()
        bound["phi_deg"].append(_json_float(math.degrees(rms[0])))
        bound["theta_deg"].append(_json_float(math.degrees(rms[1])))
        bound["r_m"].append(_json_float(rms[2]))
        for name, fn in covariances.items():
            R = fn(batch)
            k_hat = count_sources(_check_covariance(R, sys_s, name), n_snap, k_method, k_max=system.K_max)
            est = localise(R, sys_s, grid, method, K=batch.K if use_true_k else k_hat)
            m = match_metrics(est, batch.phi, batch.theta, batch.r, batch.mask, tolerances)
            m["k_accuracy"] = (k_hat.cpu() == batch.K.cpu()).double().mean().item()
            for k in keys:
                res[name][k].append(_json_float(m[k]))
    return {
        "snr_db": [float(s) for s in snrs_db],
        "method": method,
        "n_per_snr": n_per_snr,
        "tolerances": {**DEFAULT_TOLERANCES, **(tolerances or {})},
        "sqrt_crb": bound,
        "covariances": res,
    }
