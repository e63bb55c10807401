"""Tests of workbench.spectral: docs/design.md section 3, facts 1-3, against independent references
(numpy eigensolvers, complex128 finite differences, torch.autograd.gradcheck), and the factored eigen-terms
(R = F F^H + c I) against the full-matrix path."""

import numpy as np
import pytest
import torch

from workbench import spectral as sp
from workbench.checks import check_covariance, check_K
from workbench.config import GAP_BACKENDS, ConfigError
from workbench.covariance import Factored

C128 = torch.complex128
EIG_BACKENDS = ("eigh", "eigvalsh", "svd", "exact")  # the ones that must agree


def herm(X):
    return 0.5 * (X + X.mH)


def random_psd(B, N, seed=0, dtype=C128):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, N, N, dtype=dtype, generator=g)
    return X @ X.mH / N + 0.1 * torch.eye(N, dtype=dtype)


def loaded_low_rank(B, N, K, seed=0, orthogonal=False, dtype=C128):
    """A A^H trace-normalised to N, plus 1.0 I: the lower N-K eigenvalues coincide (C_EPS loading)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, N, K, dtype=dtype, generator=g)
    if orthogonal:  # equal-power orthogonal sources: the signal eigenvalues coincide too
        A = torch.linalg.qr(A).Q
    R = A @ A.mH
    R = R * (N / torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1))[:, None, None]
    return R + torch.eye(N, dtype=dtype)


def steering_like(B, kmax, N, seed=1, dtype=C128):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, kmax, N, dtype=dtype, generator=g)
    return a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)


def hinge_grad(R, K, backend, **kw):
    R = R.clone().requires_grad_()
    h = sp.eigengap_hinge(R, K, margin=1e3, backend=backend, **kw)  # big margin: the hinge is active
    (g,) = torch.autograd.grad(h.sum(), R)
    return h.detach(), g


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "bad, match",
    [
        (np.eye(3), "R: expected a torch.Tensor"),
        (torch.eye(3, dtype=C128), r"R: expected a batch of square matrices \[B,N,N\]"),
        (torch.zeros(2, 3, 4, dtype=C128), "R: expected a batch of square"),
        (torch.zeros(2, 3, 3, dtype=torch.int64), "R: dtype"),
    ],
)
def test_check_covariance_shape_dtype(bad, match):
    with pytest.raises(ConfigError, match=match):
        check_covariance(bad)


def test_check_covariance_nonfinite_and_nonhermitian():
    R = random_psd(3, 5)
    R[1, 2, 2] = float("nan")
    with pytest.raises(ConfigError, match=r"R: non-finite entries .* scene\(s\) \[1\]"):
        check_covariance(R)
    R = random_psd(3, 5)
    R[2, 0, 1] += 0.5
    with pytest.raises(ConfigError, match=r"R_blend: not Hermitian in scene\(s\) \[2\]"):
        check_covariance(R, name="R_blend")
    check_covariance(random_psd(3, 5))  # valid input passes


@pytest.mark.parametrize(
    "K, match",
    [
        ([0, 1], "K: value 0 in scene 0 is out of range: allowed 1..4"),
        ([1, 5], "K: value 5 in scene 1"),
        ([1, 2, 3], r"K: shape \(3,\)"),
        ([1.0, 2.0], "K: dtype"),
    ],
)
def test_check_K(K, match):
    with pytest.raises(ConfigError, match=match):
        check_K(torch.tensor(K), B=2, N=5)
    assert check_K(torch.tensor([1, 4], dtype=torch.int32), 2, 5).dtype == torch.int64


def test_bad_inputs_reach_the_terms():
    R = random_psd(2, 6)
    with pytest.raises(ConfigError, match="gap_backend"):
        sp.eigengap_hinge(R, torch.tensor([1, 2]), backend="qr")
    with pytest.raises(ConfigError, match="K: value 6"):
        sp.eigengap_hinge(R, torch.tensor([1, 6]))
    a, mask = steering_like(2, 3, 6), torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ConfigError, match=r"a_true: expected steering vectors \[B=2, K_max, N=6\]"):
        sp.subspace_energy(R, a[..., :5], mask, torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="mask"):
        sp.subspace_energy(R, a, mask[:, :2], torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="mask: the number of True"):
        sp.subspace_energy(R, a, mask, torch.tensor([2, 2]))
    with pytest.raises(ConfigError, match="exceeds K_max = 3"):
        sp.subspace_energy(R, a, torch.ones(2, 3, dtype=torch.bool), torch.tensor([3, 4]))
    with pytest.raises(ConfigError, match="subspace_backend"):
        sp.subspace_energy(R, a, mask, torch.tensor([1, 2]), backend="qr")


# ------------------------------------------------------------------------------------------ fact 1, 3: eigenvalue backends
def test_hinge_backends_agree_with_numpy_reference():
    B, N = 4, 12
    R = random_psd(B, N, seed=3)
    K = torch.tensor([1, 3, 5, 2])
    ref = np.linalg.eigvalsh(R.numpy() + 1e-4 * np.eye(N))[:, ::-1]  # independent solver, descending
    idx = np.arange(B)
    gap = ref[idx, K.numpy() - 1] - ref[idx, K.numpy()]
    # independent gradient: d(margin - gap)/dR = -(v_K v_K^H - v_{K+1} v_{K+1}^H), vectors from numpy
    _, V = np.linalg.eigh(R.numpy())
    V = V[:, :, ::-1]
    vK, vK1 = V[idx, :, K.numpy() - 1], V[idx, :, K.numpy()]
    g_ref = -(vK[:, :, None] * vK.conj()[:, None, :]) + vK1[:, :, None] * vK1.conj()[:, None, :]
    for backend in EIG_BACKENDS:
        h, g = hinge_grad(R, K, backend)
        np.testing.assert_allclose(h.numpy(), 1e3 - gap, rtol=1e-10, err_msg=backend)
        np.testing.assert_allclose(g.numpy(), g_ref, atol=1e-8, err_msg=backend)
    h = sp.eigengap_hinge(R, K, margin=0.03, backend="eigvalsh")
    np.testing.assert_allclose(h.numpy(), np.maximum(0.03 - gap, 0.0), atol=1e-12)


def test_svd_flipped_takes_the_smallest_eigenvalues():
    B, N = 3, 10
    R = random_psd(B, N, seed=4)
    K = torch.tensor([1, 2, 4])
    asc = np.linalg.eigvalsh(R.numpy() + 1e-4 * np.eye(N))
    idx = np.arange(B)
    wrong_gap = asc[idx, K.numpy() - 1] - asc[idx, K.numpy()]  # K-th minus (K+1)-th smallest: <= 0
    h_flip = sp.eigengap_hinge(R, K, margin=0.03, backend="svd_flipped")
    h_ok = sp.eigengap_hinge(R, K, margin=0.03, backend="svd")
    np.testing.assert_allclose(h_flip.numpy(), 0.03 - wrong_gap, rtol=1e-10)
    assert (h_flip >= 0.03).all()  # the flipped hinge is always active, whatever the true gap
    assert not torch.allclose(h_flip, h_ok)
    _, g_flip = hinge_grad(R, K, "svd_flipped")
    _, g_ok = hinge_grad(R, K, "svd")
    assert (torch.linalg.matrix_norm(g_flip - g_ok) > 0.5).all()


@pytest.mark.parametrize("K", [1, 5])
def test_eigenvalue_hinge_gradient_finite_on_degenerate_loaded_matrix(K):
    """Fact 1: R = A A^H (rank K, trace N) + 1.0 I, N = 144: 139+ equal eigenvalues, finite gradient."""
    R = loaded_low_rank(2, 144, K, seed=K)
    L = torch.linalg.eigvalsh(R)
    assert (L[:, : 144 - K] - 1.0).abs().max() < 1e-10  # the lower spectrum really is degenerate
    Kt = torch.full((2,), K)
    grads = {}
    for backend in ("eigh", "eigvalsh", "svd", "exact", "svd_flipped", "finite_diff"):
        h, g = hinge_grad(R, Kt, backend, fd_dirs=4)
        assert torch.isfinite(h).all() and torch.isfinite(g).all(), backend
        grads[backend] = g
    # lambda_K is a simple eigenvalue: its part of the gradient, v_K v_K^H, is the same for all exact backends
    # (lambda_{K+1} sits in the degenerate cluster, so each solver may pick a different vector for it).
    _, V = torch.linalg.eigh(R)
    vK = V[..., 144 - K]
    PK = vK[..., :, None] * vK.conj()[..., None, :]
    for backend in ("eigh", "eigvalsh", "svd", "exact"):
        g = grads[backend]
        assert torch.allclose((vK.conj()[..., None, :] @ g @ vK[..., :, None]).real.squeeze(), torch.full((2,), -1.0, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(torch.diagonal(g, dim1=-2, dim2=-1).sum(-1).real, torch.zeros(2, dtype=torch.float64), atol=1e-8)
        assert torch.linalg.matrix_norm(g + PK).max() < 1.0 + 1e-6  # = ||v_{K+1} v_{K+1}^H|| = 1


def test_batched_per_scene_K_matches_scene_by_scene():
    R = random_psd(5, 9, seed=11)
    K = torch.tensor([1, 8, 3, 4, 2])
    F = torch.randn(5, 9, 3, dtype=C128, generator=torch.Generator().manual_seed(11))

    def factored(sl):
        return Factored(F[sl] @ F[sl].mH + 0.5 * torch.eye(9, dtype=C128), F[sl], 0.5)

    for make, backend in ((R.__getitem__, "eigh"), (R.__getitem__, "exact"), (factored, "exact")):
        batched = sp.eigengap_hinge(make(slice(None)), K, margin=2.0, backend=backend)
        single = torch.cat([sp.eigengap_hinge(make(slice(i, i + 1)), K[i : i + 1], margin=2.0, backend=backend) for i in range(5)])
        torch.testing.assert_close(batched, single)


# ------------------------------------------------------------------------------------------ gradcheck of custom backwards
def test_gradcheck_safe_projector():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(2, 6, 6, dtype=C128, generator=g, requires_grad=True)
    a, K = steering_like(2, 3, 6), torch.tensor([1, 3])
    mask = torch.arange(3)[None, :] < K[:, None]
    f = lambda X: sp.subspace_energy(herm(X @ X.mH), a, mask, K, backend="safe")  # noqa: E731
    assert torch.autograd.gradcheck(f, (X,))


def test_gradcheck_lorentzian_exact_at_eps0_biased_otherwise():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(2, 5, 5, dtype=C128, generator=g, requires_grad=True)
    a, K = steering_like(2, 2, 5), torch.tensor([1, 2])
    mask = torch.arange(2)[None, :] < K[:, None]
    f = lambda X, eps: sp.subspace_energy(herm(X @ X.mH), a, mask, K, backend="lorentzian", lorentzian_eps=eps)  # noqa: E731
    assert torch.autograd.gradcheck(lambda X: f(X, 0.0), (X,))
    (g_exact,) = torch.autograd.grad(f(X, 0.0).sum(), X)
    (g_broad,) = torch.autograd.grad(f(X, 1.0).sum(), X)
    assert torch.linalg.matrix_norm(g_exact - g_broad).max() > 1e-3  # broadening biases the gradient


def test_finite_diff_estimate_is_unbiased_and_reports_its_spread():
    R = random_psd(2, 5, seed=9)
    K = torch.tensor([2, 1])
    _, g_exact = hinge_grad(R, K, "eigvalsh")
    Rl = R + 1e-4 * torch.eye(5, dtype=C128)
    est, rec = sp.finite_diff_gap_gradient(Rl, K, margin=1e3, n_dirs=400, delta=1e-4)
    rel = rec.rel_stderr
    assert rec.n_dirs == 400 and rec.eigen_solves == 800 and rec.matrices_solved == 1600
    err = torch.linalg.matrix_norm(est - g_exact) / torch.linalg.matrix_norm(g_exact)
    assert (err < 4 * rel).all()  # within a few reported standard errors
    assert (rel > 0.05).all() and (rel < 0.6).all()  # ~ sqrt(N^2 / n_dirs) = 0.25 for an isotropic estimator
    _, few = sp.finite_diff_gap_gradient(Rl, K, margin=1e3, n_dirs=25, delta=1e-4)
    assert (few.rel_stderr > 2 * rel).all()  # fewer directions, larger spread
    # through autograd: the estimate reaches R.grad and each backward hands its record to the caller's list
    records = []
    _, g_fd = hinge_grad(R, K, "finite_diff", fd_dirs=7, fd_records=records)
    assert [r.n_dirs for r in records] == [7] and records[0].matrices_solved == 2 * 7 * 2
    assert torch.isfinite(g_fd).all() and (records[0].rel_stderr > 0).all()
    _, g_again = hinge_grad(R, K, "finite_diff", fd_dirs=3, fd_records=records)
    assert [r.n_dirs for r in records] == [7, 3]  # appended, never overwritten


def test_no_hidden_module_state():
    """Cost records are returned and caches belong to objects: the module holds no mutable containers."""
    mutable = [name for name, v in vars(sp).items() if isinstance(v, (dict, list, set)) and not name.startswith("__")]
    assert mutable == []
    assert "topk" not in GAP_BACKENDS and not hasattr(sp, "top_eigh")


# ------------------------------------------------------------------------------------------ fact 2: eigenvectors
def test_subspace_backends_agree_on_distinct_spectrum():
    B, N, kmax = 3, 8, 3
    R = random_psd(B, N, seed=12)
    K = torch.tensor([1, 3, 2])
    mask = torch.arange(kmax)[None, :] < K[:, None]
    a = steering_like(B, kmax, N)
    # independent value: numpy projector
    _, V = np.linalg.eigh(R.numpy())
    ref = []
    for b in range(B):
        kb = int(K[b])
        Vk = V[b][:, ::-1][:, :kb]
        Pn = np.eye(N) - Vk @ Vk.conj().T
        ref.append(sum((a[b, k].numpy().conj() @ Pn @ a[b, k].numpy()).real for k in range(kb)) / kb)
    grads = {}
    for backend in ("eigh", "lorentzian", "safe", "detach"):
        Rr = R.clone().requires_grad_()
        e = sp.subspace_energy(Rr, a, mask, K, backend=backend, lorentzian_eps=1e-14)
        np.testing.assert_allclose(e.detach().numpy(), ref, rtol=1e-9, err_msg=backend)
        (grads[backend],) = torch.autograd.grad(e.sum(), Rr)
    for key in ("lorentzian", "safe"):
        torch.testing.assert_close(herm(grads[key]), herm(grads["eigh"]), atol=1e-8, rtol=1e-6)
    assert (grads["detach"] == 0).all()


@pytest.mark.parametrize("orthogonal", [False, True])
def test_subspace_term_on_degenerate_loaded_matrix(orthogonal):
    """Fact 2: 139-fold degenerate noise (and, with equal-power orthogonal sources, degenerate signal):
    plain eigh autograd is non-finite; safe is finite and equals a complex128 finite difference."""
    B, N, kmax = 2, 144, 5
    # without orthogonality scene 0 uses K = 3 of a rank-5 prediction: its noise subspace holds 2 distinct
    # values and 139 equal ones. With it, all 5 signal eigenvalues coincide, so K must be 5 (a boundary
    # inside a degenerate cluster has no derivative).
    K = torch.tensor([5, 5]) if orthogonal else torch.tensor([3, 5])
    R = loaded_low_rank(B, N, 5, seed=2, orthogonal=orthogonal)
    mask = torch.arange(kmax)[None, :] < K[:, None]
    a = steering_like(B, kmax, N)

    def grad(backend):
        Rr = R.clone().requires_grad_()
        e = sp.subspace_energy(Rr, a, mask, K, backend=backend)
        return torch.autograd.grad(e.sum(), Rr)[0]

    assert not torch.isfinite(grad("eigh")).all()
    assert (grad("detach") == 0).all()
    g_safe = grad("safe")
    assert torch.isfinite(g_safe).all()
    gen = torch.Generator().manual_seed(3)
    D = herm(torch.randn(B, N, N, dtype=C128, generator=gen))
    h = 1e-5
    f = lambda R: sp.subspace_energy(R, a, mask, K, backend="safe").sum()  # noqa: E731
    fd = (f(R + h * D) - f(R - h * D)) / (2 * h)
    directional = (g_safe.conj() * D).real.sum()
    assert abs(directional - fd) < 1e-6 * max(abs(fd), 1e-3)


def test_phase_dependent_eigenvector_loss_raises_projector_does_not():
    R = random_psd(2, 6, seed=13).requires_grad_()
    _, V = torch.linalg.eigh(R)
    with pytest.raises(RuntimeError, match="phi"):
        w = torch.randn(6, dtype=C128, generator=torch.Generator().manual_seed(1))
        (V[..., -1] * w).real.sum().backward()  # depends on the arbitrary phase of the eigenvector
    K = torch.tensor([1, 2])
    mask = torch.arange(2)[None, :] < K[:, None]
    e = sp.subspace_energy(R, steering_like(2, 2, 6), mask, K, backend="eigh")
    e.sum().backward()  # the projector V_K V_K^H is phase invariant: no error
    assert torch.isfinite(R.grad).all()


# ------------------------------------------------------------------------------------------ factored R = F F^H + c I
# Each scene: the powers of the K_max = 5 columns of A (R = A A^H + C_EPS I has exactly these eigenvalues above C_EPS)
# and K. Both terms are differentiable here: lambda_K and lambda_{K+1} are simple or lambda_{K+1} is the C_EPS floor.
SIMPLE_BOUNDARY = [
    ([3.0, 3.0, 1.5, 0.7, 0.3], 3),  # equal-power pair inside the signal part, K < K_max
    ([3.0, 3.0, 2.0, 2.0, 1.0], 5),  # two equal pairs, K = K_max: lambda_{K+1} is the 139-fold floor
    ([2.0, 1.5, 1.0, 0.5, 0.5], 2),  # equal pair inside the noise part, K < K_max
    (None, 4),  # a generic A (Gaussian, no structure)
]
# The subspace term only: lambda_K or lambda_{K+1} lies inside a cluster (still lambda_K > lambda_{K+1}).
DEGENERATE = [
    ([1.0, 1.0, 1.0, 1.0, 1.0], 5),  # every source of equal power
    ([2.0, 2.0, 2.0, 0.5, 0.5], 3),  # equal powers inside the signal and inside the noise part, K < K_max
]
C_EPS = 0.01


def factor_scenes(specs, N, dtype=C128, seed=0):
    """A [B,N,5] with A A^H = Q diag(powers) Q^H (Q orthonormal, A = Q diag(sqrt p) W for a random unitary W), K [B]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for powers, _ in specs:
        X = torch.randn(N, 5, dtype=C128, generator=g)
        if powers is None:
            out.append(X / 2)
            continue
        W = torch.linalg.qr(torch.randn(5, 5, dtype=C128, generator=g)).Q
        out.append(torch.linalg.qr(X).Q * torch.tensor(powers, dtype=torch.float64).sqrt().to(C128) @ W)
    return torch.stack(out).to(dtype), torch.tensor([k for _, k in specs])


