"""The network, the loss terms and their weights."""

import itertools
import math
import time
from types import SimpleNamespace

import pytest
import torch

from workbench import spectral
from workbench.config import SEED_PRESETS, ModelConfig, SystemConfig, preset
from workbench.covariance import diagonal_load, predicted_covariance, trace_normalise
from workbench.estimators import rsamp_for
from workbench.losses import TERMS, aux_loss, compute_losses, slot_costs, term_weights
from workbench.model import REFERENCE_MODEL, ModelOutput, build_model, n_parameters
from workbench.physics import simulate, steering

SMALL = {"model.width": 32, "model.layers": 1, "model.heads": 2}


@pytest.fixture(scope="module")
def batch():
    return simulate(SystemConfig(), 8, seed=3)


def oracle_output(batch, system):
    """A model output whose factor reproduces the trace-normalised R_true exactly and whose slots are the truth."""
    R = trace_normalise(batch.R_true)
    ev, V = torch.linalg.eigh(R)
    A = V[..., -system.K_max:] * ev[..., -system.K_max:].clamp_min(0).sqrt()[..., None, :].to(V.dtype)
    angles = torch.stack([batch.phi, batch.theta, batch.r], -1)
    logits = torch.nn.functional.one_hot(batch.K - 1, system.K_max).float() * 50
    return ModelOutput(A=A, k_logits=logits, angles=angles)


def test_model_shapes_ranges_and_groups(batch):
    s = SystemConfig()
    model = build_model(s, ModelConfig(width=32, layers=1, heads=2))
    out = model(batch.y, batch.H, batch.codes)
    assert out.A.shape == (8, s.N, s.K_max) and out.A.dtype == torch.complex64
    assert out.k_logits.shape == (8, s.K_max)
    phi, theta, r = out.angles.unbind(-1)
    assert phi.abs().max() <= math.radians(s.phi_max_deg) + 1e-6
    assert theta.abs().max() <= math.radians(s.theta_max_deg) + 1e-6
    assert r.min() >= s.r_min_m - 1e-6 and r.max() <= s.r_max_m + 1e-6
    groups = model.groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)


def test_model_is_scale_invariant_to_raw_units(batch):
    """Raw physical units (1e-5 and below) must not reach the network: scaling y and H changes nothing."""
    model = build_model(SystemConfig(), ModelConfig(width=32, layers=1, heads=2))
    a = model(batch.y, batch.H, batch.codes).A
    b = model(batch.y * 1e4, batch.H * 1e3, batch.codes).A
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mixed_precision_keeps_complex_work_in_float32(batch):
    model = build_model(SystemConfig(), ModelConfig(width=32, layers=1, heads=2))
    out = model(batch.y, batch.H, batch.codes, amp=True)
    assert out.A.dtype == torch.complex64 and torch.isfinite(torch.view_as_real(out.A)).all()


def test_reference_model_is_near_the_original_size():
    assert 17e6 < n_parameters(build_model(SystemConfig(), REFERENCE_MODEL, device="meta")) < 21e6


def test_oracle_scores_zero_when_both_sides_share_preprocessing(batch):
    cfg = preset("recommended")
    R_samp = rsamp_for(batch, cfg.fixes, cfg.system)
    losses, _ = compute_losses(oracle_output(batch, cfg.system), batch, R_samp, cfg, terms=("nmse", "aux"))
    assert losses["nmse"] < 1e-8
    assert losses["aux"] < 1e-10


def test_loading_only_the_prediction_puts_a_floor_under_the_nmse(batch):
    """docs/design.md fact 4: with an oracle R_pred and R_samp = R_ref, the seed's NMSE is exactly N c^2 / ||R_ref||^2."""
    cfg = preset("seed_fix2")
    R_ref = trace_normalise(batch.R_true)
    losses, _ = compute_losses(oracle_output(batch, cfg.system), batch, R_ref, cfg.replace(**{"fixes.qr_retraction": False}),
                               terms=("nmse",))
    c = cfg.fixes.c_eps
    expected = (cfg.system.N * c**2 / torch.linalg.matrix_norm(R_ref) ** 2).mean()
    torch.testing.assert_close(losses["nmse"], expected.float(), rtol=1e-4, atol=0)
    assert losses["nmse"] > 1e-3


def test_qr_retraction_turns_the_factor_into_a_scaled_projector():
    A = torch.randn(2, 20, 4, dtype=torch.complex64)
    ev = torch.linalg.eigvalsh(predicted_covariance(A, qr_retraction=True))
    torch.testing.assert_close(ev[:, -4:], torch.ones(2, 4), rtol=1e-4, atol=1e-4)
    assert ev[:, :-4].abs().max() < 1e-4


