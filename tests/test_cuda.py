"""The same numbers on CUDA as on the CPU: simulate, one forward pass through the pipeline, the eigen-terms (values and
gradients), the ML fit, MUSIC and MVDR localisation with their closed-form refinements, a short training, and
``workbench compare --budget tiny`` end to end on the device.

Marked ``cuda`` (``make test-gpu`` runs ``pytest -m cuda``); skipped where no CUDA device is present. Tolerances
are float32/complex64 ones: the two devices round differently, the formulas are the same."""

from __future__ import annotations

import json

import pytest
import torch

from workbench import spectral
from workbench.config import SystemConfig, preset
from workbench.forward import TrainingData, forward, rsamp_cache
from workbench.localisation import localise
from workbench.ml_fit import ml_localise
from workbench.model import build_model
from workbench.physics import simulate
from workbench.train import fit

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = {"system.N_H": 6, "system.N_V": 6, "model.width": 16, "model.heads": 2, "model.layers": 1}
CUDA = torch.device("cuda")


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3, atol_rel: float = 1e-4) -> None:
    """a (any device) close to b: relative tolerance, absolute tolerance relative to b's largest entry."""
    a, b = a.detach().cpu(), b.detach().cpu()
    atol = atol_rel * float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_simulate_is_the_same_on_both_devices():
    system = SystemConfig(N_H=6, N_V=6)
    cpu, gpu = simulate(system, 8, seed=1), simulate(system, 8, seed=1, device=CUDA)
    assert gpu.y.device.type == "cuda"
    for name, t in cpu.tensors().items():
        if t.is_floating_point() or t.is_complex():
            _close(getattr(gpu, name), t)
        else:
            assert torch.equal(getattr(gpu, name).cpu(), t), name


@pytest.mark.parametrize("name", ["recommended", "seed_fix2"])
def test_one_forward_through_the_pipeline_and_its_gradients(name):
    """R_samp, its prior factor (canonical phase: the same on both devices), the covariances of one forward, every
    loss term (the eigen-terms included) and the gradient of the total."""
    cfg = preset(name, **SMALL)
    batch = simulate(cfg.system, 6, seed=2)
    gb = batch.to(CUDA)
    c_cpu, c_gpu = rsamp_cache(batch), rsamp_cache(gb)
    _close(c_gpu.rsamp_of(cfg), c_cpu.rsamp_of(cfg))
    if cfg.model.rsamp_input:
        _close(c_gpu.prior_of(cfg), c_cpu.prior_of(cfg), rtol=1e-2, atol_rel=1e-3)
    results = {}
    for dev, b, cache in (("cpu", batch, c_cpu), ("cuda", gb, c_gpu)):
        model = build_model(cfg.system, cfg.model, dev, seed=0)
        f = forward(model, b, cache.rsamp_of(cfg), cfg, prior=cache.prior_of(cfg), losses=True)
        grads = torch.autograd.grad(f.losses["total"], list(model.parameters()), allow_unused=True)
        results[dev] = (f, grads)
    (fc, gc), (fg, gg) = results["cpu"], results["cuda"]
    assert fg.cov.R_blend.device.type == "cuda"
    for m in ("R_pred", "R_samp", "R_blend", "R_ref"):
        _close(getattr(fg.cov, m), getattr(fc.cov, m), rtol=1e-2, atol_rel=1e-3)
    for k in fc.losses:
        assert float(fg.losses[k].detach()) == pytest.approx(float(fc.losses[k].detach()), rel=1e-2, abs=1e-4), k
    for a, b in zip(gg, gc):
        if b is not None:
            _close(a, b, rtol=5e-2, atol_rel=1e-2)


@pytest.mark.parametrize("backend", ["eigh", "eigvalsh", "exact"])
def test_eigen_terms_values_and_gradients(backend):
    gen = torch.Generator().manual_seed(0)
    N, r = 16, 3
    A = torch.randn(4, N, r, dtype=torch.complex64, generator=gen)
    K = torch.tensor([1, 2, 3, 2])
    a_true = torch.randn(4, 3, N, dtype=torch.complex64, generator=gen)
    mask = torch.arange(3)[None, :] < K[:, None]
    out = {}
    for dev in ("cpu", "cuda"):
        X = A.to(dev).requires_grad_(True)
        R = X @ X.mH + 1e-3 * torch.eye(N, dtype=X.dtype, device=dev)
        gap = spectral.eigengap_hinge(R, K.to(dev), 0.5, 1e-4, backend).sum()
        sub = spectral.subspace_energy(R, a_true.to(dev), mask.to(dev), K.to(dev), "safe").sum()
        g_gap, = torch.autograd.grad(gap, X, retain_graph=True)
        g_sub, = torch.autograd.grad(sub, X)
        out[dev] = (gap, sub, g_gap, g_sub)
    for c, g in zip(out["cpu"], out["cuda"]):
        _close(g, c, rtol=1e-2, atol_rel=1e-3)


