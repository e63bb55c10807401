"""Checks of the network's physics head (model.head = "physics"): at initialisation it is the physics baseline
(R_pred = the trace-normalised ML covariance, K = the MDL count), it keeps ModelOutput's contract, every loss
term gives finite gradients to every head parameter, the ML fits are computed once per batch of scenes (kept on the
batch's R_samp cache, shared with the physics baseline's source, taken by index in training) and give the output the
old per-scene memo gave, and the default head is unchanged."""

from __future__ import annotations

import hashlib
import inspect
import math

import pytest
import torch

from workbench import ml_fit as MF
from workbench import model as model_module
from workbench.config import ConfigError, ModelConfig, preset
from workbench.covariance import nmse, trace_normalise
from workbench.estimators import rsamp_for
from workbench.forward import TrainingData, forward, rsamp_cache
from workbench.losses import compute_losses
from workbench.model import PhysicsFits, build_model
from workbench.physics import simulate
from workbench.studies.localisation import PhysicsSource, model_sources
from workbench.train import fit

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
    fit = MF.ml_fit_for(batch, s)  # K by MDL, as the head's initial K logits
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


def _old_memo_fits(model, memo: dict, y, H, codes) -> dict:
    """The physics head's fits as the model computed them before they moved to the batch cache: a blake2b digest of
    each scene's (y, H, codes) bytes as memo key, ml_localise on the scenes not yet seen, one .cpu() per scene."""
    def digest(*ts):
        h = hashlib.blake2b(digest_size=16)
        for t in ts:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()
    keys = [digest(y[b], H[b], codes[b]) for b in range(y.shape[0])]
    missing = [b for b, k in enumerate(keys) if k not in memo]
    if missing:
        idx = torch.tensor(missing)
        with torch.no_grad():
            f = MF.ml_localise(y[idx], H[idx], codes[idx], model.system)
        for j, b in enumerate(missing):
            memo[keys[b]] = {**{k: v[j].cpu() for k, v in f.levels.items()}, "criterion": f.criterion[j].cpu()}
    return {k: torch.stack([memo[key][k] for key in keys]) for k in memo[keys[0]]}


