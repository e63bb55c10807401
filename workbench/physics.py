"""The simulated RIS measurement model: geometry, the one steering function, codebook, channel, ``simulate``.

Owns: element positions, :func:`steering` (the spherical wave and its two approximations) and its closed-form
derivatives (:func:`steering_derivatives`), the RIS codebook, the
BS-RIS channel, the snapshots of a scene and :func:`scene_seed`. Must not: estimate, localise or train.

Geometry: an N_H x N_V uniform planar RIS in the x-z plane, centred at the origin, element spacing d.
Element i = v * N_H + h sits at p_i = (x_i, 0, z_i) = ((h - (N_H-1)/2) d, 0, (v - (N_V-1)/2) d) metres.
A source at azimuth phi, elevation theta (radians) and range r (metres) sits at r u with
u = (sin phi cos theta, cos phi cos theta, sin theta). Its steering vector is a = exp(j phase) / sqrt(N) (unit
norm) with, by ``system.steering_model`` (docs/design.md, "Steering models"):

* ``exact`` (the physics; default): phase_i = k0 (r - |r u - p_i|), the spherical wave, referenced to the centre;
* ``fresnel``: its second-order expansion in 1/r, phase_i = k0 [p_i.u - (|p_i|^2 - (p_i.u)^2) / (2 r)];
* ``separable``: phase_i = k0 [x_i sin(phi) cos(theta) + z_i sin(theta) - (x_i^2 + z_i^2) / (2 r)]: the Fresnel
  form without the (p_i.u)^2 term. Exact only at broadside; it makes a gridded scan Kronecker-separable, so the
  grid searches (:mod:`workbench.grid`) use it as an *estimator's* model, never to simulate.

``r = inf`` gives the planar (far-field) vector k0 p_i.u under every model.

Snapshot l of a scene: y_l = H diag(c_l) x_l + n_l with
    x_l = sum_k sqrt(p_k) a_k s_{k,l},     p_k = P_tx (lambda / (4 pi r_k))^2   (milliwatts)
    H = sqrt(PL_BR) [sqrt(kappa/(1+kappa)) H_LoS + sqrt(1/(1+kappa)) H_NLoS],  M x N,
H_LoS the outer product of unit-modulus BS and RIS array responses, H_NLoS i.i.d. CN(0, 1): both parts
have unit energy per entry before the BS-RIS path loss PL_BR = (lambda / (4 pi d_BR))^2. The noise is
CN(0, sigma^2 I) with sigma^2 = (1/(L M)) sum_l E||H diag(c_l) x_l||^2 / 10^(SNR/10), the expectation
taken over the symbols, so the per-scene SNR is the ratio of mean signal to mean noise power at the BS.

Everything is raw physical units (covariances in mW with Frobenius norms around 1e-4): no gain fudge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .config import STEERING_MODELS, ConfigError, SystemConfig, check_choice, resolve_device


def element_positions(system: SystemConfig, dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RIS element coordinates (x [N], z [N]) in metres, element i = v * N_H + h."""
    d = system.spacing_m
    h = torch.arange(system.N_H, dtype=dtype, device=device) - (system.N_H - 1) / 2
    v = torch.arange(system.N_V, dtype=dtype, device=device) - (system.N_V - 1) / 2
    x = (h[None, :] * d).expand(system.N_V, system.N_H).reshape(-1)
    z = (v[:, None] * d).expand(system.N_V, system.N_H).reshape(-1)
    return x, z


