"""The registries of implementations (R_samp estimators, gap and subspace backends) are the config's lists of names,
their declarations are what the code does, and the matched filter exists once."""

from __future__ import annotations

import pytest
import torch

from workbench import config, estimators, likelihood, matched_filter, ml_fit, spectral
from workbench import covariance as cov
from workbench.checks import check_registry
from workbench.config import ConfigError, ExperimentConfig, SystemConfig
from workbench.covariance import Factored, trace_normalise
from workbench.estimators import ESTIMATORS, beamscan_covariance, oracle_knowledge, sample_covariance
from workbench.grid import Grid
from workbench.physics import measurement_matrices, simulate

SMALL = SystemConfig(N_H=6, N_V=5, M=8, L=8, K_min=1, K_max=2)


# ------------------------------------------------------------------------------------------ registries = config names
@pytest.mark.parametrize("registry, names", [
    (estimators.ESTIMATORS, config.SAMPLE_ESTIMATORS),
    (spectral.GAP_BACKENDS, config.GAP_BACKENDS),
    (spectral.SUBSPACE_BACKENDS, config.SUBSPACE_BACKENDS),
])
def test_every_registry_is_its_config_tuple_in_order(registry, names):
    assert tuple(registry) == names
    with pytest.raises(TypeError):
        registry["new"] = None  # read-only: the registry is changed in its module, nowhere else


def test_a_registry_that_differs_from_config_fails_at_import_naming_the_difference():
    with pytest.raises(ImportError, match=r"in R only: \['x'\]; in C only: \['b'\]"):
        check_registry("R", {"a": 1, "x": 2}, "C", ("a", "b"))
    with pytest.raises(ImportError, match="different order"):
        check_registry("R", {"b": 1, "a": 2}, "C", ("a", "b"))
    check_registry("R", {"a": 1, "b": 2}, "C", ("a", "b"))


# ------------------------------------------------------------------------------------------ estimator declarations
@pytest.fixture(scope="module")
def scenes():
    return SMALL, simulate(SMALL, 3, seed=2)


@pytest.mark.parametrize("name", config.SAMPLE_ESTIMATORS)
def test_each_estimator_reads_exactly_the_oracle_it_declares(scenes, name):
    """No oracle declared: runs with noise_var=None and ignores a given one. The noise variance declared: refuses
    None (ConfigError naming noise_var) and its result depends on the value given."""
    system, b = scenes
    run = lambda nv: sample_covariance(b.y, (b.H, b.codes), name, system.ridge, nv, rank=system.K_max, system=system)  # noqa: E731
    entry = ESTIMATORS[name]
    assert entry.oracle in ((), (estimators.NOISE_VARIANCE,))
    if not entry.oracle:
        R = run(None)
        assert R.shape == (3, system.N, system.N) and torch.isfinite(R).all()
        assert torch.equal(run(100.0 * b.noise_var), R)
        assert oracle_knowledge(name) == "none"
    else:
        with pytest.raises(ConfigError, match="noise_var"):
            run(None)
        assert not torch.allclose(run(b.noise_var), run(100.0 * b.noise_var))
        assert oracle_knowledge(name) == "true noise variance"


@pytest.mark.parametrize("name", config.SAMPLE_ESTIMATORS)
def test_each_estimator_needs_the_system_it_declares(scenes, name):
    system, b = scenes
    run = lambda: sample_covariance(b.y, (b.H, b.codes), name, system.ridge, b.noise_var, rank=system.K_max)  # noqa: E731
    if ESTIMATORS[name].needs_system:
        with pytest.raises(ConfigError, match="system"):
            run()
        assert ESTIMATORS[name].steering_model == "separable"
    else:
        assert torch.isfinite(run()).all() and ESTIMATORS[name].steering_model is None
    assert ESTIMATORS[name].summary and "\n" not in ESTIMATORS[name].summary


def test_unknown_estimator_fails_clearly():
    with pytest.raises(ConfigError, match="rsamp_estimator = 'music'.*'seed'"):
        oracle_knowledge("music")


def test_oracle_knowledge_feeds_the_compare_and_baseline_rows(monkeypatch):
    from workbench.studies import baselines, compare

    base = ExperimentConfig().to_dict()
    for name in config.SAMPLE_ESTIMATORS:
        cfg = {**base, "model": {**base["model"], "rsamp_input": True}, "fixes": {**base["fixes"], "rsamp_estimator": name}}
        knows = oracle_knowledge(name)
        assert compare._entry_oracle(cfg) == ("none" if knows == "none" else f"{knows} ({name} R_samp)")
        unused = {**cfg, "model": {**cfg["model"], "rsamp_input": False}, "fixes": {**cfg["fixes"], "beta": 0.0}}
        assert compare._entry_oracle(unused) == "none"  # R_samp not used: nothing known through it
    from workbench.studies import localisation as study_localisation  # run_oracle, which compare's rows use, reads the registry

    monkeypatch.setattr(study_localisation, "oracle_knowledge", lambda est: "the registry's word")
    cfg = {**base, "model": {**base["model"], "rsamp_input": True}}
    assert compare._entry_oracle(cfg) == f"the registry's word ({cfg['fixes']['rsamp_estimator']} R_samp)"
    assert baselines.ORACLE["beamscan_scaled"] == f"{oracle_knowledge('beamscan')} (beamscan power fit)"
    assert baselines.ORACLE["beamscan_affine"] == baselines.ORACLE["beamscan_scaled"]
    assert baselines.ORACLE["beamscan_est_affine"].startswith(oracle_knowledge("beamscan_est") + " ")