def test_physics_head_output_is_unchanged_against_the_old_memo_path(setup):
    """The cached fits (forward() from the batch cache, training's indexed slices, a bare call) give the output the
    per-scene digest memo gave, to float tolerance; so does a fit in other chunk sizes."""
    cfg, batch, Rs, model = setup
    old = _old_memo_fits(model, {}, batch.y, batch.H, batch.codes)
    ref = model._physics_head  # run the head on the old fits through the same encoder pass
    h_out = {}

    def capture(h, A, fits):
        h_out["h"], h_out["A"] = h, A
        return ref(h, A, fits)
    model._physics_head = capture
    try:
        with torch.no_grad():
            via_cache = forward(model, batch, Rs, cfg).out
    finally:
        del model._physics_head
    as_old = PhysicsFits(**{n: old[n] for n in PhysicsFits.__dataclass_fields__})
    with torch.no_grad():
        expected = model._physics_head(h_out["h"], h_out["A"], as_old)
        bare = model(batch.y, batch.H, batch.codes, R_samp=Rs)
        cache_fits = rsamp_cache(batch).physics_fits(cfg.system)
        idx = torch.tensor([4, 1, 3])
        sliced = model(batch.y[idx], batch.H[idx], batch.codes[idx], R_samp=Rs[idx], fits=cache_fits[idx])
        chunked = PhysicsFits.of(MF.ml_localise(batch.y, batch.H, batch.codes, cfg.system, chunk=4))
    for got in (via_cache, bare):
        for name in ("A", "k_logits", "angles"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
    for name in ("A", "k_logits", "angles"):
        torch.testing.assert_close(getattr(sliced, name), getattr(expected, name)[idx], rtol=1e-5, atol=1e-6)
    for name in PhysicsFits.__dataclass_fields__:
        torch.testing.assert_close(getattr(cache_fits, name), old[name], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(getattr(chunked, name), old[name], rtol=1e-4, atol=1e-8)  # complex64 products per chunk


def test_physics_fits_are_computed_once_per_scene_across_two_epochs(setup, monkeypatch):
    """Training a physics head for 2 epochs (train and val scenes, several steps per epoch) fits every scene once:
    ml_localise sees n_train + n_val scenes in all, in one call per split, and the model never fits on its own."""
    cfg, _, _, _ = setup
    cfg = cfg.replace(**{"train.n_train": 6, "train.n_val": 3, "train.epochs": 2, "train.batch_size": 2, "train.device": "cpu",
                         "model.layers": 1})
    calls, bare = [], []
    real = MF.ml_localise
    monkeypatch.setattr(MF, "ml_localise", lambda y, *a, **k: calls.append(len(y)) or real(y, *a, **k))
    monkeypatch.setattr(model_module, "ml_localise", lambda y, *a, **k: bare.append(len(y)) or real(y, *a, **k))
    data = TrainingData.simulate(cfg)
    result = fit(cfg, data, progress=False)
    assert len(result.history) == 2 and result.history[-1]["steps"] == 3
    assert sorted(calls) == [3, 6] and bare == []
    assert data.cache("train").counts["ml_fit"] == 1 and data.cache("val").counts["ml_fit"] == 1
    fit(cfg.replace(**{"train.seed": 0}), data, progress=False)  # a second run on the same data: no new fit
    assert sorted(calls) == [3, 6]


def test_physics_source_and_physics_head_share_one_fit(setup, monkeypatch):
    """On one batch, the physics baseline's localisation source and a physics-head network's source use one ML fit
    (the batch cache's ("ml_fit", system) entry), whichever runs first."""
    cfg, batch, _, model = setup
    b = batch[:3]  # a batch object of its own: an empty cache
    calls = []
    real = MF.ml_localise
    monkeypatch.setattr(MF, "ml_localise", lambda y, *a, **k: calls.append(len(y)) or real(y, *a, **k))
    monkeypatch.setattr(model_module, "ml_localise", lambda *a, **k: pytest.fail("the model fitted on its own"))

    class Run:
        config, model = cfg, None
    run = Run()
    run.model = model
    net = model_sources({"head": run}, blend=False)["head:R_pred"]
    net(b)
    R, k = PhysicsSource(cfg.system, "mdl")(b)
    assert calls == [3] and rsamp_cache(b).counts["ml_fit"] == 1
    assert torch.equal(k, rsamp_cache(b).ml_fit(cfg.system).loc.K)


def test_no_per_scene_memo_remains():
    src = inspect.getsource(model_module)
    for word in ("blake2b", "hashlib", "_digest", "self._fits", ".cpu()"):
        assert word not in src, word
    assert not hasattr(build_model(preset("recommended", **SMALL).system, ModelConfig(width=16, heads=2)), "_fits")


def test_ml_chunk_follows_the_device():
    assert MF.ML_CHUNK["cpu"] == 64 and MF.ML_CHUNK["cuda"] >= 256
    assert MF.ml_chunk("cpu") == 64 and MF.ml_chunk(torch.device("cuda", 1)) == MF.ML_CHUNK["cuda"]
    assert MF.ml_chunk("meta") == MF.ML_CHUNK_DEFAULT
    b = simulate(preset("recommended", **SMALL).system, 1, seed=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="chunk"):
            MF.ml_localise(b.y, b.H, b.codes, preset("recommended", **SMALL).system, chunk=bad)


def test_default_head_is_unchanged():
    assert ModelConfig().head == "factor"
    cfg = preset("seed_fix1", **SMALL)
    model = build_model(cfg.system, cfg.model)
    assert set(model.head.keys()) == {"factor", "k", "angles"}