def steering(system: SystemConfig, phi: torch.Tensor, theta: torch.Tensor, r: torch.Tensor | float, model: str | None = None) -> torch.Tensor:
    """RIS steering vectors, unit norm, under ``model`` (default ``system.steering_model``; module docstring).

    phi, theta: azimuth and elevation in radians, any broadcastable shape [...]; r: range in metres
    (``float('inf')`` for the planar wave). Returns [..., N], complex64 for float32 input and complex128
    for float64 input. Differentiable in phi, theta and r.
    """
    model = system.steering_model if model is None else model
    check_choice("steering model", model, STEERING_MODELS)
    phi = torch.as_tensor(phi)
    if not phi.is_floating_point():
        phi = phi.to(torch.get_default_dtype())
    theta = torch.as_tensor(theta, dtype=phi.dtype, device=phi.device)
    r = torch.as_tensor(r, dtype=phi.dtype, device=phi.device)
    x, z = element_positions(system, dtype=phi.dtype, device=phi.device)
    phi, theta, r = (t[..., None] for t in torch.broadcast_tensors(phi, theta, r))
    pu = x * torch.sin(phi) * torch.cos(theta) + z * torch.sin(theta)  # p.u
    phase = _phase(model, pu, x * x + z * z, 1.0 / r)
    return torch.polar(torch.full_like(phase, 1.0 / math.sqrt(system.N)), system.k0 * phase)


def _phase(model: str, pu: torch.Tensor, pp: torch.Tensor, inv_r: torch.Tensor) -> torch.Tensor:
    """The steering phase over k0 (metres) from p.u, |p|^2 and 1/r (broadcast), by steering model (module docstring)."""
    if model == "exact":
        # k0 (r - |r u - p|) = k0 (2 p.u - |p|^2 / r) / (1 + sqrt(1 - 2 p.u / r + |p|^2 / r^2)): no cancellation at large r,
        # and the planar k0 p.u at r = inf
        return (2 * pu - pp * inv_r) / (1 + torch.sqrt(1 - 2 * pu * inv_r + pp * inv_r * inv_r))
    if model == "fresnel":
        return pu - (pp - pu * pu) * (0.5 * inv_r)
    return pu - pp * (0.5 * inv_r)


