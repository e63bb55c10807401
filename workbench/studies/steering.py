"""What assuming an approximate steering model costs: the bias of a separable- or Fresnel-model estimate of a source
that radiates the exact spherical wave, beside the Cramer-Rao bound under the exact model.

Owns: :func:`mismatch_rows`. Must not: draw or write files (rows out only).

For one source and a noise-free covariance R = a a^H (a the exact steering vector), MUSIC under a model m estimates
argmax over (phi', theta', r') of |a_m(phi', theta', r')^H a|^2: the large-sample limit of a model-m subspace or
matched-filter estimate. The bias is that point minus the truth; it does not shrink with SNR or snapshots, while
sqrt(CRB) does, so a bias above sqrt(CRB) means the approximation, not the noise, sets the error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..config import STEERING_MODELS, SystemConfig, check_choice
from ..grid import Grid
from ..likelihood import crb
from ..physics import simulate, steering
from ..refinement import refine_peaks


def mismatch_rows(system: SystemConfig, phis_deg: Sequence[float] = (0.0, 20.0, 40.0, 60.0),
                  ranges_m: Sequence[float] = (0.75, 1.5, 3.0, 6.0, 10.0), theta_deg: float = 0.0,
                  model: str = "separable", snr_db: float = 20.0, seed: int = 0) -> list[dict]:
    """One row per (phi, r) of the grid ``phis_deg`` x ``ranges_m`` (elevation ``theta_deg``): the estimate a
    ``model``-assuming MUSIC converges to on the exact noise-free covariance, its bias, and sqrt(CRB) under the exact
    model for one scene of ``system`` (its channel and RIS codes, seed ``seed``) at ``snr_db`` (unknown power and
    noise variance). The estimate is confined to the field of view: ``range_clipped`` marks an estimated range held at
    r_min or r_max (its range bias then says nothing). Rows: {"phi_deg", "theta_deg", "r_m", "model", "range_clipped",
    "bias_phi_deg", "bias_theta_deg", "bias_r_m",
    "sqrt_crb_phi_deg", "sqrt_crb_theta_deg", "sqrt_crb_r_m", "bias_over_crb_phi", "bias_over_crb_r"} (floats)."""
    check_choice("model", model, STEERING_MODELS)
    exact = system.replace(steering_model="exact", K_min=1, K_max=1, snr_db_min=snr_db, snr_db_max=snr_db)
    assumed = exact.replace(steering_model=model)
    grid = Grid.default(system)
    f64 = torch.float64
    phi, r = torch.meshgrid(torch.tensor([math.radians(p) for p in phis_deg], dtype=f64), torch.tensor(list(ranges_m), dtype=f64),
                            indexing="ij")
    phi, r = phi.reshape(-1, 1), r.reshape(-1, 1)
    theta = torch.full_like(phi, math.radians(theta_deg))
    a = steering(exact, phi, theta, r)  # [B,1,N] exact
    F = a.mT  # the signal subspace of a a^H, [B,N,1]
    valid = torch.ones_like(phi, dtype=torch.bool)
    est = refine_peaks(F, assumed, grid, phi, theta, r, valid, "music", iters=60)
    scene = simulate(exact, 1, seed=seed)
    B = phi.shape[0]
    H, codes = scene.H.expand(B, -1, -1), scene.codes.expand(B, -1, -1)
    power = torch.full_like(phi, 10 ** (exact.source_power_dbm / 10)) * (exact.wavelength_m / (4 * math.pi * r)) ** 2
    b = torch.einsum("blmn,bn->blm", (H[:, None] * codes[:, :, None, :]).to(torch.complex128), a[:, 0])
    noise = power[:, 0] * b.abs().square().mean((1, 2)) / 10 ** (snr_db / 10)
    bound = crb(exact, H, codes, phi, theta, r, power, noise).sqrt()[:, 0]  # [B,3]
    rows = []
    for i in range(B):
        bias = (float(est[0][i, 0] - phi[i, 0]), float(est[1][i, 0] - theta[i, 0]), float(est[2][i, 0] - r[i, 0]))
        sq = bound[i].tolist()
        r_est = float(est[2][i, 0])
        clipped = min(abs(r_est - exact.r_min_m), abs(r_est - exact.r_max_m)) < 1e-9  # held at the field of view's edge
        rows.append({"phi_deg": math.degrees(float(phi[i, 0])), "theta_deg": theta_deg, "r_m": float(r[i, 0]), "model": model,
                     "range_clipped": clipped,
                     "bias_phi_deg": math.degrees(bias[0]), "bias_theta_deg": math.degrees(bias[1]), "bias_r_m": bias[2],
                     "sqrt_crb_phi_deg": math.degrees(sq[0]), "sqrt_crb_theta_deg": math.degrees(sq[1]), "sqrt_crb_r_m": sq[2],
                     "bias_over_crb_phi": abs(bias[0]) / sq[0], "bias_over_crb_r": abs(bias[2]) / sq[2]})
    return rows
