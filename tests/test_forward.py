"""The one forward pass (device moves, outputs where the caller asks) and the one R_samp cache (computed once per
scene and key, the prior factor with it). CPU only: another device is played by ``meta``."""

from __future__ import annotations

import pytest
import torch

import workbench.model as model_module
from workbench import forward as FW
from workbench.config import preset
from workbench.forward import TrainingData, forward, rsamp_cache
from workbench.losses import compute_losses
from workbench.model import CovarianceNet, ModelOutput, build_model
from workbench.physics import simulate
from workbench.train import fit, torch_threads

SMALL = {"system.N_H": 6, "system.N_V": 6, "model.width": 16, "model.heads": 2, "model.layers": 1}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):  # the project's own context manager, restoring the count after
        yield


@pytest.fixture(scope="module")
def cfg():
    return preset("recommended", **SMALL)  # beamscan R_samp (rank <= K_max), rsamp_input on


@pytest.fixture(scope="module")
def batch(cfg):
    return simulate(cfg.system, 6, seed=3)


class _Seen(Exception):
    pass


class _Recorder(torch.nn.Module):
    """A model double on ``meta``: records the devices of what it is given, then stops the pass."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.seen: dict[str, torch.device] = {}

    def forward(self, y, H, codes, R_samp=None, amp=False, prior=None):
        self.seen = {"y": y.device, "H": H.device, "codes": codes.device, "R_samp": R_samp.device, "prior": prior.device}
        raise _Seen


def test_inputs_are_moved_to_the_models_device(cfg, batch):
    cache = rsamp_cache(batch)
    rec = _Recorder()
    with pytest.raises(_Seen):
        forward(rec, batch, cache.rsamp_of(cfg), cfg, prior=cache.prior_of(cfg))
    assert batch.y.device.type == "cpu"
    assert {d.type for d in rec.seen.values()} == {"meta"}, rec.seen


def test_outputs_come_back_where_the_caller_asks(cfg, batch):
    model = build_model(cfg.system, cfg.model, seed=0)
    cache = rsamp_cache(batch)
    Rs, prior = cache.rsamp_of(cfg), cache.prior_of(cfg)
    with torch.no_grad():
        here = forward(model, batch, Rs, cfg, prior=prior, losses=True)
        there = forward(model, batch, Rs, cfg, prior=prior, losses=True, out_device="meta")
    assert here.out.A.device.type == "cpu" and here.cov.R_blend.device.type == "cpu"
    assert there.out.A.device.type == "meta" and there.out.k_logits.device.type == "meta"
    assert all(getattr(there.cov, f).device.type == "meta" for f in ("R_pred", "R_samp", "R_blend", "R_ref", "target"))
    assert all(v.device.type == "meta" for v in there.losses.values())
    if there.cov.factored is not None:
        assert there.cov.factored.F.device.type == "meta"
    # the same numbers as the model and compute_losses called by hand (the model computing the prior itself)
    with torch.no_grad():
        out = model(batch.y, batch.H, batch.codes, R_samp=Rs)
        losses, cov = compute_losses(out, batch, Rs, cfg)
    torch.testing.assert_close(here.out.A, out.A)
    torch.testing.assert_close(here.cov.R_blend, cov.R_blend)
    assert here.losses["total"].item() == pytest.approx(losses["total"].item(), rel=1e-5)
    assert forward(model, batch, Rs, cfg).losses is None


def test_the_cache_computes_once_per_key(cfg, batch, monkeypatch):
    b = batch[:4]  # a batch of its own: an empty cache
    calls = []
    real = FW.rsamp_raw
    monkeypatch.setattr(FW, "rsamp_raw", lambda bb, fixes, system: calls.append(fixes.rsamp_estimator) or real(bb, fixes, system))
    cache = rsamp_cache(b)
    assert rsamp_cache(b) is cache and rsamp_cache(b[:2]) is not cache
    first = cache.rsamp_of(cfg)
    again = cache.rsamp_of(cfg)
    assert again is first and calls == ["beamscan"]
    p1, p2 = cache.prior_of(cfg), cache.prior_of(cfg)
    assert p1 is p2 and cache.counts["prior"] == 1 and p1.shape == (4, cfg.system.N, cfg.system.K_max)
    other = cache.rsamp("ls_scatter", cfg.system)
    assert calls == ["beamscan", "ls_scatter"] and not torch.equal(other, first)
    raw = cache.raw("ls_scatter", cfg.system)  # raw was not kept for the normalised entry: computed once now
    assert cache.raw("ls_scatter", cfg.system) is raw and calls == ["beamscan", "ls_scatter", "ls_scatter"]
    assert cache.rsamp("ls_scatter", cfg.system, normalise=False) is raw
    # TrainingData reads the caches of its batches
    data = TrainingData(b, b[:2])
    assert data.rsamp("train", cfg) is first and data.prior("train", cfg) is p1 and len(calls) == 3
    assert data.prior("train", cfg.replace(**{"model.rsamp_input": False})) is None


def test_prior_factor_from_the_thin_factor_equals_the_eigh_one(cfg, batch, monkeypatch):
    """Beamscan R_samp has rank <= K_max: the factor comes from low_rank_factor; with it disabled, from eigh. Same
    projector, and (the column phase is canonical) the same factor up to the columns of (near-)zero eigenvalues."""
    R = rsamp_cache(batch).rsamp_of(cfg)
    k = cfg.system.K_max
    used = []
    real = model_module.low_rank_factor
    monkeypatch.setattr(model_module, "low_rank_factor", lambda R, k: used.append(1) or real(R, k))
    thin = CovarianceNet.prior_factor(R, k)
    assert used and real(0.5 * (R + R.mH), k) is not None
    monkeypatch.setattr(model_module, "low_rank_factor", lambda R, k: None)
    full = CovarianceNet.prior_factor(R, k)
    torch.testing.assert_close(thin @ thin.mH, full @ full.mH, atol=1e-5, rtol=1e-4)
    strong = full.abs().pow(2).sum(-2) > 1e-3  # columns of a real source (a share of the trace above 1e-3)
    assert strong.any()
    torch.testing.assert_close(thin.mT[strong], full.mT[strong], atol=1e-4, rtol=1e-3)
    # a full-rank R_samp has no thin factor: eigh
    Rf = rsamp_cache(batch).rsamp("ls_scatter", cfg.system)
    assert real(0.5 * (Rf + Rf.mH), k) is None


def test_a_training_step_decomposes_no_NxN_matrix(monkeypatch):
    """Under ``recommended``, with the cache warm, training steps and validation take the prior factor from it:
    no N x N eigh anywhere in fit."""
    cfg = preset("recommended", **SMALL, **{"train.n_train": 4, "train.n_val": 2, "train.batch_size": 4, "train.epochs": 1,
                                            "train.device": "cpu"})
    data = TrainingData.simulate(cfg)
    data.prior("train", cfg), data.prior("val", cfg)
    sizes = []
    real = torch.linalg.eigh

    def counting(A, *args, **kwargs):
        sizes.append(A.shape[-1])
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    res = fit(cfg, data=data, progress=False)
    assert res.history[0]["steps"] == 1 and res.history[0]["skipped_nonfinite"] == 0
    assert cfg.system.N not in sizes, sizes


def test_model_output_is_a_dataclass_the_mover_keeps():
    out = ModelOutput(A=torch.zeros(1, 2, 1, dtype=torch.complex64), k_logits=torch.zeros(1, 1), angles=torch.zeros(1, 1, 3))
    moved = FW._move(out, torch.device("meta"))
    assert isinstance(moved, ModelOutput) and moved.A.device.type == "meta" and moved.A.dtype == torch.complex64