def steering_derivatives(system: SystemConfig, phi: torch.Tensor, theta: torch.Tensor, inv_r: torch.Tensor,
                         model: str | None = None, second: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`steering` and its first and second derivatives in (phi, theta, 1/r), in closed form.

    phi, theta [...] radians, inv_r [...] 1/metres (0: planar), broadcastable, float64 (float32 gives complex64).
    Returns a [..., N], da [..., 3, N] and d2a [..., 3, 3, N] (symmetric in its two derivative axes; None unless
    ``second``). With a_n =
    exp(j k0 psi_n) / sqrt(N): da_i = j k0 psi_i a and d2a_ij = (j k0 psi_ij - k0^2 psi_i psi_j) a, where the phase's
    derivatives follow from p.u = x sin(phi) cos(theta) + z sin(theta). For the exact model, s = sqrt(1 - 2 w p.u +
    w^2 |p|^2) = 1 - w psi (w = 1/r) gives psi_phi = (p.u)_phi / s, psi_theta = (p.u)_theta / s and psi_w =
    (psi^2 - |p|^2) / (2 s), none singular at w = 0; each second derivative is d_j of (psi_i 2 s) = R_i over 2 s.
    The one place steering derivatives are formed (:func:`workbench.refinement.refine_peaks`, the likelihood's score
    and Fisher information in :mod:`workbench.likelihood`); tests/test_physics.py checks it against autograd through
    :func:`steering` for every model."""
    model = system.steering_model if model is None else model
    check_choice("steering model", model, STEERING_MODELS)
    theta = torch.as_tensor(theta, dtype=phi.dtype, device=phi.device)
    inv_r = torch.as_tensor(inv_r, dtype=phi.dtype, device=phi.device)
    x, z = element_positions(system, dtype=phi.dtype, device=phi.device)
    phi, theta, w = (t[..., None] for t in torch.broadcast_tensors(phi, theta, inv_r))
    sp, cp, st, ct = torch.sin(phi), torch.cos(phi), torch.sin(theta), torch.cos(theta)
    pu = x * sp * ct + z * st
    pp = x * x + z * z
    zero = torch.zeros_like(pu)
    d_pu = (x * cp * ct, z * ct - x * sp * st)  # d(p.u) / d(phi, theta); it does not depend on w
    dd_pu = ((-x * sp * ct, -x * cp * st), (-x * cp * st, -x * sp * ct - z * st))
    psi = _phase(model, pu, pp, w)
    a = torch.polar(torch.full_like(psi, 1.0 / math.sqrt(system.N)), system.k0 * psi)
    k0 = system.k0
    if model == "exact":
        s = 1 - w * psi
        d1 = [d_pu[0] / s, d_pu[1] / s, (psi * psi - pp) / (2 * s)]
        ds = [-w * d1[0], -w * d1[1], -psi - w * d1[2]]  # ds / d(phi, theta, w)
        dR = [[2 * dd_pu[0][0], 2 * dd_pu[0][1], zero], [2 * dd_pu[1][0], 2 * dd_pu[1][1], zero],
              [2 * psi * d1[0], 2 * psi * d1[1], 2 * psi * d1[2]]]  # d_j R_i, R = (2 pu_phi, 2 pu_theta, psi^2 - pp)
        d2 = [[(dR[i][j] - 2 * d1[i] * ds[j]) / (2 * s) for j in range(3)] for i in range(3)]
    elif model == "fresnel":
        g = 1 + pu * w
        d1 = [d_pu[0] * g, d_pu[1] * g, -(pp - pu * pu) / 2]
        d2 = [[dd_pu[i][j] * g + d_pu[i] * d_pu[j] * w for j in range(2)] + [d_pu[i] * pu] for i in range(2)]
        d2.append([d_pu[0] * pu, d_pu[1] * pu, zero])
    else:
        d1 = [d_pu[0], d_pu[1], -pp / 2 + zero]
        d2 = [[dd_pu[0][0], dd_pu[0][1], zero], [dd_pu[1][0], dd_pu[1][1], zero], [zero, zero, zero]]
    d1 = torch.stack(d1, -2)  # [..., 3, N]
    da = (1j * k0) * d1 * a[..., None, :]
    if not second:
        return a, da, None
    d2 = torch.stack([torch.stack(row, -2) for row in d2], -3)  # [..., 3, 3, N]
    d2a = (1j * k0 * d2 - k0 * k0 * d1[..., :, None, :] * d1[..., None, :, :]) * a[..., None, None, :]
    return a, da, d2a


def scene_seed(seed: int, *stream: int) -> int:
    """The simulate() seed of one stream of scenes: ``seed`` and the stream's indices (a split, an SNR index, a
    chunk) hashed by NumPy's SeedSequence into an independent 63-bit seed. The one rule every study, dataset and
    notebook uses to derive the seed of a set of scenes."""
    import numpy as np

    parts = [int(s) for s in stream]
    # the count first: SeedSequence treats trailing zeros as absent, so (seed, 3) and (seed, 3, 0) would coincide
    return int(np.random.SeedSequence([int(seed), len(parts), *parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def dft_codebook(system: SystemConfig, device=None) -> torch.Tensor:
    """2D DFT RIS codebook, phases quantised to ``phase_bits`` (0 = continuous). [N_codes = N, N] complex64."""
    h = torch.arange(system.N_H, dtype=torch.float64, device=device)
    v = torch.arange(system.N_V, dtype=torch.float64, device=device)
    p = torch.arange(system.N_H, dtype=torch.float64, device=device)
    q = torch.arange(system.N_V, dtype=torch.float64, device=device)
    # phase[p, q, v, h] = 2 pi (p h / N_H + q v / N_V)
    phase = 2 * math.pi * (p[:, None, None, None] * h / system.N_H + q[None, :, None, None] * v[:, None] / system.N_V)
    if system.phase_bits > 0:
        step = 2 * math.pi / 2**system.phase_bits
        phase = torch.round(phase / step) * step
    return torch.polar(torch.ones_like(phase), phase).reshape(system.N, system.N).to(torch.complex64)


def bs_ris_los(system: SystemConfig, device=None) -> torch.Tensor:
    """Unit-modulus line-of-sight BS-RIS channel [M, N] (far field between the two arrays)."""
    az, el = math.radians(system.bs_azimuth_deg), math.radians(system.bs_elevation_deg)
    m = torch.arange(system.M, dtype=torch.float64, device=device)
    b = torch.polar(torch.ones_like(m), math.pi * m * math.sin(az))  # half-wavelength ULA at the BS
    a = steering(system, torch.tensor(az, dtype=torch.float64), torch.tensor(el, dtype=torch.float64), math.inf)
    a = a.to(device) * math.sqrt(system.N)  # unit modulus entries
    return (b[:, None] * a.conj()[None, :]).to(torch.complex64)


def pathloss(system: SystemConfig, distance_m: torch.Tensor | float) -> torch.Tensor | float:
    """Free-space power gain (lambda / (4 pi d))^2."""
    return (system.wavelength_m / (4 * math.pi * distance_m)) ** 2


@dataclass
class SceneBatch:
    """A batch of simulated scenes. Shapes: n scenes, L snapshots, M antennas, N RIS elements.

    y [n,L,M] c64 received snapshots; signal [n,L,M] c64 their noise-free part; H [n,M,N] c64 BS-RIS
    channel; codes [n,L,N] c64 RIS configurations (unit modulus); R_true [n,N,N] c64 source covariance
    in mW; K [n] int64; phi, theta [n,K_max] radians, r [n,K_max] metres, power [n,K_max] mW received
    at the RIS, mask [n,K_max] bool (True for the K real sources, first K slots); snr_db [n];
    noise_var [n] (mW, per complex entry).
    """

    y: torch.Tensor
    signal: torch.Tensor
    H: torch.Tensor
    codes: torch.Tensor
    R_true: torch.Tensor
    K: torch.Tensor
    phi: torch.Tensor
    theta: torch.Tensor
    r: torch.Tensor
    power: torch.Tensor
    mask: torch.Tensor
    snr_db: torch.Tensor
    noise_var: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device) -> SceneBatch:
        """The batch on ``device``; ``self`` (with anything cached on it) when it is already there."""
        device = torch.device(device)
        if all(getattr(self, f.name).device == device for f in fields(self)):
            return self
        return SceneBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, idx) -> SceneBatch:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return SceneBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def cat(batches: list[SceneBatch]) -> SceneBatch:
        return SceneBatch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(SceneBatch)})

    @property
    def G(self) -> torch.Tensor:
        """Effective measurement matrices G_l = H diag(c_l), [n,L,M,N] (computed on demand)."""
        return measurement_matrices(self.H, self.codes)


def measurement_matrices(H: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """G_l = H diag(c_l): H [n,M,N], codes [n,L,N] -> [n,L,M,N]."""
    return H[:, None, :, :] * codes[:, :, None, :]


def _check_simulate_args(system: SystemConfig, n: int) -> None:
    if not isinstance(system, SystemConfig):
        raise ConfigError(f"system: expected a SystemConfig, got {type(system).__name__}")
    system.validate()  # a config mutated after construction is checked again here
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n = {n!r}: expected an integer >= 1 (number of scenes)")


def simulate(system: SystemConfig, n: int, seed: int = 0, device: str | torch.device = "cpu", chunk: int = 1024) -> SceneBatch:
    """Simulate ``n`` scenes. Random draws happen on the CPU with a seeded generator, so the same seed
    gives the same scenes on every device; the arithmetic runs on ``device``. Vectorised over scenes,
    sources, snapshots and elements; ``chunk`` scenes at a time bound the memory."""
    _check_simulate_args(system, n)
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(int(seed))
    S, L, M, N, Kmax = n, system.L, system.M, system.N, system.K_max

    # --- random draws, CPU, fixed order -------------------------------------------------------
    K = torch.randint(system.K_min, system.K_max + 1, (S,), generator=gen)
    u = torch.rand(S, Kmax, 3, generator=gen, dtype=torch.float64)
    snr_db = system.snr_db_min + (system.snr_db_max - system.snr_db_min) * torch.rand(S, generator=gen, dtype=torch.float64)
    code_idx = torch.rand(S, N, generator=gen).argsort(dim=1)[:, :L] if L <= N else torch.randint(0, N, (S, L), generator=gen)
    nlos = _crandn((S, M, N), gen)
    sym = _crandn((S, Kmax, 1 if system.coherent else L), gen)
    noise = _crandn((S, L, M), gen)

    mask = torch.arange(Kmax)[None, :] < K[:, None]
    phi = torch.deg2rad((2 * u[..., 0] - 1) * system.phi_max_deg)
    theta = torch.deg2rad((2 * u[..., 1] - 1) * system.theta_max_deg)
    r = system.r_min_m + (system.r_max_m - system.r_min_m) * u[..., 2]
    power = 10 ** (system.source_power_dbm / 10) * pathloss(system, r) * mask
    phi, theta, r = (t * mask for t in (phi, theta, r))  # padded slots are zero

    kappa = 10 ** (system.rician_k_db / 10)
    los = bs_ris_los(system)
    H = math.sqrt(pathloss(system, system.bs_distance_m)) * (
        math.sqrt(kappa / (1 + kappa)) * los + math.sqrt(1 / (1 + kappa)) * nlos
    )
    codebook = dft_codebook(system)
    codes = codebook[code_idx]

    # --- arithmetic, on the device, chunk by chunk --------------------------------------------
    out = []
    for s in range(0, S, chunk):
        e = min(S, s + chunk)
        out.append(
            _measure(
                system,
                *(t[s:e].to(dev) for t in (phi, theta, r, power, mask, H, codes, sym, noise, snr_db)),
                K=K[s:e].to(dev),
            )
        )
    return SceneBatch.cat(out) if len(out) > 1 else out[0]


def _crandn(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Circularly-symmetric CN(0, 1) samples, complex64 (real and imaginary parts of variance 1/2)."""
    return torch.complex(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) / math.sqrt(2.0)