def test_aux_loss_is_permutation_invariant(batch):
    s = SystemConfig()
    angles = torch.stack([batch.phi, batch.theta, batch.r], -1) + 0.05 * torch.randn(8, s.K_max, 3)
    perm = torch.randperm(s.K_max)
    torch.testing.assert_close(aux_loss(angles, batch, s), aux_loss(angles[:, perm], batch, s))
    assert aux_loss(angles, batch, s) > 0


def test_total_is_the_weighted_sum_and_lam_gap_is_the_gap_weight(batch):
    cfg = preset("recommended", **SMALL, **{"fixes.lam_gap": 0.5, "loss.k_ce": 0.25})
    model = build_model(cfg.system, cfg.model)
    R_samp = rsamp_for(batch, cfg.fixes, cfg.system)
    losses, _ = compute_losses(model(batch.y, batch.H, batch.codes, R_samp=R_samp), batch, R_samp, cfg)
    w = term_weights(cfg)
    assert w["gap"] == 0.5 and w["k_ce"] == 0.25
    torch.testing.assert_close(losses["total"], sum(w[t] * losses[t] for t in TERMS))


def test_loading_leaves_the_nmse_target_untouched_in_the_seed(batch):
    cfg = preset("seed_before")
    R_samp = rsamp_for(batch, cfg.fixes, cfg.system)
    _, cov = compute_losses(oracle_output(batch, cfg.system), batch, R_samp, cfg, terms=("nmse",))
    torch.testing.assert_close(cov.target, trace_normalise(batch.R_true))
    assert not torch.allclose(cov.R_blend, diagonal_load(cov.R_blend, 0.0) * 0)


def test_rsamp_input_starts_from_the_estimate_and_requires_it(batch):
    """With model.rsamp_input the untrained R_pred is the top-K_max part of R_samp scaled to trace N."""
    from workbench.config import ConfigError
    from workbench.covariance import psd_projection

    cfg = preset("recommended", **SMALL)
    assert cfg.model.rsamp_input and not preset("seed_fix2").model.rsamp_input
    model = build_model(cfg.system, cfg.model)
    R_samp = rsamp_for(batch, cfg.fixes, cfg.system)
    with torch.no_grad():
        assert model.head["prior_gain"].weight.abs().max() == 0  # untrained: every gain is exactly 1
        model.head["factor"].weight.zero_()
        model.head["factor"].bias.zero_()
        R_pred = predicted_covariance(model(batch.y, batch.H, batch.codes, R_samp=R_samp).A, qr_retraction=False)
    expected = trace_normalise(psd_projection(R_samp, cfg.system.K_max))
    torch.testing.assert_close(R_pred, expected, rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="R_samp"):
        model(batch.y, batch.H, batch.codes)


