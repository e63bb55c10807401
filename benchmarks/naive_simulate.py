"""The deliberately naive baseline of ``bench_simulate.py``: the simulator of ``workbench.physics`` and the
seed R_samp estimator written as a per-scene NumPy loop (Python loops over scenes, sources and snapshots;
NumPy only inside one vector). Same maths, independent code and random stream: it is the speed reference,
and its R_samp norms are compared with the vectorised ones as a sanity check.
"""

from __future__ import annotations

import math

import numpy as np

from workbench.config import SystemConfig


def _steering(system: SystemConfig, x: np.ndarray, z: np.ndarray, phi: float, theta: float, r: float) -> np.ndarray:
    phase = system.k0 * (x * math.sin(phi) * math.cos(theta) + z * math.sin(theta) - (x * x + z * z) / (2 * r))
    return np.exp(1j * phase) / math.sqrt(system.N)


def _codebook(system: SystemConfig) -> np.ndarray:
    rows = []
    step = 2 * math.pi / 2**system.phase_bits if system.phase_bits else None
    for p in range(system.N_H):
        for q in range(system.N_V):
            phase = np.zeros(system.N)
            for v in range(system.N_V):
                for h in range(system.N_H):
                    ph = 2 * math.pi * (p * h / system.N_H + q * v / system.N_V)
                    phase[v * system.N_H + h] = round(ph / step) * step if step else ph
            rows.append(np.exp(1j * phase))
    return np.array(rows)


def naive_scene(system: SystemConfig, rng: np.random.Generator, x: np.ndarray, z: np.ndarray, codebook: np.ndarray,
                los: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One scene: returns (R_true [N,N], seed R_samp [N,N]) in raw units, complex128."""
    M, N, L = system.M, system.N, system.L
    lam = system.wavelength_m
    K = int(rng.integers(system.K_min, system.K_max + 1))
    snr_db = rng.uniform(system.snr_db_min, system.snr_db_max)
    kappa = 10 ** (system.rician_k_db / 10)
    nlos = (rng.standard_normal((M, N)) + 1j * rng.standard_normal((M, N))) / math.sqrt(2)
    H = (lam / (4 * math.pi * system.bs_distance_m)) * (math.sqrt(kappa / (1 + kappa)) * los + math.sqrt(1 / (1 + kappa)) * nlos)
    codes = codebook[rng.permutation(N)[:L]]

    A, p = [], []
    R_true = np.zeros((N, N), complex)
    for _ in range(K):
        phi = math.radians(rng.uniform(-system.phi_max_deg, system.phi_max_deg))
        theta = math.radians(rng.uniform(-system.theta_max_deg, system.theta_max_deg))
        r = rng.uniform(system.r_min_m, system.r_max_m)
        a = _steering(system, x, z, phi, theta, r)
        pk = 10 ** (system.source_power_dbm / 10) * (lam / (4 * math.pi * r)) ** 2
        A.append(a)
        p.append(pk)
        R_true += pk * np.outer(a, a.conj())

    signals, p_sig = [], 0.0
    for l in range(L):
        G = H * codes[l][None, :]
        xl = np.zeros(N, complex)
        for k in range(K):
            s = (rng.standard_normal() + 1j * rng.standard_normal()) / math.sqrt(2)
            xl += math.sqrt(p[k]) * A[k] * s
            p_sig += p[k] * np.linalg.norm(G @ A[k]) ** 2
        signals.append(G @ xl)
    noise_var = p_sig / (L * M) / 10 ** (snr_db / 10)

    X = []
    for l in range(L):
        G = H * codes[l][None, :]
        y = signals[l] + math.sqrt(noise_var / 2) * (rng.standard_normal(M) + 1j * rng.standard_normal(M))
        w = np.linalg.solve(G @ G.conj().T + system.ridge * np.eye(M), y)
        X.append(G.conj().T @ w)
    mean = sum(X) / L
    R_samp = np.zeros((N, N), complex)
    for xl in X:
        d = xl - mean
        R_samp += np.outer(d, d.conj()) / L
    return R_true, R_samp


def naive_simulate(system: SystemConfig, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n scenes, one at a time: (R_true [n,N,N], seed R_samp [n,N,N]), complex128."""
    rng = np.random.default_rng(seed)
    d = system.spacing_m
    x = np.array([(h - (system.N_H - 1) / 2) * d for v in range(system.N_V) for h in range(system.N_H)])
    z = np.array([(v - (system.N_V - 1) / 2) * d for v in range(system.N_V) for h in range(system.N_H)])
    az, el = math.radians(system.bs_azimuth_deg), math.radians(system.bs_elevation_deg)
    b = np.exp(1j * math.pi * np.arange(system.M) * math.sin(az))
    los = np.outer(b, (_steering(system, x, z, az, el, math.inf) * math.sqrt(system.N)).conj())
    codebook = _codebook(system)
    out = [naive_scene(system, rng, x, z, codebook, los) for _ in range(n)]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