def terms(A, K, a, mask, factored, margin=10.0):
    """(hinge [B], energy [B]) of R = A A^H + C_EPS I: factored (exact hinge, safe subspace on the Gram matrix) or
    the full-matrix reference (eigvalsh hinge, safe subspace on an N x N eigh)."""
    R = A @ A.mH + C_EPS * torch.eye(A.shape[1], dtype=A.dtype)
    if factored:
        X = Factored(R, A, C_EPS)
        return sp.eigengap_hinge(X, K, margin, 1e-4, "exact"), sp.subspace_energy(X, a, mask, K, "safe")
    return sp.eigengap_hinge(R, K, margin, 1e-4, "eigvalsh"), sp.subspace_energy(R, a, mask, K, "safe")


def value_and_grads(A, K, a, mask, factored):
    """Values and gradients w.r.t. A of both terms (the hinge's gradient is None where it is not differentiable)."""
    A = A.clone().requires_grad_()
    h, e = terms(A, K, a, mask, factored)
    (g_h,) = torch.autograd.grad(h.sum(), A, retain_graph=True)
    (g_e,) = torch.autograd.grad(e.sum(), A)
    return h.detach(), e.detach(), g_h, g_e


def scene_inputs(specs, N, dtype):
    A, K = factor_scenes(specs, N, dtype)
    mask = torch.arange(5)[None, :] < K[:, None]
    return A, K, steering_like(len(specs), 5, N, dtype=C128).to(dtype), mask


