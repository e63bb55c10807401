import math

import numpy as np
import pytest
import torch

from workbench.config import ConfigError, SystemConfig
from workbench.physics import SceneBatch, dft_codebook, simulate, source_covariance, steering, steering_derivatives


def _np_positions(system):
    d = system.spacing_m
    x = np.array([(h - (system.N_H - 1) / 2) * d for v in range(system.N_V) for h in range(system.N_H)])
    z = np.array([(v - (system.N_V - 1) / 2) * d for v in range(system.N_V) for h in range(system.N_H)])
    return x, z


def _np_separable(system, phi, theta, r):
    """Float64 reference of the separable approximation, written independently of physics.py."""
    x, z = _np_positions(system)
    k0 = 2 * np.pi * system.carrier_hz / 299_792_458.0
    curv = 0.0 if np.isinf(r) else (x**2 + z**2) / (2 * r)
    return np.exp(1j * k0 * (x * np.sin(phi) * np.cos(theta) + z * np.sin(theta) - curv)) / np.sqrt(system.N)


def _np_spherical(system, phi, theta, r):
    """The spherical wave from first principles: the source at the point r u, the phase k0 (r - distance to element)."""
    x, z = _np_positions(system)
    k0 = 2 * np.pi * system.carrier_hz / 299_792_458.0
    src = r * np.array([np.sin(phi) * np.cos(theta), np.cos(phi) * np.cos(theta), np.sin(theta)])
    elems = np.stack([x, np.zeros_like(x), z], -1)
    dist = np.linalg.norm(src[None, :] - elems, axis=-1)
    return np.exp(1j * k0 * (r - dist)) / np.sqrt(system.N)