def test_search_space_choices_are_filters_on_the_registries():
    from workbench.search_space import DEFAULT_SPACE

    assert DEFAULT_SPACE["fixes.gap_backend"] == ["eigh", "svd", "svd_flipped", "eigvalsh", "exact"]
    assert DEFAULT_SPACE["fixes.subspace_backend"] == ["eigh", "detach", "lorentzian", "safe"]
    assert DEFAULT_SPACE["fixes.rsamp_estimator"] == ["seed", "ls_scatter", "covariance_matching"]


# ------------------------------------------------------------------------------------------ backend declarations
def _factored(seed: int = 0, B: int = 2, N: int = 10):
    """F [B,N,3] (orthogonal columns, powers 4, 3, 2), R = F F^H + I: a loaded rank-3 matrix whose N - 3 noise
    eigenvalues are exactly equal; and a PSD matrix [B,N,N] of distinct eigenvalues, randomly rotated."""
    gen = torch.Generator().manual_seed(seed)
    F = torch.zeros(B, N, 3, dtype=torch.complex128)
    F[:, :3, :3] = torch.diag(torch.tensor([4.0, 3.0, 2.0]).sqrt()).to(F.dtype)
    X = torch.randn(B, N, N, dtype=torch.complex128, generator=gen)
    return F, F @ F.mH + torch.eye(N, dtype=torch.complex128), X @ X.mH


@pytest.mark.parametrize("name", config.GAP_BACKENDS)
def test_gap_backend_declarations(name):
    """factored: the value comes from F alone (a wrong R beside it changes nothing); exact: the gradient equals
    eigvalsh's on a non-degenerate matrix; finite: the gradient stays finite on a C_EPS-loaded low-rank matrix."""
    entry = spectral.GAP_BACKENDS[name]
    F, R, full = _factored()
    K = torch.tensor([2, 3])
    right = spectral.eigengap_hinge(Factored(R=R, F=F, shift=1.0), K, margin=100.0, eps_psd=0.0, backend=name)
    wrong = spectral.eigengap_hinge(Factored(R=full, F=F, shift=1.0), K, margin=100.0, eps_psd=0.0, backend=name)
    assert torch.allclose(right, wrong) == entry.factored

    def grad(X, backend):
        X = X.clone().requires_grad_(True)
        spectral.eigengap_hinge(X, K, margin=10.0, eps_psd=0.0, backend=backend).sum().backward()
        return X.grad

    assert torch.allclose(grad(full, name), grad(full, "eigvalsh"), atol=1e-8) == entry.exact
    assert bool(torch.isfinite(grad(R, name)).all()) == entry.finite


@pytest.mark.parametrize("name", config.SUBSPACE_BACKENDS)
def test_subspace_backend_declarations(name):
    entry = spectral.SUBSPACE_BACKENDS[name]
    F, R, full = _factored(seed=1)
    K = torch.tensor([2, 3])
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 10, dtype=torch.complex128, generator=gen)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    run = lambda X: spectral.subspace_energy(X, a, mask, K, backend=name)  # noqa: E731
    assert torch.allclose(run(Factored(R=R, F=F, shift=1.0)), run(Factored(R=full, F=F, shift=1.0))) == entry.factored

    def grad(X, backend):
        X = X.clone().requires_grad_(True)
        spectral.subspace_energy(X, a, mask, K, backend=backend, lorentzian_eps=1.0).sum().backward()  # a visible broadening
        return X.grad

    assert (grad(full, name).abs().max() == 0) == entry.zero_gradient
    assert torch.allclose(grad(full, name), grad(full, "safe"), atol=1e-8) == entry.exact
    assert bool(torch.isfinite(grad(R, name)).all()) == entry.finite


# ------------------------------------------------------------------------------------------ one matched filter
def test_the_matched_filter_is_one_implementation():
    """The formulas live in matched_filter.py; the estimators and the ML fit use those very functions."""
    for module in (ml_fit, estimators):
        for name in ("atom_norms", "scan", "pick", "project_out", "residual_noise_variance"):
            assert getattr(module, name, getattr(matched_filter, name)) is getattr(matched_filter, name), (module.__name__, name)
    assert not any(hasattr(m, n) for m in (likelihood, ml_fit) for n in ("matched_filter_scan", "_residual"))
    for gone in ("sample_covariance", "beamscan_covariance", "ridge_solutions", "rsamp_for", "apply_fix1", "load"):
        assert not hasattr(cov, gone), gone


