"""Checks of the network's physics head (model.head = "physics"): at initialisation it is the physics baseline
(R_pred = the trace-normalised ML covariance, K = the MDL count), it keeps ModelOutput's contract, every loss
term gives finite gradients to every head parameter, the ML fits are memoised per scene, and the default head
is unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from workbench import likelihood as LK
from workbench import model as model_module
from workbench.config import ModelConfig, preset
from workbench.covariance import nmse, trace_normalise
from workbench.estimators import rsamp_for
from workbench.losses import compute_losses
from workbench.model import build_model
from workbench.physics import simulate

SMALL = {"system.N_H": 4, "system.N_V": 4, "system.M": 8, "system.L": 8, "system.K_max": 3, "model.width": 32, "model.heads": 2}


@pytest.fixture(scope="module")
def setup():
    cfg = preset("recommended", **SMALL, **{"model.head": "physics"})
    batch = simulate(cfg.system, 6, seed=3)
    return cfg, batch, rsamp_for(batch, cfg.fixes, cfg.system), build_model(cfg.system, cfg.model, seed=0)


def test_physics_head_starts_as_the_physics_baseline(setup):
    cfg, batch, Rs, model = setup
    s = cfg.system
    out = model(batch.y, batch.H, batch.codes, R_samp=Rs)
    fit = LK.ml_fit_for(batch, s)  # K by MDL, as the head's initial K logits
    assert (out.k_logits.argmax(1) + 1 == fit.loc.K).all()
    R_pred = out.A @ out.A.mH
    assert nmse(R_pred, trace_normalise(fit.covariance(s))).max() < 1e-6
    assert out.A.shape == (6, s.N, s.K_max) and out.A.dtype == torch.complex64
    assert out.k_logits.shape == (6, s.K_max) and out.angles.shape == (6, s.K_max, 3)
    pm, tm = math.radians(s.phi_max_deg), math.radians(s.theta_max_deg)
    phi, theta, r = out.angles.unbind(-1)
    assert (phi.abs() <= pm + 1e-6).all() and (theta.abs() <= tm + 1e-6).all() and ((r >= s.r_min_m - 1e-5) & (r <= s.r_max_m + 1e-5)).all()


def test_physics_head_gradients_are_finite_and_reach_every_learned_part(setup):
    """All loss terms of the recommended preset: finite gradients; the source gains/corrections, the K logits,
    their temperature and the correction scale all receive a non-zero gradient (the masked sqrt is guarded).
    The head's inputs from the encoder start with zero weights (R_pred is exactly the baseline), so the encoder
    gets its first gradient after one step."""
    cfg, batch, Rs, _ = setup
    model = build_model(cfg.system, cfg.model, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        losses, _ = compute_losses(model(batch.y, batch.H, batch.codes, R_samp=Rs), batch, Rs, cfg)
        losses["total"].backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (step, name)
        for name in ("slot.weight", "k.weight", "k_temperature.scale", "correction.scale"):
            g = dict(model.head.named_parameters())[name].grad
            assert g is not None and g.abs().sum() > 0, (step, name)
        opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_physics_fits_are_computed_once_per_scene(setup, monkeypatch):
    cfg, batch, Rs, _ = setup
    model = build_model(cfg.system, cfg.model, seed=1)
    calls = []
    real = model_module.ml_localise
    monkeypatch.setattr(model_module, "ml_localise", lambda y, *a, **k: calls.append(len(y)) or real(y, *a, **k))
    first = model(batch.y[:4], batch.H[:4], batch.codes[:4], R_samp=Rs[:4]).A
    again = model(batch.y[:4], batch.H[:4], batch.codes[:4], R_samp=Rs[:4]).A
    assert calls == [4] and torch.equal(first, again)
    model(batch.y[2:], batch.H[2:], batch.codes[2:], R_samp=Rs[2:])  # scenes 2, 3 known, 4, 5 new
    assert calls == [4, 2]


def test_default_head_is_unchanged():
    assert ModelConfig().head == "factor"
    cfg = preset("seed_fix1", **SMALL)
    model = build_model(cfg.system, cfg.model)
    assert set(model.head.keys()) == {"factor", "k", "angles"}