def _weighted_steering(system: SystemConfig, phi, theta, r, power, mask) -> torch.Tensor:
    """sqrt(p_k) a_k for every source slot, zero in padded slots: [n,K_max,N] complex64."""
    A = steering(system, phi.float(), theta.float(), torch.where(mask, r, 1.0).float())  # [n,Kmax,N]
    return A * (power.float().sqrt() * mask)[..., None]


def source_covariance(system: SystemConfig, phi: torch.Tensor, theta: torch.Tensor, r: torch.Tensor,
                      power: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R_true = sum_k p_k a_k a_k^H over the valid slots: phi, theta [n,K_max] radians, r [n,K_max] metres,
    power [n,K_max] mW, mask [n,K_max] bool -> [n,N,N] complex64 (mW). ``simulate`` uses exactly this."""
    Bc = _weighted_steering(system, phi, theta, r, power, mask).conj().resolve_conj()
    return Bc.mH @ Bc


def _measure(system, phi, theta, r, power, mask, H, codes, sym, noise, snr_db, K) -> SceneBatch:
    L = system.L
    B = _weighted_steering(system, phi, theta, r, power, mask)  # sqrt(p_k) a_k, [s,Kmax,N]
    Bc = B.conj().resolve_conj()
    R_true = Bc.mH @ Bc  # sum_k p_k a_k a_k^H, [s,N,N] (as source_covariance)
    x = B.mT @ sym  # x_l = sum_k sqrt(p_k) a_k s_{k,l}, [s,N,L] (or [s,N,1] for coherent symbols)
    signal = (H @ (codes.mT * x)).mT.contiguous()  # H diag(c_l) x_l, [s,L,M]
    # expected signal power per entry: (1/(L M)) sum_l sum_k p_k ||H diag(c_l) a_k||^2
    CB = (codes[:, :, None, :] * B[:, None, :, :]).reshape(codes.shape[0], -1, codes.shape[-1])  # [s,L*Kmax,N]
    GB = H @ CB.mT  # [s,M,L*Kmax]
    p_sig = torch.view_as_real(GB).square().sum((-3, -2, -1)) / (L * system.M)
    noise_var = p_sig / 10 ** (snr_db.float() / 10)
    y = signal + noise.to(signal.dtype) * noise_var.sqrt()[:, None, None]
    return SceneBatch(
        y=y, signal=signal, H=H, codes=codes, R_true=R_true, K=K,
        phi=phi.float(), theta=theta.float(), r=r.float(), power=power.float(), mask=mask,
        snr_db=snr_db.float(), noise_var=noise_var,
    )