def test_beamscan_and_the_ml_fit_pick_the_same_point_on_a_noise_free_single_source_scene():
    system = SMALL.replace(K_max=1, snr_db_min=60.0, snr_db_max=60.0)
    grid = Grid.uniform(system, 13, 7, 4)
    b = simulate(system, 3, seed=5)
    idx = torch.tensor([[3, 2, 1], [9, 5, 3], [6, 3, 0]])
    a = grid.vectors(system, idx, torch.complex64)
    x = a[:, :, None] * torch.complex(torch.randn(3, 1, system.L), torch.randn(3, 1, system.L))
    G = measurement_matrices(b.H, b.codes)
    y = (G @ x.mT[..., None])[..., 0]  # [3,L,M], no noise
    R = beamscan_covariance(y, G, None, system, n_sources=1, grid=grid)
    fit = ml_fit.ml_localise(y, b.H, b.codes, system, K=1, grid=grid, iters=1)
    ml_idx = torch.stack([(grid.phi[:, None] - fit.loc.grid_phi[None, :, 0]).abs().argmin(0),
                          (grid.theta[:, None] - fit.loc.grid_theta[None, :, 0]).abs().argmin(0),
                          (grid.r[:, None] - fit.loc.grid_r[None, :, 0]).abs().argmin(0)], -1)
    assert torch.equal(ml_idx, idx)  # the ML fit's first pick is the source's grid point
    v = grid.vectors(system, ml_idx, torch.complex64)
    cos = (v.conj()[:, :, None] * R * v[:, None, :]).sum((-2, -1)).abs() / (torch.linalg.matrix_norm(R) * (v.abs() ** 2).sum(-1))
    assert torch.all(cos > 1 - 1e-4)  # beamscan's covariance is p a a^H at the same point


def test_matched_filter_pieces_against_their_formulas():
    system = SMALL
    grid = Grid.uniform(system, 5, 3, 2)
    b = simulate(system, 2, seed=7)
    G = measurement_matrices(b.H, b.codes)
    table = grid.steering_table(system).reshape(-1, system.N)  # [g,N]
    U = torch.einsum("blmn,gn->blgm", G, table)  # atoms u_lg [B,L,g,M]
    norm2 = U.abs().square().sum(-1)
    assert torch.allclose(matched_filter.atom_norms(system, grid, G, chunk=1), norm2, rtol=1e-5)
    power = ((U.conj() * b.y[:, :, None, :]).sum(-1).abs().square() / norm2).sum(1)
    got = matched_filter.scan(system, grid, G, b.y, matched_filter.atom_norms(system, grid, G))
    assert torch.allclose(got, power, rtol=1e-4)
    assert torch.equal(matched_filter.pick(grid, got), grid.unravel(power.argmax(-1)))
    atoms = U[:, :, :3]  # three atoms per snapshot
    rest = matched_filter.project_out(b.y, atoms)
    assert (atoms.conj() @ rest[..., None]).abs().max() < 1e-4 * b.y.abs().max() * atoms.abs().max()  # orthogonal
    assert torch.equal(matched_filter.project_out(b.y, atoms[:, :, :0]), b.y)
    # in float64 it is the least-squares residual (lstsq's, to rounding), zero atoms take no part, and a second call
    # after other allocations gives the same bits (lstsq on CPU did not)
    y64, a64 = b.y.to(torch.complex128), atoms.to(torch.complex128)
    exact = y64 - (a64.mT @ torch.linalg.lstsq(a64.mT, y64[..., None]).solution)[..., 0]
    rest64 = matched_filter.project_out(y64, a64)
    torch.testing.assert_close(rest64, exact, rtol=0, atol=1e-10 * y64.abs().max().item())
    padded = torch.cat([a64, torch.zeros_like(a64[:, :, :2])], 2)
    torch.testing.assert_close(matched_filter.project_out(y64, padded), rest64, rtol=0, atol=1e-12 * y64.abs().max().item())
    _ = [torch.randn(n, dtype=torch.complex128) for n in (7, 333, 4099)]
    assert torch.equal(matched_filter.project_out(y64.clone(), a64.clone()), rest64)
    nv = matched_filter.residual_noise_variance(rest, 3)
    assert torch.allclose(nv, rest.abs().square().sum((1, 2)) / (system.L * (system.M - 3)))
    assert torch.allclose(matched_filter.residual_noise_variance(rest, system.M + 2), rest.abs().square().sum((1, 2)) / system.L)


def test_normalise_rsamp_is_fix_1():
    system, b = SMALL, simulate(SMALL, 2, seed=1)
    fixes = ExperimentConfig().fixes
    raw = estimators.rsamp_raw(b, fixes.replace(rsamp_normalise=True), system)
    assert torch.allclose(estimators.normalise_rsamp(raw, fixes.replace(rsamp_normalise=True)), trace_normalise(cov.hermitise(raw)))
    assert estimators.normalise_rsamp(raw, fixes.replace(rsamp_normalise=False)) is raw