def test_batched_complex_eigh_on_the_device():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(32, 144, 144, dtype=torch.complex64, generator=gen).to(CUDA)
    R = 0.5 * (X + X.mH)
    ev, V = torch.linalg.eigh(R)
    eye = torch.eye(144, dtype=R.dtype, device=CUDA).expand_as(R)
    torch.testing.assert_close(V.mH @ V, eye, atol=1e-4, rtol=0)
    scale = float(ev.abs().max())
    torch.testing.assert_close(R @ V, V * ev[..., None, :].to(V.dtype), atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("relax_cycles", [0, 1])
def test_ml_localise_on_two_scenes(relax_cycles):
    system = SystemConfig(N_H=4, N_V=4, K_max=2, snr_db_min=20.0, snr_db_max=20.0)
    b = simulate(system, 2, seed=3)
    cpu = ml_localise(b.y, b.H, b.codes, system, K=b.K, relax_cycles=relax_cycles)
    g = b.to(CUDA)
    gpu = ml_localise(g.y, g.H, g.codes, system, K=g.K, relax_cycles=relax_cycles)
    assert gpu.loc.phi.device.type == "cuda"
    for name in ("phi", "theta"):
        _close(getattr(gpu.loc, name), getattr(cpu.loc, name), rtol=1e-3, atol_rel=1e-3)
    _close(gpu.loc.r, cpu.loc.r, rtol=1e-2, atol_rel=1e-2)


def test_the_perfect_search_and_its_frontier_on_the_device():
    """ml_localise(start=the true sources) (the count's frontier's oracle) on CUDA: the CPU's nested likelihoods and, at
    every penalty, its counts."""
    system = SystemConfig(N_H=4, N_V=4, K_max=3, snr_db_min=20.0, snr_db_max=20.0)
    b = simulate(system, 3, seed=4)
    start = (b.phi, b.theta, b.r, b.power, b.mask)
    cpu = ml_localise(b.y, b.H, b.codes, system, start=start)
    g = b.to(CUDA)
    gpu = ml_localise(g.y, g.H, g.codes, system, start=(g.phi, g.theta, g.r, g.power, g.mask))
    assert gpu.levels["nll"].device.type == "cuda"
    _close(gpu.levels["nll"], cpu.levels["nll"], rtol=1e-5, atol_rel=1e-5)
    for x in (0.5, 1.0, 2.0):
        assert torch.equal(gpu.count_at(x).cpu(), cpu.count_at(x))


@pytest.mark.parametrize("method", ["music", "mvdr"])
def test_localise_with_its_refinements_on_the_device(method):
    """The spectrum, RAP-MUSIC's scans and both sub-grid refinements (closed-form gradients and Hessians) on CUDA give the
    CPU's sources on exact covariances."""
    system = SystemConfig(N_H=6, N_V=6, K_max=3)
    b = simulate(system, 3, seed=2)
    R = b.R_true.to(torch.complex128)
    cpu = localise(R, system, method=method, K=b.K)
    gpu = localise(R.to(CUDA), system, method=method, K=b.K.to(CUDA))
    assert gpu.phi.device.type == "cuda" and torch.equal(gpu.mask.cpu(), cpu.mask)
    for name in ("phi", "theta"):
        _close(getattr(gpu, name)[cpu.mask], getattr(cpu, name)[cpu.mask], rtol=1e-4, atol_rel=1e-4)
    _close(gpu.r[cpu.mask], cpu.r[cpu.mask], rtol=1e-3, atol_rel=1e-3)


def test_a_short_training_has_the_cpu_history():
    over = {**SMALL, "train.n_train": 16, "train.n_val": 8, "train.batch_size": 8, "train.epochs": 1}
    hist = {}
    for dev in ("cpu", "cuda"):
        cfg = preset("recommended", **over, **{"train.device": dev})
        data = TrainingData.simulate(cfg)
        assert data.device.type == dev
        res = fit(cfg, data=data, progress=False)
        assert next(res.model.parameters()).device.type == dev
        hist[dev] = res.history[0]
    c, g = hist["cpu"], hist["cuda"]
    assert g["steps"] == c["steps"] and g["skipped_nonfinite"] == c["skipped_nonfinite"] == 0
    for k in ("train_loss", "val_loss", "val_nmse"):
        assert g[k] == pytest.approx(c[k], rel=1e-3), k
    for k, v in c["terms"].items():
        assert g["terms"][k] == pytest.approx(v, rel=1e-2, abs=1e-5), k


def test_compare_tiny_end_to_end_on_the_device(tmp_path):
    """``workbench compare --budget tiny``: trained on CUDA (train.device auto), evaluated there (the checkpoints load
    onto the run's own device), NMSE rows and localisation for every entry."""
    from workbench.checkpoints import load_checkpoint
    from workbench.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--budget", "tiny", "--presets", "seed_fix2,recommended", "--out", str(out), "--snrs", "20",
                 "--n-per-snr", "2", "--no-progress"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert {r["predictor"] for r in result["nmse"]} >= {"seed_fix2", "recommended"}
    assert {"seed_fix2:R_pred", "recommended:R_pred"} <= set(result["localisation"]["covariances"])
    run = load_checkpoint(out / "recommended" / "checkpoint.pt")
    assert next(run.model.parameters()).device.type == "cuda"