def test_factored_scenes_have_the_intended_spectrum():
    A, K = factor_scenes(SIMPLE_BOUNDARY[:3] + DEGENERATE, 16)
    ev = torch.linalg.eigvalsh(A @ A.mH).flip(-1)[:, :6]
    for (powers, _), e in zip(SIMPLE_BOUNDARY[:3] + DEGENERATE, ev):
        torch.testing.assert_close(e, torch.tensor(powers + [0.0], dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("specs, with_hinge", [(SIMPLE_BOUNDARY, True), (DEGENERATE, False)])
def test_factored_terms_gradcheck_and_equal_the_full_path_complex128(specs, with_hinge):
    A, K, a, mask = scene_inputs(specs, 10, C128)
    h_f, e_f, gh_f, ge_f = value_and_grads(A, K, a, mask, factored=True)
    h_d, e_d, gh_d, ge_d = value_and_grads(A, K, a, mask, factored=False)
    torch.testing.assert_close(e_f, e_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ge_f, ge_d, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(h_f, h_d, rtol=1e-12, atol=1e-12)  # values agree even where there is no gradient
    assert torch.isfinite(ge_f).all() and torch.isfinite(gh_f).all()
    fn = (lambda A: terms(A, K, a, mask, True)) if with_hinge else (lambda A: terms(A, K, a, mask, True)[1])
    assert torch.autograd.gradcheck(fn, (A.clone().requires_grad_(),))
    if with_hinge:
        torch.testing.assert_close(gh_f, gh_d, rtol=1e-9, atol=1e-10)


def test_factored_terms_equal_the_full_path_complex64():
    """N = 144, complex64: value and gradient within 1e-5 (relative to the largest entry) of the full-matrix path."""
    A, K, a, mask = scene_inputs(SIMPLE_BOUNDARY + DEGENERATE, 144, torch.complex64)
    h_f, e_f, gh_f, ge_f = value_and_grads(A, K, a, mask, factored=True)
    h_d, e_d, gh_d, ge_d = value_and_grads(A, K, a, mask, factored=False)
    assert (e_f - e_d).abs().max() <= 1e-5 * e_d.abs().max()
    assert (ge_f - ge_d).abs().max() <= 1e-5 * ge_d.abs().max()
    n = len(SIMPLE_BOUNDARY)  # the hinge where it is differentiable
    assert (h_f[:n] - h_d[:n]).abs().max() <= 1e-5 * h_d[:n].abs().max()
    assert (gh_f[:n] - gh_d[:n]).abs().max() <= 1e-5 * gh_d[:n].abs().max()
    assert ge_f.dtype == torch.complex64 and e_f.dtype == torch.float32


def test_factored_terms_keep_complex64_accuracy_for_weak_sources():
    """Powers spanning 5e3 (as in real scenes: one strong source, weak ones near C_EPS): F^H F squares the condition
    number, so the r x r problem runs in double; value and gradient within 1e-5 of the complex128 truth."""
    specs = [([100.0, 30.0, 1.0, 0.1, 0.02], 5), ([100.0, 0.5, 0.2, 0.05, 0.02], 4), ([60.0, 60.0, 0.3, 0.1, 0.02], 3)]
    A, K, a, mask = scene_inputs(specs, 144, C128)
    truth = value_and_grads(A, K, a, mask, factored=False)
    got = value_and_grads(A.to(torch.complex64), K, a.to(torch.complex64), mask, factored=True)
    for x, ref in zip(got, truth):
        assert (x.to(ref.dtype) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_factored_blend_with_a_low_rank_rsamp_equals_the_full_path():
    """beta > 0: F = [sqrt(1 - beta) A, sqrt(beta) F_samp], a rank-2 K_max update of C_EPS I. (A rank-3 R_samp blended
    into the DEGENERATE scenes leaves exact ties at the K boundary, where no gradient exists: not used here.)"""
    A, K, a, mask = scene_inputs(SIMPLE_BOUNDARY, 10, C128)
    F_samp = torch.randn(A.shape[0], 10, 3, dtype=C128, generator=torch.Generator().manual_seed(4)) / 3
    beta = 0.3

    def f(A, factored):
        F = torch.cat([(1 - beta) ** 0.5 * A, beta**0.5 * F_samp], -1)
        R = (1 - beta) * A @ A.mH + beta * F_samp @ F_samp.mH + C_EPS * torch.eye(10, dtype=C128)
        X = Factored(R, F, C_EPS) if factored else R
        return sp.eigengap_hinge(X, K, 10.0, 1e-4, "exact") + sp.subspace_energy(X, a, mask, K, "safe")

    Ar = A.clone().requires_grad_()
    (g_f,) = torch.autograd.grad(f(Ar, True).sum(), Ar)
    (g_d,) = torch.autograd.grad(f(Ar, False).sum(), Ar)
    torch.testing.assert_close(f(A, True), f(A, False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_f, g_d, rtol=1e-9, atol=1e-10)
    assert torch.autograd.gradcheck(lambda A: f(A, True), (A.clone().requires_grad_(),))


def test_other_backends_use_the_formed_matrix_of_a_factored_input():
    """eigh, detach, svd_flipped, ... keep their meaning on a Factored: they see its R, failure modes included."""
    A, K, a, mask = scene_inputs(DEGENERATE, 16, C128)
    R = A @ A.mH + C_EPS * torch.eye(16, dtype=C128)
    Ar = A.clone().requires_grad_()
    X = Factored(Ar @ Ar.mH + C_EPS * torch.eye(16, dtype=C128), Ar, C_EPS)
    (g,) = torch.autograd.grad(sp.subspace_energy(X, a, mask, K, "eigh").sum(), Ar)
    assert not torch.isfinite(g).all()  # plain eigh autograd under exact degeneracy, as on the matrix itself
    for backend in ("svd_flipped", "svd", "eigvalsh", "finite_diff"):
        torch.testing.assert_close(sp.eigengap_hinge(X, K, 0.03, 1e-4, backend), sp.eigengap_hinge(R, K, 0.03, 1e-4, backend))
    torch.testing.assert_close(sp.subspace_energy(X, a, mask, K, "lorentzian"), sp.subspace_energy(R, a, mask, K, "lorentzian"))


def test_factored_input_is_validated():
    A, K, a, mask = scene_inputs(SIMPLE_BOUNDARY, 8, C128)
    R = A @ A.mH
    bad = A.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"Factored.F: non-finite entries .* scene\(s\) \[1\]"):
        sp.eigengap_hinge(Factored(R, bad, 0.0), K, backend="exact")
    with pytest.raises(ConfigError, match=r"Factored: expected F \[B,N,r\] and R \[B,N,N\]"):
        sp.subspace_energy(Factored(R[:, :7, :7], A, 0.0), a, mask, K)
    with pytest.raises(ConfigError, match="K: value 8"):
        sp.eigengap_hinge(Factored(R, A, 0.0), torch.tensor([1, 2, 3, 8]), backend="exact")