def _random_points(n, seed, r_lo=0.5, r_hi=10.0):
    g = torch.Generator().manual_seed(seed)
    phi = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2.0
    theta = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 1.0
    r = r_lo + (r_hi - r_lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return phi, theta, r


def test_steering_unit_norm_dtype_and_the_spherical_wave(system):
    """The default model is the exact spherical wave: against an independent distance formula at random positions,
    off broadside, and at r_min."""
    phi, theta, r = _random_points(50, 1)
    phi, theta, r = torch.cat([phi, torch.tensor([1.0])]), torch.cat([theta, torch.tensor([0.5])]), torch.cat([r, torch.tensor([system.r_min_m])])
    a64 = steering(system, phi, theta, r)
    a32 = steering(system, phi.float(), theta.float(), r.float())
    assert system.steering_model == "exact"
    assert a64.shape == (51, system.N) and a64.dtype == torch.complex128 and a32.dtype == torch.complex64
    assert torch.allclose(torch.linalg.vector_norm(a64, dim=-1), torch.ones(51, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.linalg.vector_norm(a32, dim=-1), torch.ones(51), atol=1e-5)
    ref = np.stack([_np_spherical(system, p, t, rr) for p, t, rr in zip(phi.numpy(), theta.numpy(), r.numpy())])
    np.testing.assert_allclose(a64.numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(a32.numpy(), ref, atol=2e-4)


def test_the_separable_model_is_the_old_formula(system):
    phi, theta, r = _random_points(20, 2)
    a = steering(system, phi, theta, r, model="separable")
    ref = np.stack([_np_separable(system, p, t, rr) for p, t, rr in zip(phi.numpy(), theta.numpy(), r.numpy())])
    np.testing.assert_allclose(a.numpy(), ref, atol=1e-10)
    with pytest.raises(ConfigError, match="steering model"):
        steering(system, phi, theta, r, model="parabolic")
    with pytest.raises(ConfigError, match="steering_model"):
        SystemConfig(steering_model="parabolic")


def _max_phase_error(system, phi, theta, r, model):
    a, ref = steering(system, phi, theta, r, model=model), steering(system, phi, theta, r, model="exact")
    return (a * ref.conj()).angle().abs().amax(-1)


def test_approximation_errors_grow_as_the_expansion_predicts(system):
    """The separable model drops k0 (p.u)^2 / (2 r) from the Fresnel phase: its error against the spherical wave is
    that term (to the Fresnel remainder), zero at broadside and largest off broadside. The Fresnel expansion's own
    error is third order: it falls like 1/r^2 (doubling r divides it by about 4)."""
    x, z = _np_positions(system)
    k0 = system.k0
    for phi_v, theta_v in ((0.0, 0.0), (0.5, 0.0), (1.0, 0.3), (-0.9, -0.4)):
        phi, theta = torch.tensor(phi_v, dtype=torch.float64), torch.tensor(theta_v, dtype=torch.float64)
        r = torch.tensor(100.0, dtype=torch.float64)  # where the Fresnel remainder is negligible
        pu = x * math.sin(phi_v) * math.cos(theta_v) + z * math.sin(theta_v)
        predicted = float(np.max(np.abs(k0 * pu**2 / (2 * 100.0))))
        err = float(_max_phase_error(system, phi, theta, r, "separable"))
        fres = float(_max_phase_error(system, phi, theta, r, "fresnel"))
        assert abs(err - predicted) <= fres + 1e-9, (phi_v, theta_v, err, predicted, fres)  # equal to the Fresnel remainder
        assert fres < max(0.1 * predicted, 1e-3)
    phi, theta = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    e = [float(_max_phase_error(system, phi, theta, torch.tensor(rr, dtype=torch.float64), "fresnel")) for rr in (8.0, 16.0, 32.0)]
    assert 3.0 < e[0] / e[1] < 5.0 and 3.0 < e[1] / e[2] < 5.0, e
    # off broadside at 2 m (inside the default range) the separable model is wrong by more than a radian
    assert float(_max_phase_error(system, phi, theta, torch.tensor(2.0, dtype=torch.float64), "separable")) > 1.0


def test_steering_broadcasts_and_handles_inf(system):
    a = steering(system, torch.zeros(3, 1, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64), math.inf)
    assert a.shape == (3, 4, system.N)
    # broadside planar wave: all phases equal
    assert torch.allclose(a, torch.full_like(a, 1 / math.sqrt(system.N)))


def test_near_field_converges_to_planar(system):
    phi, theta = torch.tensor(0.4, dtype=torch.float64), torch.tensor(-0.2, dtype=torch.float64)
    planar = steering(system, phi, theta, math.inf)
    ranges = [10.0, 100.0, 1e4, 1e7]
    dist = [torch.linalg.vector_norm(steering(system, phi, theta, r) - planar).item() for r in ranges]
    assert all(b < a for a, b in zip(dist, dist[1:])), dist
    assert torch.linalg.vector_norm(steering(system, phi, theta, 0.5) - planar) > 0.5  # near field at 0.5 m
    assert dist[-1] < 1e-5
    # the deviation falls like 1/r once small (Fresnel term proportional to 1/r)
    assert dist[-2] / dist[-1] == pytest.approx(1e3, rel=1e-2)


def test_shapes_and_dtypes(system, batch):
    n, L, M, N, K = len(batch), system.L, system.M, system.N, system.K_max
    expected = {
        "y": ((n, L, M), torch.complex64), "signal": ((n, L, M), torch.complex64), "H": ((n, M, N), torch.complex64),
        "codes": ((n, L, N), torch.complex64), "R_true": ((n, N, N), torch.complex64), "K": ((n,), torch.int64),
        "phi": ((n, K), torch.float32), "theta": ((n, K), torch.float32), "r": ((n, K), torch.float32),
        "power": ((n, K), torch.float32), "mask": ((n, K), torch.bool), "snr_db": ((n,), torch.float32),
        "noise_var": ((n,), torch.float32),
    }
    for name, (shape, dtype) in expected.items():
        t = getattr(batch, name)
        assert tuple(t.shape) == shape and t.dtype == dtype, name
    assert batch.G.shape == (n, L, M, N)
    assert torch.allclose(batch.G[3, 5], batch.H[3] @ torch.diag(batch.codes[3, 5]))


def test_draws_lie_in_the_configured_ranges(system, batch):
    m = batch.mask
    assert ((batch.K >= system.K_min) & (batch.K <= system.K_max)).all()
    assert torch.equal(m.sum(1), batch.K) and torch.equal(m, torch.arange(system.K_max) < batch.K[:, None])
    assert (batch.phi[m].abs() <= math.radians(system.phi_max_deg) + 1e-6).all()
    assert (batch.theta[m].abs() <= math.radians(system.theta_max_deg) + 1e-6).all()
    assert ((batch.r[m] >= system.r_min_m) & (batch.r[m] <= system.r_max_m)).all()
    assert (batch.power[~m] == 0).all() and (batch.phi[~m] == 0).all()
    # received power is the free-space path loss of each source's range (0 dBm transmitted)
    lam = system.wavelength_m
    assert torch.allclose(batch.power[m], (lam / (4 * math.pi * batch.r[m])) ** 2, rtol=1e-5)
    assert ((batch.snr_db >= system.snr_db_min) & (batch.snr_db <= system.snr_db_max)).all()


def test_r_true_hermitian_psd_rank_k_and_matches_reference(system, batch):
    R = batch.R_true.to(torch.complex128)
    assert torch.allclose(R, R.mH, atol=1e-12 * R.abs().max().item())
    ev = torch.linalg.eigvalsh(R)  # ascending
    top = ev[:, -1:]
    assert (ev >= -1e-6 * top).all()
    rank = (ev > 1e-5 * top).sum(-1)
    assert torch.equal(rank, batch.K)
    np_rank = [np.linalg.matrix_rank(R[i].numpy(), tol=1e-5 * top[i].item()) for i in range(8)]
    assert np_rank == batch.K[:8].tolist()
    # R_true = sum_k p_k a_k a_k^H from the float64 reference steering
    for i in range(4):
        ref = sum(p * np.outer(a, a.conj()) for p, a in (
            (batch.power[i, k].item(), _np_spherical(system, batch.phi[i, k].item(), batch.theta[i, k].item(), batch.r[i, k].item()))
            for k in range(batch.K[i].item())))
        np.testing.assert_allclose(R[i].numpy(), ref, atol=1e-5 * np.abs(ref).max())
    # the loader's recomputation gives the same matrices
    R2 = source_covariance(system, batch.phi, batch.theta, batch.r, batch.power, batch.mask)
    assert torch.allclose(R2, batch.R_true, atol=1e-6 * batch.R_true.abs().max().item())


def test_raw_units_are_tiny(batch):
    """No gain fudge: raw covariances have the seed's tiny norms (path loss of metres at 1 GHz)."""
    fro = torch.linalg.matrix_norm(batch.R_true)
    assert (fro < 1e-2).all() and (fro > 1e-7).all()


def test_measured_snr_matches_requested():
    system = SystemConfig(L=128)  # 2048 noise samples per scene: a tight per-scene noise estimate
    b = simulate(system, 32, seed=3)
    LM = system.L * system.M
    noise = (b.y - b.signal).abs().pow(2).sum((1, 2)).double() / LM
    # expected signal power (the SNR's definition), float64 from the reference steering:
    # (1/(L M)) sum_l sum_k p_k ||H diag(c_l) a_k||^2
    G = b.G.to(torch.complex128)
    p_exp = torch.zeros(len(b), dtype=torch.float64)
    for i in range(len(b)):
        for k in range(b.K[i].item()):
            a = torch.from_numpy(_np_spherical(system, b.phi[i, k].item(), b.theta[i, k].item(), b.r[i, k].item()))
            p_exp[i] += b.power[i, k].item() * (G[i] @ a).abs().pow(2).sum() / LM
    snr_def = 10 * torch.log10(p_exp / noise)
    assert (snr_def - b.snr_db).abs().max() < 0.5, snr_def - b.snr_db
    # the realised ||signal||^2 / ||y - signal||^2 fluctuates per scene with the symbols (a few RIS
    # configurations dominate the sum), but is centred on the requested SNR
    realised = 10 * torch.log10(b.signal.abs().pow(2).sum((1, 2)).double() / LM / noise)
    assert (realised - b.snr_db).median().abs() < 0.5
    assert torch.allclose(noise, b.noise_var.double(), rtol=0.15)


def test_determinism_by_seed(system):
    a, b, c = simulate(system, 6, seed=5), simulate(system, 6, seed=5), simulate(system, 6, seed=6)
    for name, t in a.tensors().items():
        assert torch.equal(t, getattr(b, name)), name
    assert not torch.equal(a.y, c.y) and not torch.equal(a.phi, c.phi)
    # chunking is an implementation detail: the same scenes come out
    d = simulate(system, 6, seed=5, chunk=4)
    assert torch.allclose(d.y, a.y, atol=1e-6 * a.y.abs().max().item()) and torch.equal(d.phi, a.phi)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_scenes(system):
    a, b = simulate(system, 8, seed=2), simulate(system, 8, seed=2, device="cuda")
    assert b.y.is_cuda
    assert torch.allclose(b.y.cpu(), a.y, atol=1e-4 * a.y.abs().max().item())
    assert torch.allclose(b.R_true.cpu(), a.R_true, atol=1e-4 * a.R_true.abs().max().item())


def _symbol_fit_residual(b: SceneBatch, system: SystemConfig, i: int) -> float:
    """Relative residual of the best fit signal_l = G_l sum_k sqrt(p_k) a_k s_k with ONE symbol vector s
    shared by all snapshots (least squares over the L*M equations, K unknowns), float64."""
    K = b.K[i].item()
    A = torch.stack([torch.from_numpy(_np_spherical(system, b.phi[i, k].item(), b.theta[i, k].item(), b.r[i, k].item()))
                     * math.sqrt(b.power[i, k].item()) for k in range(K)], 1)  # [N,K]
    G = b.G[i].to(torch.complex128)  # [L,M,N]
    design = (G @ A).reshape(-1, K)
    target = b.signal[i].to(torch.complex128).reshape(-1, 1)
    s = torch.linalg.lstsq(design, target).solution
    return (torch.linalg.vector_norm(design @ s - target) / torch.linalg.vector_norm(target)).item()


def test_coherent_keeps_symbols_fixed_across_snapshots():
    coh, iid = SystemConfig(coherent=True), SystemConfig(coherent=False)
    bc, bi = simulate(coh, 6, seed=4), simulate(iid, 6, seed=4)
    res_c = [_symbol_fit_residual(bc, coh, i) for i in range(6)]
    res_i = [_symbol_fit_residual(bi, iid, i) for i in range(6)]
    assert max(res_c) < 1e-4, res_c  # one symbol vector explains every snapshot
    assert min(res_i) > 0.1, res_i  # i.i.d. symbols: it cannot


def test_codes_unit_modulus_quantised_and_from_the_dft_codebook(system, batch):
    c = batch.codes
    assert torch.allclose(c.abs(), torch.ones_like(c.real), atol=1e-6)
    step = 2 * math.pi / 2**system.phase_bits
    q = torch.angle(c).double() / step
    assert torch.allclose(q, q.round(), atol=1e-4)
    # distinct configurations within a scene (L <= N draws without replacement)
    for i in range(4):
        assert torch.unique(torch.view_as_real(c[i]).reshape(system.L, -1), dim=0).shape[0] == system.L
    # continuous phases: the codebook is the 2D DFT, its rows orthogonal
    C = dft_codebook(system.replace(phase_bits=0)).to(torch.complex128)
    assert torch.allclose(C @ C.mH, system.N * torch.eye(system.N, dtype=torch.complex128), atol=1e-4)
    one_bit = dft_codebook(system.replace(phase_bits=1))
    ang = torch.angle(one_bit).abs()
    assert torch.minimum(ang, (ang - math.pi).abs()).max() < 1e-5  # 1 bit: phases 0 or pi only


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: SystemConfig(K_max=0), "system.K_max"),
        (lambda: SystemConfig(L=0), "system.L"),
        (lambda: SystemConfig(snr_db_max=math.nan), "system.snr_db_max"),
        (lambda: SystemConfig(snr_db_min=math.nan), "system.snr_db_min"),
    ],
)
def test_bad_system_fails_naming_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        simulate(make(), 2)


