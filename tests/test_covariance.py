import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.config import ConfigError, FixConfig, SystemConfig
from workbench.covariance import (
    blend,
    blend_factored,
    blend_pipeline,
    diagonal_load,
    frobenius2,
    hermitise,
    low_rank_factor,
    nmse,
    numerical_rank,
    pipeline,
    spectrum_stats,
    trace,
    trace_normalise,
)
from workbench.estimators import rsamp_for, sample_covariance
from workbench.studies.pipeline import estimator_table

FAST = settings(max_examples=40, deadline=None)


def _complex(seed: int, shape, dtype=torch.complex128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _psd(seed: int, b: int, n: int, rank: int, scale: float = 1.0) -> torch.Tensor:
    F = _complex(seed, (b, n, rank))
    return scale * F @ F.mH


shapes = st.tuples(st.integers(1, 3), st.integers(1, 8))
seeds = st.integers(0, 2**31 - 1)


@FAST
@given(seeds, shapes)
def test_hermitise_is_idempotent_and_hermitian(seed, shape):
    b, n = shape
    R = _complex(seed, (b, n, n))
    H = hermitise(R)
    assert torch.allclose(hermitise(H), H)
    assert torch.allclose(H, H.mH)
    assert torch.allclose(H, (R + R.conj().transpose(-1, -2)) / 2)


@FAST
@given(seeds, shapes, st.floats(1e-8, 1e8), st.one_of(st.none(), st.floats(1e-3, 1e3)))
def test_trace_normalise_hits_its_target(seed, shape, scale, target):
    b, n = shape
    R = _psd(seed, b, n, n, scale) + 1e-3 * scale * torch.eye(n)
    out = trace_normalise(R, target)
    want = n if target is None else target
    assert torch.allclose(trace(out), torch.full((b,), float(want), dtype=torch.float64), rtol=1e-10)
    # it only rescales: the direction of each matrix is unchanged
    assert torch.allclose(out / trace(out)[:, None, None], R / trace(R)[:, None, None])


def test_trace_normalise_floors_a_vanishing_trace():
    out = trace_normalise(torch.zeros(2, 4, 4, dtype=torch.complex64))
    assert torch.isfinite(out).all()


@FAST
@given(seeds, shapes, st.floats(0.0, 1.0))
def test_blend_of_psd_is_psd(seed, shape, beta):
    b, n = shape
    A, B = _psd(seed, b, n, max(1, n // 2)), _psd(seed + 1, b, n, 1, 10.0)
    ev = torch.linalg.eigvalsh(blend(A, B, beta))
    scale = max(torch.linalg.eigvalsh(A).max().item(), torch.linalg.eigvalsh(B).max().item())
    assert (ev >= -1e-10 * scale).all()


def test_blend_rejects_bad_beta_and_shapes():
    A = torch.eye(3, dtype=torch.complex64)[None]
    with pytest.raises(ConfigError, match="beta = 1.5"):
        blend(A, A, 1.5)
    with pytest.raises(ConfigError, match="shapes"):
        blend(A, torch.eye(4, dtype=torch.complex64)[None], 0.3)


@FAST
@given(seeds, shapes, st.floats(0.0, 1e3))
def test_loading_raises_every_eigenvalue_by_c(seed, shape, c):
    b, n = shape
    R = _psd(seed, b, n, max(1, n - 1))
    ev, ev_loaded = torch.linalg.eigvalsh(R), torch.linalg.eigvalsh(diagonal_load(R, c))
    tol = 1e-9 * (1 + c + ev.abs().max().item())
    assert torch.allclose(ev_loaded, ev + c, atol=tol)
    assert torch.allclose(ev_loaded.diff(dim=-1), ev.diff(dim=-1), atol=tol)  # gaps unchanged


def test_loading_by_a_per_matrix_tensor():
    R = _psd(0, 3, 4, 2)
    c = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    assert torch.allclose(torch.linalg.eigvalsh(diagonal_load(R, c)), torch.linalg.eigvalsh(R) + c[:, None])
    with pytest.raises(ConfigError, match="square"):
        diagonal_load(torch.zeros(2, 3, 4), 1.0)


@FAST
@given(seeds, st.integers(2, 10), st.data())
def test_spectrum_stats_against_numpy_scipy(seed, n, data):
    rank = data.draw(st.integers(1, n))
    K = data.draw(st.integers(1, n - 1))
    R = _psd(seed, 2, n, rank)
    s = spectrum_stats(R, K=K)
    for i in range(2):
        Ri = R[i].numpy()
        ev = scipy.linalg.eigvalsh(Ri)[::-1]
        np.testing.assert_allclose(s["eigvals"][i].numpy(), ev, atol=1e-10 * ev[0])
        assert s["rank"][i].item() == np.linalg.matrix_rank(Ri, hermitian=True) == rank
        assert s["fro"][i].item() == pytest.approx(np.linalg.norm(Ri, "fro"))
        assert s["trace"][i].item() == pytest.approx(np.trace(Ri).real)
        assert s["gap"][i].item() == pytest.approx(ev[K - 1] - ev[K], abs=1e-10 * ev[0])
        if rank == n:
            assert s["cond"][i].item() == pytest.approx(np.linalg.cond(Ri), rel=1e-6)
        else:
            assert s["cond"][i].item() > 1e8 or np.isinf(s["cond"][i].item())


def test_numerical_rank_tolerance_is_relative():
    ev = torch.tensor([[10.0, 1.0, 1e-3, 1e-9]], dtype=torch.float64)
    assert numerical_rank(ev).item() == 4  # default N * eps(float64)
    assert numerical_rank(ev, rtol=1e-5).item() == 3
    assert numerical_rank(ev, rtol=0.5).item() == 1


def test_frobenius2_against_numpy():
    X = _complex(3, (2, 3, 4, 5))
    ref = np.linalg.norm(X.numpy(), axis=(-2, -1)) ** 2
    np.testing.assert_allclose(frobenius2(X).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(frobenius2(X.mH).numpy(), ref, rtol=1e-12)  # a lazily conjugated view
    np.testing.assert_allclose(frobenius2(X.real).numpy(), np.linalg.norm(X.real.numpy(), axis=(-2, -1)) ** 2, rtol=1e-12)
    Y = X.to(torch.complex64).requires_grad_()
    (g,) = torch.autograd.grad(frobenius2(Y).sum(), Y)
    torch.testing.assert_close(g, 2 * Y.detach())  # d||X||^2 / d conj(X), PyTorch's convention


def test_nmse_definition():
    A, B = _complex(1, (3, 5, 5)), _complex(2, (3, 5, 5))
    ref = [np.linalg.norm(A[i] - B[i]) ** 2 / np.linalg.norm(B[i]) ** 2 for i in range(3)]
    np.testing.assert_allclose(nmse(A, B).numpy(), ref)
    assert torch.allclose(nmse(B, B), torch.zeros(3, dtype=torch.float64))


# --- factored R_blend -----------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 5, 9])
def test_low_rank_factor_is_exact_up_to_rank_plus_oversampling(rank):
    R = _psd(rank, 3, 40, rank)
    F = low_rank_factor(R, rank=5)  # sketch of 5 + 4 = 9 columns
    assert F is not None and F.shape[-1] == rank  # only the columns some matrix needs
    torch.testing.assert_close(F @ F.mH, R, rtol=0, atol=1e-12 * R.abs().max().item())


def test_low_rank_factor_refuses_what_it_cannot_reproduce():
    assert low_rank_factor(_psd(0, 3, 40, 10), rank=5) is None  # rank above the sketch
    high = torch.cat([_psd(1, 2, 40, 3), _psd(2, 1, 40, 30)])  # one matrix of the batch is enough
    assert low_rank_factor(high, rank=5) is None
    assert low_rank_factor(_psd(3, 2, 40, 2) - _psd(4, 2, 40, 1), rank=5) is None  # indefinite: no F F^H
    zero = torch.zeros(2, 6, 6, dtype=torch.complex128)  # rank 0 is exact
    assert torch.equal(low_rank_factor(zero, rank=2) @ low_rank_factor(zero, rank=2).mH, zero)


def _fixes(**kw) -> FixConfig:
    return FixConfig(**{"rblend_trace_normalise": False, "qr_retraction": False, "c_eps": 0.01, **kw})


def test_blend_factored_reproduces_r_blend(batch, system):
    """(1 - beta) A A^H + beta R_samp + C_EPS I = F F^H + C_EPS I, with R_samp from the beamscan estimator (rank <= K_max)."""
    A = _complex(5, (6, system.N, system.K_max), torch.complex64)
    R_samp = rsamp_for(batch[:6], _fixes(rsamp_estimator="beamscan"), system)
    for beta in (0.0, 0.3):
        fixes = _fixes(beta=beta, rsamp_estimator="beamscan")
        R_blend = blend_pipeline(A @ A.mH, R_samp, fixes)
        X = blend_factored(A, R_samp, R_blend, fixes)
        assert X is not None and X.R is R_blend and X.shift == fixes.c_eps
        assert X.F.shape[-1] <= 2 * system.K_max and (beta > 0 or X.F is A)
        err = torch.linalg.matrix_norm(diagonal_load(X.F @ X.F.mH, X.shift) - R_blend) / torch.linalg.matrix_norm(R_blend)
        assert err.max() < 1e-5  # complex64 rounding


def test_blend_factored_leaves_the_seed_pipeline_on_the_full_path(batch, system):
    A = _complex(5, (4, system.N, system.K_max), torch.complex64)
    seed_rsamp = rsamp_for(batch[:4], _fixes(rsamp_estimator="seed"), system)  # rank L - 1 = 15 > K_max + 4
    identity = diagonal_load(torch.zeros_like(seed_rsamp), 1.0)  # full rank
    for fixes, R_samp in [(_fixes(qr_retraction=True, beta=0.0), seed_rsamp), (_fixes(rblend_trace_normalise=True, beta=0.0), seed_rsamp),
                          (_fixes(beta=0.3), seed_rsamp), (_fixes(beta=0.3), identity)]:
        assert blend_factored(A, R_samp, blend_pipeline(A @ A.mH, R_samp, fixes), fixes) is None
    grad_rsamp = (A @ A.mH).detach().requires_grad_()  # a differentiable R_samp is kept whole
    assert blend_factored(A, grad_rsamp, blend_pipeline(A @ A.mH, grad_rsamp, _fixes(beta=0.3)), _fixes(beta=0.3)) is None


def test_pipeline_carries_the_factored_blend_only_when_given_the_factor(batch, system):
    A = _complex(5, (4, system.N, system.K_max), torch.complex64)
    fixes = _fixes(beta=0.0, rsamp_estimator="beamscan", nmse_same_preprocessing=True)
    R_samp = rsamp_for(batch[:4], fixes, system)
    with_factor = pipeline(A @ A.mH, R_samp, batch.R_true[:4], fixes, factor=A)
    without = pipeline(A @ A.mH, R_samp, batch.R_true[:4], fixes)
    assert without.factored is None and without.eigen_input() is without.R_blend
    assert with_factor.eigen_input() is with_factor.factored and with_factor.factored.F is A
    torch.testing.assert_close(with_factor.R_blend, without.R_blend)


# --- sample-covariance estimators -----------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["seed", "ls_scatter"])
def test_factored_g_matches_formed_g(batch, system, estimator):
    y, H, c = batch.y[:6], batch.H[:6], batch.codes[:6]
    R_formed = sample_covariance(y, H[:, None] * c[:, :, None], estimator, system.ridge)
    R_fact = sample_covariance(y, (H, c), estimator, system.ridge)
    assert torch.allclose(R_fact, R_formed, atol=1e-5 * R_formed.abs().max().item())
    # codes that are not unit modulus take the per-snapshot Gram path
    c2 = c * torch.linspace(0.5, 1.5, c.shape[-1])
    R_formed = sample_covariance(y, H[:, None] * c2[:, :, None], estimator, system.ridge)
    assert torch.allclose(sample_covariance(y, (H, c2), estimator, system.ridge), R_formed, atol=1e-5 * R_formed.abs().max().item())


def test_seed_estimator_matches_a_float64_per_snapshot_reference(batch, system):
    i = 2
    G = batch.G[i].to(torch.complex128).numpy()
    y = batch.y[i].to(torch.complex128).numpy()
    X = np.stack([G[l].conj().T @ np.linalg.solve(G[l] @ G[l].conj().T + system.ridge * np.eye(system.M), y[l]) for l in range(system.L)])
    Xc = X - X.mean(0)
    ref = sum(np.outer(x, x.conj()) for x in Xc) / system.L
    got = sample_covariance(batch.y[i:i + 1], batch.G[i:i + 1], "seed", system.ridge)[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    # mean-centred scatter of L vectors: rank <= L - 1
    assert np.linalg.matrix_rank(ref, tol=1e-8 * np.abs(ref).max()) <= system.L - 1


def test_unknown_estimator_and_missing_noise_var(batch):
    with pytest.raises(ConfigError, match="'music'"):
        sample_covariance(batch.y, batch.G, "music")
    with pytest.raises(ConfigError, match="noise_var"):
        sample_covariance(batch.y, batch.G, "covariance_matching")


SNRS = (0.0, 10.0, 20.0, 30.0)


@pytest.fixture(scope="module")
def table():
    return estimator_table(SystemConfig(), SNRS, n=24, seed=11, estimators=("seed", "ls_scatter", "covariance_matching"))


def _col(rows, name):
    return [r["nmse_median"] for r in rows if r["estimator"] == name]


def test_estimator_table_rows(table):
    assert len(table) == len(SNRS) * 4
    assert {r["estimator"] for r in table} == {"seed", "ls_scatter", "covariance_matching", "scaled_identity"}
    assert all(r["nmse_q25"] <= r["nmse_median"] <= r["nmse_q75"] and r["n"] == 24 for r in table)
    with pytest.raises(ConfigError, match="'music'"):
        estimator_table(SystemConfig(), (0.0,), n=2, estimators=("music",))


def test_seed_estimator_is_uninformative_at_every_snr(table):
    seed = _col(table, "seed")
    identity = _col(table, "scaled_identity")
    assert all(v > 0.95 for v in seed), seed  # near or above 1 at every SNR
    assert all(s > i for s, i in zip(seed, identity)), (seed, identity)  # worse than the identity


def test_covariance_matching_improves_with_snr_and_beats_seed(table):
    cm, seed = _col(table, "covariance_matching"), _col(table, "seed")
    # paired scenes across SNR: monotone up to a small tolerance, and clearly better overall
    assert all(b <= a + 0.01 for a, b in zip(cm, cm[1:])), cm
    assert cm[0] - cm[-1] > 0.1, cm
    assert all(c < s for c, s in zip(cm[1:], seed[1:])), (cm, seed)  # from 10 dB on


def test_beamscan_est_needs_no_noise_variance_and_matches_the_oracle_version():
    """beamscan_est estimates sigma^2 from the snapshots: it runs without noise_var (beamscan refuses to) and its
    NMSE against R_true is within 5 % of the oracle-noise beamscan's at 20 dB (default system, 16 scenes)."""
    from workbench.covariance import reference
    from workbench.physics import simulate

    system = SystemConfig(snr_db_min=20.0, snr_db_max=20.0)
    b = simulate(system, 16, seed=4)
    with pytest.raises(ConfigError, match="noise_var"):
        sample_covariance(b.y, (b.H, b.codes), "beamscan", system.ridge, None, rank=system.K_max, system=system)
    est = sample_covariance(b.y, (b.H, b.codes), "beamscan_est", system.ridge, None, rank=system.K_max, system=system)
    oracle = sample_covariance(b.y, (b.H, b.codes), "beamscan", system.ridge, b.noise_var, rank=system.K_max, system=system)
    e, o = (nmse(reference(hermitise(R)), reference(b.R_true)).mean().item() for R in (est, oracle))
    assert abs(e - o) < 0.05 * o, (e, o)
    assert not torch.equal(est, oracle)  # the power fit did use a different noise variance
