"""Checks of workbench.localisation: spectra against a direct computation, recovery of sources from noise-free
R_true, the Cramer-Rao bound against a finite-difference Fisher matrix and a Monte-Carlo ML estimator, MDL/AIC
on sample covariances, Hungarian matching, and bad input."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from workbench import likelihood as LK
from workbench import localisation as E
from workbench import metrics as M
from workbench import refinement as RF
from workbench.config import STEERING_MODELS, ConfigError, ExperimentConfig, SystemConfig
from workbench.grid import Grid
from workbench.physics import measurement_matrices, pathloss, simulate, steering
from workbench.studies.localisation import localisation_sources, localisation_vs_snr

SYSTEM = SystemConfig()


def _cn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """CN(0, 1) samples, complex128."""
    re, im = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(2))
    return torch.complex(re, im) / math.sqrt(2)


def _scenes(system: SystemConfig, Ks: list[int], seed: int, min_sep: float = 0.25):
    """Random sources, uniform over the field of view (r uniform in metres, as simulate draws them), with
    every pair separated by at least ``min_sep`` in one direction cosine (sin(phi) cos(theta) or sin(theta)):
    0.25 is 1.5 half-power beamwidths (2/12) of the 12 x 12 RIS. Powers follow the path loss (26 dB spread).
    Returns phi, theta, r, power [B,Kmax] float64, mask [B,Kmax], R [B,N,N] complex128."""
    rng = np.random.default_rng(seed)
    kmax = max(Ks)
    B = len(Ks)
    phi, theta, r, mask = (np.zeros((B, kmax)) for _ in range(4))
    pm, tm = math.radians(system.phi_max_deg), math.radians(system.theta_max_deg)
    for b, K in enumerate(Ks):
        while True:
            p, t = rng.uniform(-pm, pm, K), rng.uniform(-tm, tm, K)
            u, v = np.sin(p) * np.cos(t), np.sin(t)
            sep = np.maximum(np.abs(u[:, None] - u[None]), np.abs(v[:, None] - v[None])) + np.eye(K)
            if (sep >= min_sep).all():
                break
        phi[b, :K], theta[b, :K], r[b, :K], mask[b, :K] = p, t, rng.uniform(system.r_min_m, system.r_max_m, K), 1
    phi, theta, r = (torch.tensor(x) for x in (phi, theta, r))
    mask = torch.tensor(mask, dtype=torch.bool)
    r = torch.where(mask, r, torch.ones_like(r))
    power = pathloss(system, r) * 1.0 * mask
    A = steering(system, phi, theta, r)
    R = torch.einsum("bkn,bk,bkm->bnm", A, power.to(A.dtype), A.conj())
    return phi, theta, r, power, mask, R


# ---------------------------------------------------------------------------------------------
# Spectra
def test_spectra_match_a_direct_computation():
    """Separable MUSIC/MVDR over the grid against the full steering table, eigh and linalg.solve (float64)."""
    grid = Grid.uniform(SYSTEM, 11, 7, 5)
    *_, R = _scenes(SYSTEM, [2, 3], seed=3)
    R = R + 1e-6 * torch.eye(SYSTEM.N, dtype=R.dtype)  # a noise floor, so MVDR is not dominated by loading
    K = torch.tensor([2, 3])
    a = grid.steering_table(SYSTEM, dtype=torch.complex128).reshape(-1, SYSTEM.N)  # [G,N]
    _, U = torch.linalg.eigh(R)
    music = [1 / (1 - (U[b, :, -k:].mH @ a.T).abs().square().sum(0)) for b, k in enumerate(K.tolist())]
    assert torch.allclose(E.music_spectrum(R, SYSTEM, K, grid).reshape(2, -1), torch.stack(music), rtol=1e-8)
    loading = 1e-3
    delta = loading * torch.diagonal(R, dim1=-2, dim2=-1).real.mean(-1)
    Rl = R + delta[:, None, None] * torch.eye(SYSTEM.N, dtype=R.dtype)
    mvdr = 1 / torch.einsum("gn,bng->bg", a.conj(), torch.linalg.solve(Rl, a.T.expand(2, -1, -1))).real
    assert torch.allclose(E.mvdr_spectrum(R, SYSTEM, grid, loading).reshape(2, -1), mvdr, rtol=1e-8)
    # the spectrum of the physics: every vector formed under the exact model, no separable contraction
    ax = steering(SYSTEM, grid.phi[:, None, None], grid.theta[None, :, None], grid.r[None, None, :], model="exact").reshape(-1, SYSTEM.N)
    exact = [1 / (1 - (U[b, :, -k:].mH @ ax.T).abs().square().sum(0)) for b, k in enumerate(K.tolist())]
    assert torch.allclose(E.spectrum(R, SYSTEM, grid, "music", K=K, model="exact").reshape(2, -1), torch.stack(exact), rtol=1e-8)
    assert not torch.allclose(torch.stack(exact), torch.stack(music), rtol=1e-3)


@pytest.mark.parametrize("model", ["separable", "exact"])
@pytest.mark.parametrize("method", ["music", "mvdr"])
def test_noise_free_r_true_sources_recovered(method, model):
    """20 scenes, K = 1..5 four times each, default grid. Under the separable model (the grid's own) every grid
    peak is within one grid step of its source in phi, theta and 1/r; under either model refinement (with the
    system's model) brings every error below 1e-3 deg and 1e-3 relative range: the separable grid only starts it."""
    Ks = [1, 2, 3, 4, 5] * 4
    system = SYSTEM.replace(steering_model=model)
    phi, theta, r, power, mask, R = _scenes(system, Ks, seed=11)
    grid = Grid.default(system)
    est = E.localise(R.to(torch.complex64), system, grid, method, K=torch.tensor(Ks))
    step = grid.steps()
    for b, K in enumerate(Ks):
        assert est.mask[b].sum() == K
        truth = torch.stack((phi[b, :K], theta[b, :K], r[b, :K]), -1).numpy()
        rows, cols = M.match(torch.stack((est.grid_phi[b], est.grid_theta[b], est.grid_r[b]), -1)[:K].numpy(), truth)
        g = torch.stack((est.grid_phi[b], est.grid_theta[b], 1 / est.grid_r[b]), -1)[:K][rows]
        t = torch.stack((phi[b, :K], theta[b, :K], 1 / r[b, :K]), -1)[cols]
        if model == "separable":
            assert ((g - t).abs() <= step * 1.0001).all(), (b, K, ((g - t) / step).tolist())
        rows, cols = M.match(torch.stack((est.phi[b], est.theta[b], est.r[b]), -1)[:K].numpy(), truth)
        err = np.abs(torch.stack((est.phi[b], est.theta[b], est.r[b]), -1)[:K].numpy()[rows] - truth[cols])
        assert np.degrees(err[:, :2]).max() < 1e-3 and (err[:, 2] / truth[cols, 2]).max() < 1e-3, (b, K, err)


def _close_pairs(system: SystemConfig, n: int, seed: int):
    """n scenes of two sources closer than a beamwidth: the second offset from the first by 0.025-0.06 in
    direction cosines (u = sin(phi) cos(theta), v = sin(theta); the half-power beamwidth is ~0.15), at
    independent ranges 1-9 m. Returns phi, theta, r [n,2] float64 and the noise-free R_true [n,N,N] complex64."""
    rng = np.random.default_rng(seed)
    phi1, th1 = rng.uniform(-0.8, 0.8, n), rng.uniform(-0.4, 0.4, n)
    ang, sep = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.025, 0.06, n)
    v2 = np.sin(th1) + sep * np.sin(ang)
    th2 = np.arcsin(v2)
    phi2 = np.arcsin((np.sin(phi1) * np.cos(th1) + sep * np.cos(ang)) / np.cos(th2))
    phi, theta = torch.tensor(np.stack([phi1, phi2], 1)), torch.tensor(np.stack([th1, th2], 1))
    r = torch.tensor(rng.uniform(1.0, 9.0, (n, 2)))
    A = steering(system, phi, theta, r)
    R = torch.einsum("bkn,bk,bkm->bnm", A, pathloss(system, r).to(A.dtype), A.conj()).to(torch.complex64)
    return phi, theta, r, R


def _max_phi_error_deg(est, phi, theta, r) -> np.ndarray:
    """Per scene, the largest |phi error| in degrees over the Hungarian pairs."""
    out = []
    for b in range(len(phi)):
        i, j = M.match(torch.stack((est.phi[b], est.theta[b], est.r[b]), -1).numpy(), torch.stack((phi[b], theta[b], r[b]), -1).numpy())
        out.append(np.degrees(np.abs(est.phi[b].numpy()[i] - phi[b].numpy()[j])).max())
    return np.array(out)


def test_music_separates_two_sources_that_share_one_grid_peak():
    """Notebook 05's ~10 deg RMSE on noise-free R_true (issue item 3): two sources closer than two 2-deg grid
    steps give one local maximum of the gridded MUSIC spectrum, so the K largest local maxima include a
    sidelobe (spectrum ~1.2 against >= 20 at real peaks) that the Hungarian matching pairs with the missed
    source. Shown here on 12 such pairs (|a_1^H a_2|^2 = 0.3-0.8): the single-scan peak picking misses one
    source by more than 2 deg in at least 3 of them; RAP-MUSIC (the default) recovers every source to 1e-3 deg."""
    phi, theta, r, R = _close_pairs(SYSTEM, 12, seed=3)
    grid = Grid.default(SYSTEM)
    single = _max_phi_error_deg(E.localise(R, SYSTEM, grid, K=2, sequential=False), phi, theta, r)
    assert (single > 2.0).sum() >= 3, single
    rap = _max_phi_error_deg(E.localise(R, SYSTEM, grid, K=2), phi, theta, r)
    assert rap.max() < 1e-3, rap


def test_notebook_05_default_noise_free_r_true_is_exact_at_every_snr():
    """The default run of notebook 05 (default system, SNRs -5..20, 16 scenes per SNR, seed + i): MUSIC on the
    noise-free R_true with the true K finds every source to 1e-3 deg at every SNR (the SNR does not enter
    R_true; before the fix the -5 and 0 dB scenes, which hold close pairs, scored ~10 deg)."""
    out = localisation_vs_snr(SYSTEM, [-5.0, 0.0, 5.0, 10.0, 20.0], 16, {"R_true": lambda b: b.R_true}, seed=0)
    res = out["covariances"]["R_true"]
    assert max(res["rmse_phi_deg"]) < 1e-3 and max(res["rmse_theta_deg"]) < 1e-3, res
    assert res["recall"] == [1.0] * 5


def test_k_estimated_on_noise_free_r_true():
    Ks = [1, 2, 3, 4, 5]
    *_, R = _scenes(SYSTEM, Ks, seed=5)
    for method in ("mdl", "aic"):
        assert E.count_sources(R.to(torch.complex64), 16, method).tolist() == Ks
    est = E.localise(R.to(torch.complex64), SYSTEM, Grid.uniform(SYSTEM, 31, 16, 8), K=None, refine=False)
    assert est.K.tolist() == Ks and est.mask.sum(1).tolist() == Ks


# ---------------------------------------------------------------------------------------------
# Source counting
@pytest.mark.parametrize("method", ["mdl", "aic"])
def test_mdl_aic_count_sources_from_ris_domain_snapshots(method):
    """Direct RIS-domain snapshots x_l = sum_k sqrt(p_k) a_k s_kl + n_l, n = 1000 >= N snapshots, white noise
    10 dB below the weakest source's power per element: the sample covariance's count equals K."""
    Ks = [1, 2, 3, 4, 5] * 2
    phi, theta, r, power, mask, _ = _scenes(SYSTEM, Ks, seed=7)
    n = 1000
    g = torch.Generator().manual_seed(0)
    A = steering(SYSTEM, phi, theta, r) * mask[..., None]
    sigma2 = torch.where(mask, power, torch.full_like(power, math.inf)).min(1).values / 10.0
    X = torch.einsum("bkn,bk,bkl->bnl", A, power.sqrt().to(A.dtype), _cn(g, len(Ks), A.shape[1], n))
    X = X + sigma2.sqrt()[:, None, None] * _cn(g, len(Ks), SYSTEM.N, n)
    R = X @ X.mH / n
    assert E.count_sources(R, n, method).tolist() == Ks


def test_information_criteria_match_their_definition():
    lam = torch.tensor([[5.0, 3.0, 1.1, 1.0, 0.9, 0.95]], dtype=torch.float64)
    ic = E.information_criteria(lam, 50, floor_rel=0.0)
    N = 6
    for k in range(N):
        tail = lam[0].sort(descending=True).values[k:]
        ll = 50 * (N - k) * math.log(tail.mean() / tail.log().mean().exp())
        assert ic["mdl"][0, k].item() == pytest.approx(ll + 0.5 * k * (2 * N - k) * math.log(50), rel=1e-10)
        assert ic["aic"][0, k].item() == pytest.approx(2 * ll + 2 * k * (2 * N - k), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Cramer-Rao bound
SMALL = SystemConfig(N_H=4, N_V=4, M=4, L=6, K_min=2, K_max=2)


def _expected_loglik(system, H, codes, theta_vec, C0):
    """E[log p(y; theta)] under y ~ CN(0, C0) up to a constant: -sum_l [logdet C_l + tr(C_l^-1 C0_l)], [B]."""
    phi, th, r, p, s2 = theta_vec[:, 0:2], theta_vec[:, 2:4], theta_vec[:, 4:6], theta_vec[:, 6:8], theta_vec[:, 8]
    A = steering(system, phi, th, r)
    b = torch.einsum("blmn,bkn->blkm", measurement_matrices(H, codes), A)
    C = torch.einsum("bk,blkm,blkn->blmn", p.to(b.dtype), b, b.conj()) + s2[:, None, None, None] * torch.eye(system.M, dtype=b.dtype)
    if C0 is None:
        return C
    return -(torch.linalg.slogdet(C)[1] + torch.linalg.solve(C, C0).diagonal(dim1=-2, dim2=-1).sum(-1).real).sum(-1)


@pytest.mark.parametrize("model", STEERING_MODELS)
def test_fisher_information_matches_finite_difference_hessian(model):
    """The Fisher matrix equals minus the Hessian of the expected log-likelihood at the truth; the Hessian is
    taken by central finite differences of the exact expression, no autograd and no Slepian-Bangs. Under every
    steering model (the bound follows the system's model)."""
    system = SMALL.replace(steering_model=model)
    batch = simulate(system, 2, seed=4)
    H, codes = batch.H.to(torch.complex128), batch.codes.to(torch.complex128)
    th0 = torch.cat([batch.phi, batch.theta, batch.r, batch.power, batch.noise_var[:, None]], 1).to(torch.float64)
    C0 = _expected_loglik(system, H, codes, th0, None)
    Fim = LK.fisher_information(system, H, codes, batch.phi, batch.theta, batch.r, batch.power, batch.noise_var, batch.mask, nuisance=True)
    # fisher order: (phi_k, theta_k, r_k) for each k, then p_1, p_2, sigma^2; th0 order: phi_1 phi_2 theta_1 theta_2 r_1 r_2 p_1 p_2 s2
    perm = [0, 2, 4, 1, 3, 5, 6, 7, 8]
    P = th0.shape[1]
    Hs = torch.zeros(2, P, P, dtype=torch.float64)
    for s in range(2):
        h = 1e-4 / Fim[s].diagonal()[torch.tensor(perm).argsort()].sqrt()  # steps of 1e-4 of each parameter's own scale (only the step size uses Fim)
        pairs = [(i, j) for i in range(P) for j in range(i, P)]
        signs = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float64)
        steps = torch.zeros(len(pairs), 4, P, dtype=torch.float64)
        for n, (i, j) in enumerate(pairs):
            steps[n, :, i] += signs[:, 0] * h[i]
            steps[n, :, j] += signs[:, 1] * h[j]
        E_ = len(pairs) * 4
        Hs_, codes_ = H[s : s + 1].expand(E_, -1, -1), codes[s : s + 1].expand(E_, -1, -1)
        f = _expected_loglik(system, Hs_, codes_, th0[s] + steps.reshape(E_, P), C0[s : s + 1])
        f = f.reshape(len(pairs), 4)
        for n, (i, j) in enumerate(pairs):
            Hs[s, i, j] = Hs[s, j, i] = (f[n, 0] - f[n, 1] - f[n, 2] + f[n, 3]) / (4 * h[i] * h[j])
    fd = -Hs[:, perm][:, :, perm]
    d = Fim.diagonal(dim1=-2, dim2=-1).sqrt()
    rel = (Fim - fd).abs() / (d[:, :, None] * d[:, None, :])
    assert rel.max() < 1e-4, rel.max()
    # the nuisance bound is never below the known-parameter bound
    known = LK.crb_for(batch, system, nuisance=False)
    unknown = LK.crb_for(batch, system, nuisance=True)
    assert (unknown >= known * (1 - 1e-9)).all()


def test_crb_matches_monte_carlo_ml_variance_at_high_snr():
    """One source, 4 x 4 RIS, M = 8, L = 128 snapshots (one RIS code each), 20 dB SNR, known power and noise.
    ML by Fisher scoring from the true location on 400 independent snapshot sets; the empirical variance of
    each coordinate is within [0.75, 1.35] of the CRB (the sampling spread of a 400-sample variance is ~7 %)."""
    system = SystemConfig(N_H=4, N_V=4, M=8, L=128, K_min=1, K_max=1)
    scene = simulate(system, 1, seed=2)
    H, codes = scene.H.to(torch.complex128), scene.codes.to(torch.complex128)
    truth = torch.tensor([[math.radians(20.0), math.radians(10.0), 1.5]], dtype=torch.float64)
    p = torch.tensor([[1e-3]], dtype=torch.float64)
    G = measurement_matrices(H, codes)[0]  # [L,M,N]
    b0 = G @ steering(system, *truth[0])
    s2 = (p[0, 0] * b0.abs().square().sum() / b0.numel() / 10 ** (20 / 10)).reshape(1)
    T = 400
    gen = torch.Generator().manual_seed(1)
    y = p.sqrt() * b0 * _cn(gen, T, system.L, 1) + s2.sqrt() * _cn(gen, T, system.L, system.M)  # [T,L,M]

    def loglik(x):  # [T,3] -> [T]; rank-one C_l = p b b^H + s2 I by the matrix determinant lemma and Sherman-Morrison
        b = torch.einsum("lmn,tn->tlm", G, steering(system, x[:, 0], x[:, 1], x[:, 2]))
        nb = b.abs().square().sum(-1)
        proj = (b.conj() * y).sum(-1).abs().square()
        return -(torch.log1p(p * nb / s2) + (y.abs().square().sum(-1) - p * proj / (s2 + p * nb)) / s2).sum(-1)

    Fim = LK.fisher_information(system, H, codes, truth[:, 0:1], truth[:, 1:2], truth[:, 2:3], p, s2, nuisance=False)[0]
    x = truth.expand(T, 3).clone()
    for _ in range(10):
        x.requires_grad_(True)
        (score,) = torch.autograd.grad(loglik(x).sum(), x)
        x = (x + torch.linalg.solve(Fim, score.T).T).detach()
    assert (torch.linalg.solve(Fim, score.T).T.abs() < 1e-3 * torch.diag(torch.linalg.inv(Fim)).sqrt()).float().mean() > 0.95
    crb = LK.crb(system, H, codes, truth[:, 0:1], truth[:, 1:2], truth[:, 2:3], p, s2, nuisance=False)[0, 0]
    ratio = ((x - truth).square().mean(0) / crb).tolist()
    assert all(0.75 < q < 1.35 for q in ratio), ratio


# ---------------------------------------------------------------------------------------------
# Matching and metrics
def test_hungarian_more_fewer_and_no_predictions():
    true = np.array([[0.0, 0.0, 2.0], [0.5, 0.1, 5.0]])
    more = np.array([[0.51, 0.1, 5.1], [-0.9, -0.4, 9.0], [0.01, 0.0, 2.2]])
    i, j = M.match(more, true)
    assert sorted(zip(j.tolist(), i.tolist())) == [(0, 2), (1, 0)]  # every true source matched, none dropped
    fewer = np.array([[0.49, 0.1, 5.0]])
    i, j = M.match(fewer, true)
    assert i.tolist() == [0] and j.tolist() == [1]
    for a, b in ((np.zeros((0, 3)), true), (more, np.zeros((0, 3)))):
        i, j = M.match(a, b)
        assert len(i) == len(j) == 0


def _cost(pred, true, tol, pairs) -> float:
    return sum(np.linalg.norm((pred[a] - true[b]) / tol) for a, b in pairs)


def test_hungarian_is_the_minimum_cost_assignment():
    rng = np.random.default_rng(0)
    tol = np.array([math.radians(5), math.radians(5), 1.0])
    for P, T in ((5, 3), (3, 5), (4, 4)):
        pred, true = rng.normal(size=(P, 3)), rng.normal(size=(T, 3))
        i, j = M.match(pred, true)
        assert len(i) == min(P, T)
        perms = itertools.permutations(range(max(P, T)), min(P, T))
        best = min(_cost(pred, true, tol, zip(perm, range(T)) if P >= T else zip(range(P), perm)) for perm in perms)
        assert _cost(pred, true, tol, zip(i, j)) == pytest.approx(best)


def test_match_metrics_counts_and_rmse():
    """Scene 0: 3 predicted, 2 true (one miss-located by 10 deg); scene 1: nothing predicted, 1 true."""
    d = math.radians(1.0)
    est = E.Localisation(
        phi=torch.tensor([[0.0 + d, 0.5 + 10 * d, -1.0], [0.0, 0.0, 0.0]]),
        theta=torch.zeros(2, 3), r=torch.tensor([[2.0, 5.0, 8.0], [1.0, 1.0, 1.0]]),
        mask=torch.tensor([[True, True, True], [False, False, False]]), K=torch.tensor([3, 0]), value=torch.zeros(2, 3),
        grid_phi=torch.zeros(2, 3), grid_theta=torch.zeros(2, 3), grid_r=torch.zeros(2, 3),
    )
    true_phi, true_r = torch.tensor([[0.0, 0.5], [0.3, 0.0]]), torch.tensor([[2.0, 5.0], [3.0, 1.0]])
    m = M.match_metrics(est, true_phi, torch.zeros(2, 2), true_r, torch.tensor([[True, True], [True, False]]))
    assert (m["tp"], m["n_pred"], m["n_true"], m["n_matched"]) == (1, 3, 3, 2)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(2 / 6)
    assert m["rmse_phi_deg"] == pytest.approx(math.sqrt((1 + 100) / 2), rel=1e-5) and m["rmse_r_m"] == 0.0
    assert m["rmse_detected_phi_deg"] == pytest.approx(1.0, rel=1e-5)  # only the source found within 5 deg
    assert m["k_accuracy"] == 0.0
    m = M.match_metrics(est, true_phi, torch.zeros(2, 2), true_r, torch.tensor([[True, True], [True, False]]), {"phi_deg": 11.0})
    assert m["tp"] == 2 and m["rmse_detected_phi_deg"] == pytest.approx(m["rmse_phi_deg"])
    far = M.match_metrics(est, true_phi + 1.0, torch.zeros(2, 2), true_r, torch.tensor([[True, True], [True, False]]))
    assert far["tp"] == 0 and math.isnan(far["rmse_detected_phi_deg"])


# ---------------------------------------------------------------------------------------------
# Bad input
def test_bad_input_fails_clearly():
    pm = math.radians(SYSTEM.phi_max_deg)
    ok = torch.tensor([0.0])
    for field_, grid in (
        ("grid.phi", Grid(torch.tensor([-pm, pm + 0.01]), ok, torch.tensor([2.0]))),
        ("grid.theta", Grid(ok, torch.tensor([math.radians(31.0)]), torch.tensor([2.0]))),
        ("grid.r", Grid(ok, ok, torch.tensor([0.4, 2.0]))),
    ):
        with pytest.raises(ConfigError, match=field_):
            grid.validate(SYSTEM)
        with pytest.raises(ConfigError, match=field_):
            E.mvdr_spectrum(torch.eye(SYSTEM.N, dtype=torch.complex64), SYSTEM, grid)
    with pytest.raises(ConfigError, match="grid.r"):
        Grid(ok, ok, torch.tensor([3.0, 2.0]))  # not increasing
    R = torch.eye(SYSTEM.N, dtype=torch.complex64)[None]
    small = Grid.uniform(SYSTEM, 3, 3, 2)
    with pytest.raises(ConfigError, match=r"K: value 144 in scene 0 is out of range: allowed 0\.\.143"):
        E.music_spectrum(R, SYSTEM, 144, small)
    with pytest.raises(ConfigError, match="K"):
        E.localise(R, SYSTEM, small, K=-1)
    with pytest.raises(ConfigError, match="K: MUSIC needs"):
        E.spectrum(R, SYSTEM, small, "music")
    bad = R.clone()
    bad[0, 0, 1] = 0.5
    with pytest.raises(ConfigError, match="not Hermitian"):
        E.localise(bad, SYSTEM, small, K=1)
    with pytest.raises(ConfigError, match=r"shape \[B, 144, 144\]"):
        E.localise(R[:, :10, :10], SYSTEM, small, K=1)
    with pytest.raises(ConfigError, match="method"):
        E.spectrum(R, SYSTEM, small, "capon")
    with pytest.raises(ConfigError, match="n_snapshots"):
        E.count_sources(R, 0)
    with pytest.raises(ConfigError, match="tolerances.r_m"):
        M.match(np.zeros((1, 3)), np.zeros((1, 3)), {"r_m": -1.0})
    b = simulate(SMALL.replace(coherent=True), 1)
    with pytest.raises(ConfigError, match="coherent"):
        LK.crb_for(b, SMALL.replace(coherent=True))


# ---------------------------------------------------------------------------------------------
# Evaluation for the notebook
def test_localisation_vs_snr_returns_plain_json_ready_results():
    system = SystemConfig(N_H=6, N_V=6, K_max=2, phi_max_deg=45.0, theta_max_deg=20.0)
    grid = Grid.uniform(system, 19, 9, 6)
    out = localisation_vs_snr(system, [-10.0, 30.0], 4, {"R_true": lambda b: b.R_true}, method="mvdr", grid=grid, seed=1)
    json.dumps(out, allow_nan=False)
    assert out["snr_db"] == [-10.0, 30.0] and set(out["covariances"]) == {"R_true"}
    res = out["covariances"]["R_true"]
    assert all(len(v) == 2 for v in res.values())
    assert res["k_accuracy"] == [1.0, 1.0]  # noise-free R_true: MDL counts the rank at any SNR
    assert all(q > out["sqrt_crb"]["phi_deg"][1] for q in out["sqrt_crb"]["phi_deg"][:1])
    with pytest.raises(ConfigError, match="covariances"):
        localisation_vs_snr(system, [0.0], 1, {})


def test_localisation_sources_offers_the_physics_baseline():
    """notebook 05's sources with physics_k: the ML covariance (rank K) localised by MUSIC with the true K finds
    well-separated sources at 30 dB to well under a degree (6 x 6 RIS, K = 1..2, r 1-4 m)."""
    cfg = ExperimentConfig(system=SystemConfig(N_H=6, N_V=6, K_max=2, r_min_m=1.0, r_max_m=4.0))
    sources = localisation_sources(cfg, [], physics_k="true")
    assert set(sources) == {"R_true", "physics[ML]"}
    out = localisation_vs_snr(cfg.system, [30.0], 6, {"physics[ML]": sources["physics[ML]"]}, grid=Grid.default(cfg.system, 4.0, 8), seed=3)
    res = out["covariances"]["physics[ML]"]
    assert res["recall"] == [1.0] and res["rmse_phi_deg"][0] < 0.5 and res["rmse_theta_deg"][0] < 0.5, res
    with pytest.raises(ConfigError, match="physics_k"):
        localisation_sources(cfg, [], physics_k="oracle")


def test_a_source_with_its_own_count_is_scored_and_localised_with_it():
    """A source returning (R, K_hat) is scored on K_hat (here the true K plus one, capped: accuracy 0 where K < K_max)
    and, without use_true_k, localised with it; a plain source is counted by MDL."""
    system = SystemConfig(N_H=6, N_V=6, K_max=3)
    grid = Grid.default(system, 4.0, 6)
    plus_one = lambda b: (b.R_true, (b.K + 1).clamp(max=system.K_max))  # noqa: E731
    out = localisation_vs_snr(system, [20.0], 6, {"own": plus_one, "plain": lambda b: b.R_true}, grid=grid, seed=2, use_true_k=False)
    assert out["k_source"] == {"own": "own", "plain": "mdl"}
    from workbench.studies.localisation import snr_batch

    K = snr_batch(system, 20.0, 6, 2).K
    assert out["covariances"]["own"]["k_accuracy"][0] == pytest.approx(float((K == system.K_max).double().mean()))
    assert out["covariances"]["plain"]["k_accuracy"][0] == 1.0  # MDL on the exact, noise-free R_true


def test_scene_spectrum_marks_the_true_and_estimated_sources():
    """The spectrum views of one scene from the exact R_true: the estimates are the true sources, the phi-theta map
    peaks (0 dB) at the strongest estimate, the range cut peaks at its range; a bad scene index is refused."""
    from workbench.studies.localisation import scene_spectrum, snr_scene

    system = SystemConfig(N_H=6, N_V=6, K_max=2)
    view = scene_spectrum(system, snr_scene(system, 20.0, 4, 7, 1), "R_true", lambda b: b.R_true, step_deg=1.0, n_r=48, scene=1)
    assert view["K"] == view["K_used"] == len(view["true"]) == len(view["estimated"])
    for est in view["estimated"]:
        assert min(abs(est["phi_deg"] - t["phi_deg"]) + abs(est["theta_deg"] - t["theta_deg"]) for t in view["true"]) < 1e-2
    grid = np.array(view["map_db"])  # [theta, phi]
    assert grid.shape == (len(view["theta_deg"]), len(view["phi_deg"])) and grid.max() == 0.0
    t, p = np.unravel_index(grid.argmax(), grid.shape)
    assert abs(view["phi_deg"][p] - view["at"]["phi_deg"]) <= 1.0 and abs(view["theta_deg"][t] - view["at"]["theta_deg"]) <= 1.0
    q = int(np.argmax(view["cut_db"]))
    assert abs(1 / view["r_m"][q] - 1 / view["at"]["r_m"]) <= 2 * abs(1 / view["r_m"][0] - 1 / view["r_m"][1])
    json.dumps(view, allow_nan=False)
    with pytest.raises(ConfigError, match="scene = 4: expected an integer in 0..3"):
        snr_scene(system, 20.0, 4, 7, 4)


def test_snr_scene_is_the_scene_localisation_vs_snr_used():
    """snr_scene(..., scene, snr_index) is scene ``scene`` of the batch localisation_vs_snr localised at its
    snr_index-th SNR (the seed rule snr_scene_seed), and the spectrum of one scene needs only that scene."""
    from workbench.studies.localisation import scene_spectrum, snr_scene, snr_scene_seed

    system = SystemConfig(N_H=4, N_V=4, K_max=2)
    seen = []

    def record(b):
        seen.append(b)
        return b.R_true

    localisation_vs_snr(system, [0.0, 20.0], 3, {"R_true": record}, grid=Grid.default(system, 8.0, 4), seed=5)
    assert len({snr_scene_seed(5, 0), snr_scene_seed(5, 1), snr_scene_seed(5, 1, "test"), snr_scene_seed(6, 1)}) == 4  # own stream each
    for i, snr in enumerate((0.0, 20.0)):
        for scene in range(3):
            one = snr_scene(system, snr, 3, 5, scene, snr_index=i)
            assert len(one) == 1 and torch.equal(one.y[0], seen[i].y[scene]) and torch.equal(one.R_true[0], seen[i].R_true[scene])
    sizes = []
    view = scene_spectrum(system, snr_scene(system, 20.0, 3, 5, 2, snr_index=1), "R_true", lambda b: sizes.append(len(b)) or b.R_true,
                          step_deg=4.0, n_r=8, scene=2)
    assert sizes == [1] and view["scene"] == 2 and view["snr_db"] == 20.0


@pytest.mark.parametrize("model", STEERING_MODELS)
def test_the_refinement_objective_derivatives_are_autograds(model):
    """refine_peaks' gradient and Hessian in closed form (:func:`refinement._objective_derivatives`) equal autograd's
    double backward through the objective, for MUSIC, RAP-MUSIC (with found vectors Q, including a slot on a found
    vector, where the correlation is 0 with zero derivatives) and MVDR, under every steering model."""
    system = SystemConfig(N_H=6, N_V=5, steering_model=model)
    scale = Grid.default(system).steps()
    g = torch.Generator().manual_seed(2)
    B, Kp, N = 3, 2, system.N
    F = torch.linalg.qr(torch.randn(B, N, 3, dtype=torch.complex128, generator=g))[0]
    x = torch.stack([torch.rand(B, Kp, generator=g) - 0.5, torch.rand(B, Kp, generator=g) - 0.5,
                     torch.rand(B, Kp, generator=g) * 0.5 + 0.2], -1).double()
    found = steering(system, x[:, 0, 0], x[:, 0, 1], 1.0 / x[:, 0, 2])[..., None]  # slot 0 sits on a found vector
    Q = torch.cat([found, torch.linalg.qr(torch.randn(B, N, 1, dtype=torch.complex128, generator=g))[0] * 0.3], -1)
    u = x / scale
    for method, QQ in (("music", None), ("music", Q), ("mvdr", None)):
        uu = u.clone().requires_grad_(True)
        f = RF._objective(F, system, uu, scale, method, QQ)
        (grad,) = torch.autograd.grad(f.sum(), uu)
        full = torch.autograd.functional.hessian(lambda v: RF._objective(F, system, v, scale, method, QQ).sum(), u)  # noqa: B023
        hess = torch.stack([torch.stack([full[b, k, :, b, k, :] for k in range(Kp)]) for b in range(B)])  # each slot's own
        f2, g2, h2 = RF._objective_derivatives(F, system, u, scale, method, QQ)
        torch.testing.assert_close(f2, f.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g2, grad.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h2, hess, rtol=1e-10, atol=1e-12)
        if QQ is not None:
            assert (f2[:, 0] == 1.0).all() and (g2[:, 0] == 0).all() and (h2[:, 0] == 0).all()
            assert (g2[:, 1] != 0).any()


def test_the_joint_refinement_derivatives_are_autograds():
    """joint_subspace_refine's gradient and Hessian of ||P_A^perp E||_F^2 in closed form (variable projection,
    :func:`refinement._subspace_derivatives`) equal autograd's, with three, two and one valid slots, under every
    steering model; up to the Gram matrix's 1e-12 ridge."""
    g = torch.Generator().manual_seed(4)
    for model in STEERING_MODELS:
        system = SystemConfig(N_H=6, N_V=5, steering_model=model)
        scale = Grid.default(system).steps()
        B, kp = 3, 3
        Es = torch.linalg.qr(torch.randn(B, system.N, 3, dtype=torch.complex128, generator=g))[0]
        x = torch.stack([torch.rand(B, kp, generator=g) - 0.5, torch.rand(B, kp, generator=g) - 0.5,
                         torch.rand(B, kp, generator=g) * 0.5 + 0.2], -1).double()
        valid = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
        u = x / scale
        f_of = lambda v: RF._subspace_residual(Es, system, v, scale, valid).sum()  # noqa: E731, B023
        uu = u.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f_of(uu), uu)
        full = torch.autograd.functional.hessian(f_of, u)  # [B,kp,3,B,kp,3]
        hess = torch.stack([full[b, :, :, b].reshape(3 * kp, 3 * kp) for b in range(B)])
        f2, g2, h2 = RF._subspace_derivatives(Es, system, u, scale, valid)
        torch.testing.assert_close(f2.sum(), f_of(u), rtol=1e-12, atol=0)
        torch.testing.assert_close(g2, grad.reshape(B, 3 * kp), rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(h2, hess, rtol=1e-8, atol=1e-11)