# ------------------------------------------------------------------------------------------ aux: assignment, not permutations
def slot_scenes(B, kmax, seed=0):
    """Random slots and sources (K per scene in 1..K_max, the real ones first) as the fields aux_loss reads."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randint(1, kmax + 1, (B,), generator=g)
    true = torch.rand(B, kmax, 3, generator=g, dtype=torch.float64) * 2 - 1
    batch = SimpleNamespace(phi=true[..., 0], theta=0.5 * true[..., 1], r=5 + 4 * true[..., 2], K=K,
                            mask=torch.arange(kmax)[None, :] < K[:, None])
    angles = torch.rand(B, kmax, 3, generator=g, dtype=torch.float64) * 2 - 1
    return (angles * torch.tensor([1.0, 0.5, 4.0], dtype=torch.float64) + torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64)), batch


def permutation_minimum(angles, batch, system):
    """The reference: the minimum over all K_max! slot permutations of the masked matched cost, / K, mean."""
    cost = slot_costs(angles, batch, system) * batch.mask[:, None, :]
    kmax = angles.shape[1]
    per_perm = torch.stack([cost[:, list(p), range(kmax)].sum(-1) for p in itertools.permutations(range(kmax))], -1)
    return (per_perm.min(-1).values / batch.K).mean()


@pytest.mark.parametrize("kmax", [1, 2, 4, 6])
def test_aux_loss_equals_the_minimum_over_all_permutations(kmax):
    system = SystemConfig(K_max=kmax)
    angles, batch = slot_scenes(16, kmax, seed=kmax)
    a1, a2 = angles.clone().requires_grad_(), angles.clone().requires_grad_()
    value, ref = aux_loss(a1, batch, system), permutation_minimum(a2, batch, system)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=0)
    (g1,), (g2,) = torch.autograd.grad(value, a1), torch.autograd.grad(ref, a2)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-15)


def test_aux_loss_at_k_max_12_is_fast_and_finds_the_true_matching():
    """K_max = 12 (12! = 4.8e8 permutations): slots = the sources in a random order plus small noise, so the best
    assignment is that order and the loss is the noise's own cost."""
    kmax, B = 12, 64
    system = SystemConfig(K_max=kmax)
    _, batch = slot_scenes(B, kmax, seed=1)
    true = torch.stack([batch.phi, batch.theta, batch.r], -1)
    noise = 1e-3 * torch.randn(B, kmax, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    order = torch.stack([torch.randperm(kmax, generator=torch.Generator().manual_seed(b)) for b in range(B)])
    angles = (true + noise).gather(1, order[..., None].expand(-1, -1, 3)).requires_grad_()
    t0 = time.perf_counter()
    value = aux_loss(angles, batch, system)
    value.backward()
    elapsed = time.perf_counter() - t0
    noise_cost = (slot_costs(true + noise, batch, system).diagonal(dim1=1, dim2=2) * batch.mask).sum(-1) / batch.K
    torch.testing.assert_close(value.detach(), noise_cost.mean(), rtol=1e-12, atol=0)
    assert elapsed < 0.5, elapsed


# ------------------------------------------------------------------------------------------ eigen-terms on the factored R_blend
def full_matrix_reference(A, batch, cfg):
    """gap and subspace terms (means over scenes) of R_blend = A A^H + C_EPS I (recommended: beta = 0) on the
    full-matrix path in complex128, each as (value, gradient w.r.t. A [B,N,K_max])."""
    A = A.detach().to(torch.complex128).requires_grad_()
    f = cfg.fixes
    R = diagonal_load(A @ A.mH, f.c_eps)
    a_true = steering(cfg.system, batch.phi.double(), batch.theta.double(), torch.where(batch.mask, batch.r, 1.0).double())
    gap = spectral.eigengap_hinge(R, batch.K, f.gap_margin, f.eps_psd, "eigvalsh").mean()
    subspace = spectral.subspace_energy(R, a_true, batch.mask, batch.K, "safe").mean()
    return {name: (t.detach(), torch.autograd.grad(t, A, retain_graph=True)[0]) for name, t in (("gap", gap), ("subspace", subspace))}


def test_recommended_eigen_terms_run_on_the_factor_and_match_the_full_path(batch):
    """The recommended step computes both eigen-terms from the network's factor A (K_max x K_max Gram matrix); each
    term's value and gradient w.r.t. A agree with a complex128 full-matrix reference to 1e-5 (hinge made active)."""
    cfg = preset("recommended", **SMALL, **{"fixes.gap_margin": 50.0})
    model = build_model(cfg.system, cfg.model)
    R_samp = rsamp_for(batch, cfg.fixes, cfg.system)
    out = model(batch.y, batch.H, batch.codes, R_samp=R_samp)
    losses, cov = compute_losses(out, batch, R_samp, cfg)
    assert cov.factored is not None and cov.factored.F is out.A and cov.eigen_input() is cov.factored
    assert losses["gap"] > 0  # active
    for name, (ref, g_ref) in full_matrix_reference(out.A, batch, cfg).items():
        (g,) = torch.autograd.grad(losses[name], out.A, retain_graph=True)
        assert abs(float(losses[name].detach()) - float(ref)) <= 1e-5 * abs(float(ref)), name
        assert (g.to(torch.complex128) - g_ref).abs().max() <= 1e-5 * g_ref.abs().max(), name


def test_which_presets_take_the_factored_path(batch):
    """Seed presets (QR retraction, trace-normalised blend, seed estimator) keep the full-matrix path; recommended
    with a blend of its low-rank beamscan R_samp stays factored (rank <= 2 K_max), with the seed R_samp it does not."""
    b = batch[:4]
    for name, overrides, factored in [*[(p, {}, False) for p in SEED_PRESETS], ("recommended", {}, True),
                                      ("recommended", {"fixes.beta": 0.3}, True),
                                      ("recommended", {"fixes.beta": 0.3, "fixes.rsamp_estimator": "seed"}, False)]:
        cfg = preset(name, **SMALL, **overrides)
        R_samp = rsamp_for(b, cfg.fixes, cfg.system)
        out = build_model(cfg.system, cfg.model)(b.y, b.H, b.codes, R_samp=R_samp)
        _, cov = compute_losses(out, b, R_samp, cfg, terms=("nmse",))
        assert (cov.factored is not None) == factored, (name, overrides)
        if factored:
            assert cov.factored.F.shape[-1] <= 2 * cfg.system.K_max
