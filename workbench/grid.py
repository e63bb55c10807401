"""The one near-field search grid over (phi, theta, r), used by the beamscan R_samp estimator and by MUSIC/MVDR.

Owns: the grid's points, its separable steering tables and the two contractions every grid search needs.
Must not: estimate, pick peaks or localise (that is :mod:`workbench.covariance` and :mod:`workbench.localisation`).

Separable steering: the grid is an *estimator's* model. The separable phase of element i = v N_H + h
(:func:`~workbench.physics.steering` with ``model="separable"``: the Fresnel form without its (p.u)^2 term) splits
into a row part and a column part, phase = k0 [x_h sin(phi) cos(theta) - x_h^2/(2r)] + k0 [z_v sin(theta) - z_v^2/(2r)],
so a(phi, theta, r) = kron(a_z(theta, r), a_x(phi, theta, r)), and both factors are the separable steering of the
N_H x 1 and 1 x N_V sub-arrays. The exact spherical wave does not factor this way; a grid scan with these tables is
therefore a separable-model estimate, which the callers refine with the system's own model (MUSIC's and the ML fit's
refinement) or accept as a declared approximation (beamscan).

Contractions, for P x T x Q grid points and vectors of length N = N_H N_V:

* :meth:`Grid.response`: sum_n X[..., n] a_g[n] for every grid point g. Contracting v with a_z first costs
  N T Q + N_H P T Q complex MACs per vector instead of N P T Q with the full steering table.
  |a_g^H x|^2 = |response(conj x)|^2, and G_l a_g = response(G_l) row by row.
* :meth:`Grid.quadratic`: a_g^H Q a_g for Hermitian Q [B,N,N] with one N_H x N_H matrix per (theta, r):
  N^2 T Q + N_H^2 P T Q MACs (MVDR's form, about 40 times fewer than N^2 P T Q).

The tables take P T Q N_H + T Q N_V entries instead of P T Q N (:meth:`Grid.memory_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import ConfigError, SystemConfig
from .physics import steering


@dataclass(frozen=True, eq=False)
class Grid:
    """A search grid over the field of view.

    phi [P], theta [T] (radians) and r [Q] (metres): 1-D float64 CPU tensors, strictly increasing. Values over
    the grid have shape [..., P, T, Q]. Build with :meth:`default` or :meth:`uniform`; a grid from raw tensors
    is checked against a system by :meth:`validate` (every user calls it). The steering tables are cached on
    the grid object per (geometry, device, dtype).
    """

    phi: torch.Tensor
    theta: torch.Tensor
    r: torch.Tensor
    _tables: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("phi", "theta", "r"):
            t = torch.as_tensor(getattr(self, name), dtype=torch.float64).detach().cpu().reshape(-1)
            if t.numel() == 0 or not torch.isfinite(t).all():
                raise ConfigError(f"grid.{name}: expected a non-empty 1-D array of finite values, got {t.tolist()}")
            if t.numel() > 1 and not (t[1:] > t[:-1]).all():
                raise ConfigError(f"grid.{name}: values must be strictly increasing")
            object.__setattr__(self, name, t)

    # -- construction -------------------------------------------------------------------------
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

    # -- geometry -----------------------------------------------------------------------------
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

    def unravel(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat indices into [P,T,Q] -> [..., 3] int64 grid indices (p, t, q)."""
        _, T, Q = self.shape
        return torch.stack((flat // (T * Q), (flat // Q) % T, flat % Q), dim=-1)

    def coords(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(phi, theta, r) [...] float64 of grid indices idx [..., 3] (p, t, q), on idx's device."""
        dev = idx.device
        return self.phi.to(dev)[idx[..., 0]], self.theta.to(dev)[idx[..., 1]], self.r.to(dev)[idx[..., 2]]

    def fractional_index(self, phi: torch.Tensor, theta: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Continuous grid indices [..., 3] float64 (p, t, q) of points phi, theta [...] rad and r [...] m, for a grid
        uniform in phi, theta and 1/r (as :meth:`uniform` builds it): p = (phi - phi_0) / step_phi, t likewise and
        q = (1/r_0 - 1/r) / step_(1/r) (r increases with q). A grid point gives its own integer index; points between
        grid points give fractions, points outside the grid indices below 0 or above n - 1. Inverse:
        :meth:`from_fractional`."""
        st = self.steps().tolist()
        phi, theta, r = (torch.as_tensor(t).to(torch.float64) for t in (phi, theta, r))
        return torch.stack(((phi - float(self.phi[0])) / st[0], (theta - float(self.theta[0])) / st[1],
                            (1.0 / float(self.r[0]) - 1.0 / r) / st[2]), -1)

    def from_fractional(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(phi, theta, r) [...] of continuous grid indices idx [..., 3] (:meth:`fractional_index`'s inverse), idx's
        dtype (differentiable in idx): linear in phi, theta and 1/r."""
        st = self.steps().tolist()
        phi = float(self.phi[0]) + idx[..., 0] * st[0]
        theta = float(self.theta[0]) + idx[..., 1] * st[1]
        return phi, theta, 1.0 / (1.0 / float(self.r[0]) - idx[..., 2] * st[2])

    def memory_bytes(self, system: SystemConfig, dtype: torch.dtype = torch.complex64) -> dict[str, int]:
        """Bytes of the separable steering tables, of a full [P,T,Q,N] table, and of one real spectrum."""
        item = torch.empty((), dtype=dtype).element_size()
        P, T, Q = self.shape
        return {
            "separable": item * (P * T * Q * system.N_H + T * Q * system.N_V),
            "full": item * P * T * Q * system.N,
            "spectrum_per_scene": (item // 2) * P * T * Q,
        }

    # -- steering tables ----------------------------------------------------------------------
    def factors(self, system: SystemConfig, device=None, dtype: torch.dtype = torch.complex64) -> tuple[torch.Tensor, torch.Tensor]:
        """Separable steering tables a_x [P,T,Q,N_H] and a_z [T,Q,N_V] (cached per geometry/device/dtype),
        with a(phi_p, theta_t, r_q)[v N_H + h] = a_z[t,q,v] a_x[p,t,q,h]."""
        key = (system.N_H, system.N_V, system.carrier_hz, system.spacing_wavelengths, str(device), dtype)
        if key not in self._tables:
            self.validate(system)
            ph, th, r = self.phi[:, None, None], self.theta[None, :, None], self.r[None, None, :]
            ax = _subarray_steering(system, system.N_H, 1, ph, th, r)  # [P,T,Q,N_H]
            az = _subarray_steering(system, 1, system.N_V, torch.zeros(()), th[0], r[0])  # [T,Q,N_V]
            self._tables[key] = (ax.to(device=device, dtype=dtype), az.to(device=device, dtype=dtype))
        return self._tables[key]

    def steering_table(self, system: SystemConfig, device=None, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
        """The full separable steering table [P,T,Q,N] straight from :func:`steering` (for checks and benchmarks)."""
        self.validate(system)
        a = steering(system, self.phi[:, None, None], self.theta[None, :, None], self.r[None, None, :], model="separable")
        return a.to(device=device, dtype=dtype)

    def vectors(self, system: SystemConfig, idx: torch.Tensor, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
        """Steering vectors [..., N] of grid indices idx [..., 3] (p, t, q), from the separable tables."""
        ax, az = self.factors(system, idx.device, dtype)
        p, t, q = idx[..., 0], idx[..., 1], idx[..., 2]
        return (az[t, q][..., :, None] * ax[p, t, q][..., None, :]).reshape(*idx.shape[:-1], system.N)

    # -- contractions -------------------------------------------------------------------------
    def response(self, system: SystemConfig, X: torch.Tensor, max_bytes: int = 2**26) -> torch.Tensor:
        """sum_n X[..., n] a_g[n] for every grid point g: X [..., N] complex -> [..., P, T, Q] (X's dtype).

        Separable (module docstring); the leading dimensions are processed in chunks whose largest
        intermediate stays under ``max_bytes``."""
        N_H, N_V = system.N_H, system.N_V
        if X.shape[-1] != N_H * N_V:
            raise ConfigError(f"X: expected vectors of length N = {N_H * N_V} (system.N), got shape {tuple(X.shape)}")
        ax, az = self.factors(system, X.device, X.dtype)
        P, T, Q = self.shape
        lead = X.shape[:-1]
        flat = X.reshape(-1, N_V, N_H)
        axT = ax.permute(1, 2, 3, 0).reshape(T * Q, N_H, P)  # [TQ,N_H,P]
        azT = az.reshape(T * Q, N_V)
        out = torch.empty(flat.shape[0], P, T, Q, dtype=X.dtype, device=X.device)
        per_vector = X.element_size() * T * Q * (N_H + P)
        step = max(1, max_bytes // per_vector)
        for s in range(0, flat.shape[0], step):
            Xs = flat[s:s + step]
            W = torch.einsum("nvh,gv->gnh", Xs, azT)  # [TQ,n,N_H]
            out[s:s + step] = torch.bmm(W, axT).reshape(T, Q, -1, P).permute(2, 3, 0, 1)
        return out.reshape(*lead, P, T, Q)

    def quadratic(self, system: SystemConfig, Qm: torch.Tensor, max_bytes: int = 2**26) -> torch.Tensor:
        """Re a_g^H Qm a_g for every grid point g: Qm [B,N,N] Hermitian -> [B,P,T,Q] real (float32 for complex64).

        One N_H x N_H matrix M_tq = (a_z^H (x) I) Qm (a_z (x) I) per (theta, r), then a_x^H M_tq a_x."""
        N_H, N_V = system.N_H, system.N_V
        ax, az = self.factors(system, Qm.device, Qm.dtype)
        P, T, Q = self.shape
        axT = ax.permute(1, 2, 3, 0)  # [T,Q,N_H,P]
        B = Qm.shape[0]
        out = torch.empty(B, P, T, Q, dtype=Qm.real.dtype, device=Qm.device)
        step = max(1, max_bytes // (Qm.element_size() * T * Q * N_H * max(N_H, P)))
        for s in range(0, B, step):
            n = Qm[s:s + step].shape[0]
            Qs = Qm[s:s + step].reshape(n, N_V, N_H, N_V, N_H)
            M = torch.einsum("tqv,bvhwk,tqw->btqhk", az.conj(), Qs, az)  # [n,T,Q,N_H,N_H]
            out[s:s + step] = (axT.conj() * (M @ axT)).sum(-2).real.permute(0, 3, 1, 2)
        return out


def _subarray_steering(system: SystemConfig, n_h: int, n_v: int, phi, theta, r) -> torch.Tensor:
    """Separable ``steering`` of the n_h x n_v sub-array that shares the system's row (n_v = 1) or column (n_h = 1)
    coordinates: the sub-array sits at z = 0 (resp. x = 0), which drops the other half of the phase."""
    n = n_h * n_v
    if n == 1:
        shape = torch.broadcast_shapes(torch.as_tensor(phi).shape, torch.as_tensor(theta).shape, torch.as_tensor(r).shape)
        return torch.ones(*shape, 1, dtype=torch.complex128)
    sub = system.replace(N_H=n_h, N_V=n_v, K_min=1, K_max=1)
    return steering(sub, torch.as_tensor(phi, dtype=torch.float64), theta, r, model="separable")
