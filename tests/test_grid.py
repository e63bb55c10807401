"""The one search grid: its separable tables are the steering vectors, its two contractions equal the direct
products with the full steering table, and both users (beamscan, MUSIC/MVDR) find a source on it."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.config import ConfigError, SystemConfig
from workbench.estimators import beamscan_covariance
from workbench.grid import Grid
from workbench.physics import measurement_matrices, simulate

SYSTEM = SystemConfig()
SMALL = SystemConfig(N_H=6, N_V=5, M=8, L=8, K_min=1, K_max=2)


def test_separable_tables_are_the_steering_vectors_and_memory_is_counted():
    grid = Grid.uniform(SYSTEM, 9, 5, 4)
    ax, az = grid.factors(SYSTEM, dtype=torch.complex128)
    kron = (az[None, :, :, :, None] * ax[:, :, :, None, :]).reshape(*grid.shape, SYSTEM.N)
    full = grid.steering_table(SYSTEM, dtype=torch.complex128)
    assert torch.allclose(kron, full, atol=1e-12)
    mem = grid.memory_bytes(SYSTEM, torch.complex128)
    assert mem["separable"] == ax.nbytes + az.nbytes and mem["full"] == full.nbytes
    d = Grid.default(SYSTEM)
    assert d.shape == (61, 31, 16)
    d.validate(SYSTEM)


@pytest.mark.parametrize("system", [SYSTEM, SMALL], ids=["12x12", "6x5"])
def test_response_and_quadratic_equal_the_full_table(system):
    grid = Grid.uniform(system, 7, 5, 3)
    full = grid.steering_table(system, dtype=torch.complex128).reshape(-1, system.N)  # [G,N]
    gen = torch.Generator().manual_seed(0)
    X = torch.complex(*(torch.randn(2, 3, system.N, generator=gen, dtype=torch.float64) for _ in range(2)))
    resp = grid.response(system, X, max_bytes=4096)  # tiny chunks: the chunking must not change the result
    assert resp.shape == (2, 3, *grid.shape)
    assert torch.allclose(resp.reshape(2, 3, -1), X @ full.T, atol=1e-12)
    Qm = X.mH @ X  # [2,N,N] Hermitian
    quad = grid.quadratic(system, Qm, max_bytes=4096)
    direct = torch.einsum("gn,bnm,gm->bg", full.conj(), Qm, full).real
    assert torch.allclose(quad.reshape(2, -1), direct, rtol=1e-10)


def test_indices_coordinates_and_vectors_agree():
    grid = Grid.uniform(SMALL, 5, 4, 3)
    flat = torch.tensor([0, 7, grid.size - 1])
    idx = grid.unravel(flat)
    full = grid.steering_table(SMALL, dtype=torch.complex128).reshape(-1, SMALL.N)
    assert torch.allclose(grid.vectors(SMALL, idx, torch.complex128), full[flat], atol=1e-12)
    phi, theta, r = grid.coords(idx)
    assert phi[-1] == grid.phi[-1] and theta[-1] == grid.theta[-1] and r[-1] == grid.r[-1] and phi[0] == grid.phi[0]


def test_beamscan_puts_a_noise_free_on_grid_source_on_its_grid_point():
    """One source exactly on a grid point, no noise: the first beamscan pick is that point, and the power fit
    gives back the covariance of that one source."""
    system = SMALL.replace(K_max=1, snr_db_min=60.0, snr_db_max=60.0)
    grid = Grid.uniform(system, 13, 7, 4)
    batch = simulate(system, 3, seed=5)
    idx = torch.tensor([[3, 2, 1], [9, 5, 3], [6, 3, 0]])
    a = grid.vectors(system, idx, torch.complex64)  # [3,N]
    p = torch.tensor([2.0, 0.5, 1.0])
    x = a[:, :, None] * torch.complex(torch.randn(3, 1, system.L), torch.randn(3, 1, system.L)) * p.sqrt()[:, None, None]
    G = measurement_matrices(batch.H, batch.codes)
    y = (G @ x.mT[..., None])[..., 0]  # [3,L,M]
    R = beamscan_covariance(y, G, torch.full((3,), 1e-12), system, n_sources=1, grid=grid)
    Ra = a[:, :, None] * a.conj()[:, None, :]
    cos = (R.conj() * Ra).sum((-2, -1)).abs() / (torch.linalg.matrix_norm(R) * torch.linalg.matrix_norm(Ra))
    assert torch.all(cos > 1 - 1e-4)


def test_bad_grids_fail_clearly():
    pm = math.radians(SYSTEM.phi_max_deg)
    ok = torch.tensor([0.0])
    with pytest.raises(ConfigError, match="grid.phi"):
        Grid(torch.tensor([-pm, pm + 0.01]), ok, torch.tensor([2.0])).validate(SYSTEM)
    with pytest.raises(ConfigError, match="grid.r"):
        Grid(ok, ok, torch.tensor([3.0, 2.0]))
    with pytest.raises(ConfigError, match="grid.n_phi"):
        Grid.uniform(SYSTEM, 0, 3, 3)
    with pytest.raises(ConfigError, match="X: expected vectors of length N = 144"):
        Grid.uniform(SYSTEM, 3, 3, 2).response(SYSTEM, torch.zeros(2, 10, dtype=torch.complex64))