def test_simulate_rechecks_a_mutated_config_and_its_arguments(system):
    s = SystemConfig()
    s.L = 0  # dataclasses are mutable; simulate validates again
    with pytest.raises(ConfigError, match=r"system\.L = 0"):
        simulate(s, 2)
    s = SystemConfig()
    s.K_max = 0
    with pytest.raises(ConfigError, match=r"system\.K_max"):
        simulate(s, 2)
    with pytest.raises(ConfigError, match="device = 'tpu'"):
        simulate(system, 2, device="tpu")
    with pytest.raises(ConfigError, match="n = 0"):
        simulate(system, 0)
    with pytest.raises(ConfigError, match="system"):
        simulate({"L": 4}, 2)


@pytest.mark.parametrize("model", ["exact", "fresnel", "separable"])
def test_closed_form_steering_derivatives_match_autograd(model):
    """steering_derivatives: the vector is :func:`steering` at r = 1 / inv_r (the planar one at inv_r = 0), and its first
    and second derivatives in (phi, theta, 1/r) are autograd's through steering (all N entries, real and imaginary
    parts), at random points across the field of view and down to r = 0.5 m."""
    s = SystemConfig(N_H=5, N_V=4, steering_model=model)
    g = torch.Generator().manual_seed(3)
    phi, theta = (torch.rand(6, generator=g, dtype=torch.float64) - 0.5) * 2.0, (torch.rand(6, generator=g, dtype=torch.float64) - 0.5) * 1.5
    inv_r = torch.cat([torch.zeros(1, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) * 2.0])
    a, da, d2a = steering_derivatives(s, phi, theta, inv_r)
    assert a.shape == (6, s.N) and da.shape == (6, 3, s.N) and d2a.shape == (6, 3, 3, s.N) and a.dtype == torch.complex128
    torch.testing.assert_close(a, steering(s, phi, theta, 1.0 / inv_r), rtol=0, atol=1e-15)
    for i in range(6):
        v0 = torch.stack([phi[i], theta[i], inv_r[i]])
        f = lambda v: torch.view_as_real(steering(s, v[0], v[1], 1.0 / v[2]))  # noqa: E731  [N, 2]
        J = torch.autograd.functional.jacobian(f, v0)  # [N, 2, 3]
        cols = slice(None) if inv_r[i] > 0 else slice(0, 2)  # autograd through 1 / (1 / w) is NaN in w at w = 0
        torch.testing.assert_close(torch.view_as_real(da[i]).permute(1, 2, 0)[..., cols], J[..., cols], rtol=1e-12, atol=1e-13)
        if inv_r[i] > 0:
            for n in (0, s.N // 2, s.N - 1):
                for part in (0, 1):
                    Hn = torch.autograd.functional.hessian(lambda v: f(v)[n, part], v0)  # noqa: B023
                    torch.testing.assert_close(torch.view_as_real(d2a[i, :, :, n])[..., part], Hn, rtol=1e-11, atol=1e-12)
