"""The learned localiser (workbench/detector.py): shapes, units and ranges of what it returns; that no oracle field of a
scene is read; the detection loss (invariant to the order of the true sources, lower at the truth, lowered by
training); the likelihood refinement; the grid's fractional indices; config validation. Tiny budgets."""

import math

import pytest
import torch

from workbench.config import ConfigError, ModelConfig, SystemConfig
from workbench.detector import PAD_SHARE, Detection, LocaliserNet, detection_grid, detector_atoms
from workbench.experiments import VARIANTS, entry_config
from workbench.forward import forward, rsamp_cache
from workbench.grid import Grid
from workbench.likelihood import crb_for
from workbench.losses import compute_losses, detection_loss
from workbench.metrics import score_sources
from workbench.ml_fit import ml_refine
from workbench.model import build_model
from workbench.physics import SceneBatch, simulate
from workbench.train import fit

TINY = {"system.N_H": 4, "system.N_V": 4, "system.M": 8, "system.L": 8, "system.K_max": 2, "model.width": 8,
        "model.layers": 1, "model.detector_step_deg": 10.0, "model.detector_n_r": 3}


def _cfg(**extra):
    return entry_config("localiser", {**TINY, **extra})


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    batch = simulate(cfg.system, 6, seed=4)
    model = build_model(cfg.system, cfg.model, seed=1).eval()
    return cfg, batch, model


def _run(model, batch, cfg, R_samp=None):
    R_samp = rsamp_cache(batch).rsamp_of(cfg) if R_samp is None else R_samp
    with torch.no_grad():
        return forward(model, batch, R_samp, cfg)


def test_outputs_have_documented_shapes_units_and_ranges(setup):
    cfg, batch, model = setup
    s = cfg.system
    assert isinstance(model, LocaliserNet) and "localiser" in VARIANTS
    out, cov, _ = _run(model, batch, cfg)
    B, N, Kmax = len(batch), s.N, s.K_max
    src = out.sources
    assert out.A.shape == (B, N, Kmax) and out.A.dtype == torch.complex64
    assert out.k_logits.shape == (B, Kmax) and out.angles.shape == (B, Kmax, 3)
    assert out.detection.logits.shape == (B, *model.grid.shape) and out.detection.offsets.shape == (B, 3, *model.grid.shape)
    assert out.detection.offsets.abs().max() <= 0.5
    assert ((src.K >= 1) & (src.K <= Kmax)).all()
    assert torch.equal(out.k_logits.argmax(1) + 1, src.K)  # the count's logits agree with the decoded count
    assert torch.equal(src.mask, torch.arange(Kmax)[None, :] < src.K[:, None])  # real sources first
    assert ((src.score >= 0) & (src.score <= 1)).all() and (src.score[:, :-1] >= src.score[:, 1:]).all()
    pm, tm = math.radians(s.phi_max_deg), math.radians(s.theta_max_deg)
    assert (src.phi.abs() <= pm + 1e-9).all() and (src.theta.abs() <= tm + 1e-9).all()
    assert ((src.r >= s.r_min_m - 1e-9) & (src.r <= s.r_max_m + 1e-9)).all()
    assert (src.power[src.mask] > 0).all() and (src.power[~src.mask] == 0).all()
    assert torch.isfinite(src.noise_var).all() and (src.noise_var > 0).all()
    # powers in mW on the scale of the true ones (the refinement fits them); R_pred sum_k p_k a_k a_k^H in mW
    R = src.covariance(s)
    assert R.shape == (B, N, N)
    torch.testing.assert_close(R, R.mH)
    torch.testing.assert_close(torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1), src.power.sum(1).float(), rtol=1e-4, atol=0)
    ratio = src.power.sum(1) / batch.power.sum(1)
    assert ((ratio > 1e-2) & (ratio < 1e2)).all()
    # the pipeline's R_pred = A A^H is the same matrix trace-normalised to N (plus the next peaks at PAD_SHARE each)
    torch.testing.assert_close(cov.R_pred, R * (N / src.power.sum(1).float())[:, None, None], rtol=1e-3, atol=1e-3)
    pad = out.A.abs().square().sum(1)[~src.mask]  # the next peaks, at PAD_SHARE of the trace each
    torch.testing.assert_close(pad, torch.full_like(pad, N * PAD_SHARE), rtol=1e-4, atol=0)


@pytest.mark.parametrize("reread,picks", [("project", "network"), ("whiten", "network"), ("project", "network+likelihood")])
def test_no_oracle_field_is_read(setup, reread, picks):
    cfg, batch, model = setup
    model.set_decoding(detector_reread=reread, detector_round_picks=picks)
    R_samp = rsamp_cache(batch).rsamp_of(cfg)
    clean = _run(model, batch, cfg, R_samp).out
    nan = float("nan")
    poisoned = SceneBatch(y=batch.y.clone(), H=batch.H.clone(), codes=batch.codes.clone(),
                          signal=torch.full_like(batch.signal, nan), R_true=torch.full_like(batch.R_true, nan),
                          K=torch.full_like(batch.K, 99), phi=torch.full_like(batch.phi, nan), theta=torch.full_like(batch.theta, nan),
                          r=torch.full_like(batch.r, nan), power=torch.full_like(batch.power, nan), mask=~batch.mask,
                          snr_db=torch.full_like(batch.snr_db, nan), noise_var=torch.full_like(batch.noise_var, nan))
    dirty = _run(model, poisoned, cfg, torch.full_like(R_samp, nan)).out
    for name in ("A", "k_logits", "angles"):
        assert torch.isfinite(getattr(dirty, name)).all()
        assert torch.equal(getattr(dirty, name), getattr(clean, name)), name
    for name in ("K", "phi", "theta", "r", "power", "mask", "score", "noise_var"):
        assert torch.equal(getattr(dirty.sources, name), getattr(clean.sources, name)), name
    assert torch.equal(dirty.detection.logits, clean.detection.logits)
    model.set_decoding(detector_reread=cfg.model.detector_reread, detector_round_picks=cfg.model.detector_round_picks)


def test_the_rounds_reread_the_snapshots_given_the_kept_sources_fit():
    """model.detector_reread: with no source kept, both ways read the snapshots themselves (whitening by sigma^2 I is a
    scale, and the features are relative to the scene's maximum); with the strong source of a 30 dB two-source scene
    fitted, its cell falls below the map's maximum in both: by 5 dB or more when projected out, by 2 dB or more when
    whitened (the whitened model keeps 1 / (1 + SNR) of it along its own atom, more along its neighbours'). The weak
    source's cell is then within 2.5 dB of the maximum (projected) or the maximum itself (whitened), where the raw maps
    had it up to 6 dB below in these scenes."""
    cfg = _cfg(**{"system.K_min": 2, "system.snr_db_min": 30.0, "system.snr_db_max": 30.0})
    b = simulate(cfg.system, 3, seed=5)
    model = build_model(cfg.system, cfg.model, seed=1).eval()
    atoms = detector_atoms(cfg.system, model.grid, b.H, b.codes)
    raw = model.features(b.y, b.H, b.codes, atoms)
    strong = b.power.argmax(1, keepdim=True)
    keep = torch.arange(2)[None, :] == strong
    phi, theta, r, power, noise_var = ml_refine(b.y, b.H, b.codes, cfg.system, b.phi, b.theta, b.r, keep, 25)

    def at_cell(feats, which=strong):  # the first map (log10 relative to its maximum) at a source's cell
        cell = model.grid.fractional_index(*(t.gather(1, which)[:, 0] for t in (b.phi, b.theta, b.r))).round().long()
        cell = torch.minimum(cell.clamp_min(0), torch.tensor(model.grid.shape) - 1)
        return feats[torch.arange(3), 0, cell[:, 0], cell[:, 1], cell[:, 2]]

    weak = 1 - strong
    assert (at_cell(raw) > -0.5).all()  # the strong source is (near) the raw map's maximum
    for reread in ("project", "whiten"):
        model.set_decoding(detector_reread=reread)
        none = model.reread(b.y, b.H, b.codes, atoms, phi, theta, r, torch.zeros_like(keep), power, noise_var)
        torch.testing.assert_close(none, raw, rtol=0, atol=2e-4)
        given = model.reread(b.y, b.H, b.codes, atoms, phi, theta, r, keep, power, noise_var)
        assert given.shape == raw.shape and torch.isfinite(given).all()
        drop = {"project": 0.5, "whiten": 0.2}[reread]
        assert (at_cell(given) < at_cell(raw) - drop).all(), (reread, at_cell(given), at_cell(raw))
        assert (at_cell(given, weak) >= {"project": -0.25, "whiten": 0.0}[reread]).all(), (reread, at_cell(given, weak))
    with pytest.raises(ConfigError, match="detector_reread"):
        _cfg(**{"model.detector_reread": "subtract"})


def _permuted(batch: SceneBatch, order: torch.Tensor) -> SceneBatch:
    t = batch.tensors()
    return SceneBatch(**{**t, **{k: t[k][:, order] for k in ("phi", "theta", "r", "power", "mask")}})


def test_validation_scores_the_heatmap_without_refining(setup):
    cfg, batch, model = setup
    with torch.no_grad():
        with model.validation():
            val = model(batch.y, batch.H, batch.codes)
        model.train()
        try:
            train = model(batch.y, batch.H, batch.codes)
        finally:
            model.eval()
        inferred = model(batch.y, batch.H, batch.codes)
    assert torch.equal(val.angles, train.angles) and not torch.equal(val.angles, inferred.angles)
    assert not model._validating


def test_detection_loss_is_invariant_to_the_order_of_the_true_sources(setup):
    cfg, batch, model = setup
    det = _run(model, batch, cfg).out.detection
    base = detection_loss(det, batch)
    for order in (torch.tensor([1, 0]),):
        torch.testing.assert_close(detection_loss(det, _permuted(batch, order)), base, rtol=1e-6, atol=0)
    # it depends on where the sources are: moving them changes it
    moved = SceneBatch(**{**batch.tensors(), "phi": -batch.phi + 0.3 * batch.mask})
    assert not torch.isclose(detection_loss(det, moved), base)


def test_detection_loss_is_lowest_at_the_truth(setup):
    cfg, batch, model = setup
    grid = model.grid
    frac = grid.fractional_index(batch.phi, batch.theta, torch.where(batch.mask, batch.r, 1.0))
    shape = torch.tensor(grid.shape) - 1
    near = torch.minimum(frac.clamp_min(0), shape).round().long()
    logits = torch.full((len(batch), *grid.shape), -8.0)
    offsets = torch.zeros(len(batch), 3, *grid.shape)
    for b, k in zip(*batch.mask.nonzero(as_tuple=True)):
        p, t, q = near[b, k].tolist()
        logits[b, p, t, q] = 8.0
        offsets[b, :, p, t, q] = (frac[b, k] - near[b, k]).float()
    right = detection_loss(Detection(logits, offsets, grid), batch)
    wrong = detection_loss(Detection(logits.flip(1), offsets, grid), batch)
    assert right < 0.05 < wrong
    assert detection_loss(Detection(logits, torch.zeros_like(offsets) + 0.4, grid), batch) > right


def test_compute_losses_reports_detect_only_for_a_heatmap(setup):
    cfg, batch, model = setup
    R_samp = rsamp_cache(batch).rsamp_of(cfg)
    model.train()
    try:
        losses, _ = compute_losses(model(batch.y, batch.H, batch.codes), batch, R_samp, cfg)
    finally:
        model.eval()
    assert losses["detect"].requires_grad and torch.isclose(losses["total"], losses["detect"])  # the variant trains on it alone
    plain = build_model(cfg.system, ModelConfig(width=8, heads=2, layers=1))
    other, _ = compute_losses(plain(batch.y, batch.H, batch.codes), batch, R_samp, cfg)
    assert float(other["detect"]) == 0.0


def test_training_on_a_tiny_set_lowers_the_detection_loss():
    cfg = _cfg(**{"train.n_train": 16, "train.n_val": 8, "train.epochs": 6, "train.batch_size": 8, "train.lr": 1e-2,
                  "model.refine_iters": 0, "model.detector_count": "threshold", "model.detector_relax": 0})  # no refinement: nothing to compare
    run = fit(cfg, progress=False)
    h = run.history
    assert all(r["skipped_nonfinite"] == 0 for r in h)
    assert h[-1]["terms"]["detect"] < 0.7 * h[0]["terms"]["detect"], [r["terms"]["detect"] for r in h]


def test_prune_drops_weak_and_duplicate_sources_and_keeps_the_count_consistent(setup):
    cfg, batch, model = setup
    B, K = 3, cfg.system.K_max + 1
    model = build_model(cfg.system.replace(K_max=K), cfg.model).eval()
    phi = torch.tensor([[0.1, 0.1 + 1e-3, -0.4]]).repeat(B, 1)  # slot 1 duplicates slot 0
    theta, r = torch.zeros(B, K), torch.full((B, K), 2.0)
    power = torch.tensor([[1e-4, 5e-5, 1e-12]]).repeat(B, 1).double()  # slot 2 far below the noise
    keep = torch.ones(B, K, dtype=torch.bool)
    score = torch.tensor([[0.9, 0.8, 0.7]]).repeat(B, 1)
    gain = torch.ones(B, K)
    H, codes = batch.H[:B], batch.codes[:B]
    score2, alive, phi2, _, _, p2, k_logits = model.prune(H, codes, score, keep, phi, theta, r, power, torch.full((B,), 1e-9).double(),
                                                          gain.cumsum(1))
    assert alive.tolist() == [[True, False, False]] * B and torch.equal(phi2[:, 0], phi[:, 0])
    assert torch.equal(k_logits.argmax(1) + 1, alive.sum(1)) and (p2[~alive] == 0).all()


def test_refinement_moves_detections_towards_the_sources():
    s = SystemConfig(N_H=6, N_V=6, K_max=2, snr_db_min=25, snr_db_max=25)
    b = simulate(s, 8, seed=2)
    start = (b.phi + 0.03 * b.mask, b.theta - 0.03 * b.mask, b.r)
    err = lambda phi, theta: ((phi - b.phi).abs() + (theta - b.theta).abs())[b.mask].mean()  # noqa: E731
    phi, theta, r, power, noise_var = ml_refine(b.y, b.H, b.codes, s, *start, b.mask, iters=8)
    assert err(phi, theta) < 0.3 * err(*start[:2])
    assert (power[~b.mask] == 0).all() and torch.isfinite(noise_var).all()
    ratio = (noise_var / b.noise_var.double())
    assert ((ratio > 0.3) & (ratio < 3)).all()


def test_grid_fractional_index_round_trip():
    s = SystemConfig(N_H=6, N_V=6)
    grid = Grid.default(s, step_deg=5.0, n_r=4)
    idx = torch.tensor([[0.0, 0.0, 0.0], [3.25, 2.5, 1.75], [float(n - 1) for n in grid.shape]], dtype=torch.float64)
    back = grid.fractional_index(*grid.from_fractional(idx))
    torch.testing.assert_close(back, idx)
    phi, theta, r = grid.coords(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(grid.fractional_index(phi, theta, r), torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))


def test_detector_config_is_validated():
    with pytest.raises(ConfigError, match="model.head.*'detector'"):
        ModelConfig(head="detektor")
    with pytest.raises(ConfigError, match="model.detector_threshold"):
        ModelConfig(detector_threshold=1.5)
    with pytest.raises(ConfigError, match="model.refine_iters"):
        ModelConfig(refine_iters=-1)
    with pytest.raises(ConfigError, match="model.detector_min_snr_db"):
        ModelConfig(detector_min_snr_db=float("nan"))
    assert detection_grid(SystemConfig(), ModelConfig(detector_step_deg=4.0, detector_n_r=6)).shape == (31, 16, 6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_localiser_on_cuda_matches_cpu(setup):
    cfg, batch, model = setup
    cuda = build_model(cfg.system, cfg.model, "cuda", seed=1).eval()
    out_cpu = _run(model, batch, cfg).out
    out_gpu = _run(cuda, batch.to("cuda"), cfg).out
    assert out_gpu.A.device.type == "cuda"
    assert torch.equal(out_gpu.sources.K.cpu(), out_cpu.sources.K)
    torch.testing.assert_close(out_gpu.angles.cpu(), out_cpu.angles, rtol=1e-3, atol=1e-3)


def test_compare_takes_the_localiser_as_an_entry(tmp_path):
    from workbench.studies import compare as C

    cfg = entry_config("localiser")
    assert cfg.model.head == "detector" and C._entry_oracle(cfg.to_dict()) == "none"
    res = C.compare(["localiser"], {**TINY, "train.n_train": 8, "train.n_val": 4, "train.epochs": 1, "train.batch_size": 4},
                    snrs_db=[20.0], n_per_snr=2, baselines=("identity",), progress=False, n_boot=20)
    row = next(r for r in res["table"] if r["row"] == "localiser: R_pred")
    assert row["oracle"] == "none" and row["localisation"]["20"]["own_k"]["k_accuracy"]["value"] is not None


def test_the_localiser_command_trains_scores_and_writes_the_result_file(tmp_path, capsys):
    """`workbench train --preset localiser` makes a run folder; `workbench localiser --run` scores it against the ML fit
    on the test split and writes the result pair whose markdown is what the formatter makes of its numbers."""
    import json

    from workbench.cli import main
    from workbench.figures.results import markdown

    sets = [a for k, v in {**TINY, "train.n_train": 8, "train.n_val": 4, "train.epochs": 1, "train.batch_size": 4}.items()
            for a in ("--set", k, json.dumps(v))]
    run = tmp_path / "loc"
    assert main(["train", "--preset", "localiser", *sets, "--out", str(run), "--no-progress", "--threads", "1"]) == 0
    res = tmp_path / "res"
    assert main(["localiser", "--run", str(run), "--snrs", "20", "--n-per-snr", "3", "--n-boot", "20", "--threads", "1",
                 "--results", str(res)]) == 0
    summary = json.loads(res.with_suffix(".json").read_text())
    assert summary["kind"] == "localiser" and summary["split"] == "test" and summary["command"]
    assert [(r["snr_db"], r["estimator"], r["oracle"]) for r in summary["rows"]] == [
        (20.0, "localiser", "none"), (20.0, "ML fit", "none"), (20.0, "ML fit", "true K"), (20.0, "ML fit + RELAX", "none"),
        (20.0, "ML fit + RELAX", "true K"), (20.0, "localiser", "true K"), (20.0, "ML fit from the truth", "true locations")]
    # each ML fit's misses given the true K are split by cause: search failures are a part of them
    assert [m["estimator"] for m in summary["search"]] == ["ML fit", "ML fit + RELAX"]
    assert all(0 <= m["search_failures"] <= m["scenes_with_miss"] <= m["scenes"] == 3 for m in summary["search"])
    assert all(r["seconds_per_scene"] > 0 for r in summary["rows"])
    from workbench.studies.localisation import snr_batch, snr_scene_seed

    scored = snr_batch(entry_config("localiser", TINY).system, 20.0, 3, snr_scene_seed(0, 0, "test"))
    for m in summary["miss_by_snr"]:  # every true source of the scored scenes falls in one array-SNR bin
        assert sum(b["n"] for b in m["bins"]) == int(scored.K.sum()) and m["bins"][0]["lo"] is None and m["bins"][-1]["hi"] is None
    assert summary["training"]["n_train"] == 8 and summary["decoding"]["detector_rounds"] == entry_config("localiser").model.detector_rounds
    md = res.with_suffix(".md").read_text()
    assert md == markdown(summary) and "| 20 | localiser |" in md and "goal <= 0.5x" in md
    assert "Given the true K" in md and "with the true K, nerr over every pair" in md and "array SNR" in md
    assert "x the ML fit + RELAX's" in md and "| 20 | ML fit from the truth |" in md and "search failures" in md
    # the count's frontier: each fit at every penalty scale; at the fits' own scale it is the fit's own count (the rows')
    from workbench.studies.localiser import FRONTIER_SCALES

    front = summary["frontier"]
    assert [(f["estimator"], f["scale"]) for f in front] == [
        (n, x) for n in ("ML fit", "ML fit + RELAX", "ML fit from the truth") for x in FRONTIER_SCALES]
    rows = {(r["estimator"], r["oracle"]): r["stats"] for r in summary["rows"]}
    for f in front:
        assert f["oracle"] == ("true locations" if f["estimator"] == "ML fit from the truth" else "none")
        if f["entry"] and f["oracle"] == "none":
            assert all(f[k] == rows[f["estimator"], "none"][k] for k in ("miss_rate", "false_alarm_rate", "k_accuracy"))
    assert sum(f["entry"] for f in front) == 3 and "The count's frontier" in md and "perfect search" in md
    # a run of another head is refused, naming --run
    assert main(["train", "--preset", "recommended", *sets[:len(TINY) * 3], "--set", "train.n_train", "4", "--set", "train.n_val", "2",
                 "--set", "train.epochs", "1", "--out", str(tmp_path / "rec"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["localiser", "--run", str(tmp_path / "rec"), "--n-per-snr", "1"]) == 2
    err = capsys.readouterr().err
    assert "--run" in err and "'detector'" in err


def test_relax_replaces_a_duplicate_by_the_peak_the_network_finds(monkeypatch):
    """model.detector_relax: started with both slots of two-source scenes on source 0 (a duplicate, as the greedy
    rounds leave one: a local optimum far below the truth's in most of these scenes) and a network whose heatmap peaks
    at source 1's cell, one RELAX cycle reaches the likelihood of the fit started at the true locations in every scene;
    the count stays and the likelihood only rises. It needs refinement steps (ConfigError naming the field)."""
    cfg = _cfg(**{"system.K_min": 2, "system.snr_db_min": 30.0, "system.snr_db_max": 30.0, "model.detector_relax": 1,
                  "model.refine_iters": 25})
    b = simulate(cfg.system, 4, seed=2)
    model = build_model(cfg.system, cfg.model, seed=1).eval()
    grid = model.grid
    cell = grid.fractional_index(b.phi[:, 1], b.theta[:, 1], b.r[:, 1]).round().long()
    cell = torch.minimum(cell.clamp_min(0), torch.tensor(grid.shape) - 1)
    logits = torch.full((len(b), *grid.shape), -10.0)
    logits[torch.arange(len(b)), cell[:, 0], cell[:, 1], cell[:, 2]] = 10.0
    monkeypatch.setattr(model, "heatmap", lambda feats, amp=False: Detection(logits, torch.zeros(len(b), 3, *grid.shape), grid, feats))
    keep = torch.ones(len(b), 2, dtype=torch.bool)
    start = [torch.stack([t[:, 0], t[:, 0] * (1 + d)], 1).float() for t, d in ((b.phi, 0.02), (b.theta, 0.02), (b.r, 0.05))]
    *_, nll_start = ml_refine(b.y, b.H, b.codes, cfg.system, *start, keep, 25, with_nll=True)
    *_, nll_truth = ml_refine(b.y, b.H, b.codes, cfg.system, b.phi, b.theta, b.r, keep, 25, with_nll=True)
    assert ((nll_start - nll_truth) > 10.0).sum() >= 2  # the duplicate start is a poor local optimum
    phi, theta, r, power, noise_var, nll = model.relax(b.y, b.H, b.codes, False, None, keep, *start)
    assert (nll <= nll_start + 1e-9).all() and (nll <= nll_truth + 0.5).all(), (nll - nll_truth)
    assert phi.shape == (len(b), 2) and (power > 0).all() and (noise_var > 0).all()
    with pytest.raises(ConfigError, match="model.detector_relax"):
        _cfg(**{"model.detector_relax": 1, "model.refine_iters": 0, "model.detector_count": "threshold"})


def test_a_given_count_is_kept_and_checked(setup):
    """With the true K given (oracle, the peers' RMSE), the refined localiser returns exactly that many sources in every
    scene (rounds add the residual's strongest peaks, the strongest K are kept), where counting for itself it does not;
    a bad count is refused naming ``count``, and so is a count for a model that cannot take one."""
    cfg, batch, model = setup
    R_samp = rsamp_cache(batch).rsamp_of(cfg)
    count = torch.tensor([1, 2, 2, 1, 2, 1])
    with torch.no_grad():
        own = forward(model, batch, R_samp, cfg).out.sources
        given = forward(model, batch, R_samp, cfg, count=count).out.sources
    assert torch.equal(given.K, count) and not torch.equal(own.K, count)
    assert torch.equal(given.mask, torch.arange(cfg.system.K_max)[None, :] < count[:, None])
    assert (given.power[given.mask] > 0).all() and (given.power[~given.mask] == 0).all()
    with pytest.raises(ConfigError, match="count"):
        forward(model, batch, R_samp, cfg, count=torch.full((len(batch),), cfg.system.K_max + 1))
    rec = entry_config("recommended", {k: v for k, v in TINY.items() if not k.startswith("model.detector")})
    with pytest.raises(ConfigError, match="count"):
        forward(build_model(rec.system, rec.model), batch, rsamp_cache(batch).rsamp_of(rec), rec, count=count)


def test_array_snr_adds_up_to_the_scene_snr():
    """Summed over a scene's sources, the per-snapshot array SNR p_k mean_l ||G_l a_k||^2 / sigma^2 is M times the
    scene's SNR per entry, as the simulator sets the noise (incoherent sources: their powers add)."""
    from workbench.likelihood import array_snr

    s = SystemConfig(N_H=4, N_V=4, M=6, L=10, K_max=3, snr_db_min=0.0, snr_db_max=20.0)
    b = simulate(s, 64, seed=3)
    snr = array_snr(s, b.H, b.codes, b.phi, b.theta, b.r, b.power, b.noise_var, b.mask)
    assert snr.shape == b.mask.shape and (snr[~b.mask] == 0).all() and (snr[b.mask] > 0).all()
    torch.testing.assert_close(snr.sum(1), s.M * 10 ** (b.snr_db.double() / 10), rtol=1e-4, atol=0)


def test_the_mdl_count_keeps_the_sources_and_drops_a_spurious_detection():
    """``model.detector_count = "mdl"`` (:meth:`LocaliserNet.mdl_count`): given the true sources plus one detection where
    there is none, at 30 dB, the ML fit's criterion over nested refits keeps exactly the true ones (the count's logits
    agree); with the threshold count the spurious one would stay (it is kept on input)."""
    s = SystemConfig(N_H=6, N_V=6, M=16, L=32, K_min=1, K_max=3, snr_db_min=30.0, snr_db_max=30.0, r_min_m=1.0, r_max_m=4.0)
    cfg = entry_config("localiser", {"system." + k: getattr(s, k) for k in ("N_H", "N_V", "M", "L", "K_min", "K_max", "snr_db_min",
                                                                          "snr_db_max", "r_min_m", "r_max_m")}
                       | {"model.detector_count": "mdl", "model.width": 8, "model.layers": 1})
    model = build_model(cfg.system, cfg.model, seed=0).eval()
    b = simulate(cfg.system, 40, seed=6)
    far = ((b.phi - 0.9).abs() > 0.35) | ~b.mask  # every true source far from the spurious detection at phi = 0.9 rad
    b = b[(far.all(1) & (b.K <= 2)).nonzero().flatten()[:8]]
    B, K = len(b), b.K
    slot = torch.arange(3)[None, :]
    spurious = slot == K[:, None]
    phi = torch.where(spurious, torch.full_like(b.phi, 0.9), b.phi)
    theta = torch.where(spurious, torch.full_like(b.theta, -0.3), b.theta)
    r = torch.where(spurious, torch.full_like(b.r, 2.5), torch.where(b.mask, b.r, torch.ones_like(b.r)))
    keep = slot <= K[:, None]
    with torch.no_grad():
        score, alive, phi2, theta2, r2, power, noise_var, k_logits = model.mdl_count(
            b.y, b.H, b.codes, torch.ones(B, 3), keep, phi, theta, r, torch.zeros(B, 3))
    assert torch.equal(alive.sum(1), K) and torch.equal(k_logits.argmax(1) + 1, K)
    assert (phi2[alive] - 0.9).abs().min() > 0.2  # the spurious detection is the one dropped
    assert (power[alive] > 0).all() and (power[~alive] == 0).all() and torch.isfinite(noise_var).all()
    with pytest.raises(ConfigError, match="refine_iters"):
        _cfg(**{"model.detector_count": "mdl", "model.refine_iters": 0})


def test_the_benchmark_times_a_decoding_it_is_given(capsys, monkeypatch):
    """benchmarks/bench_localiser.py --decoding FIELD VALUE sets a decoding field (here the faster decoding without
    RELAX) and says so; a field that is not a decoding one is refused by name."""
    import importlib.util
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # its `timing` helper
    spec = importlib.util.spec_from_file_location("bench_localiser", bench_dir / "bench_localiser.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--scenes", "8", "--batches", "8", "--repeats", "1", "--device", "cpu", "--threads", "1", "--decoding", "detector_relax", "0"])
    out = capsys.readouterr().out
    assert "set: detector_relax 0" in out and "| learned localiser |" in out and "| ML fit + RELAX (MDL) |" in out
    with pytest.raises(ConfigError, match="width"):
        bench.main(["--quick", "--device", "cpu", "--decoding", "width", "8"])


def _peak_at(model, b, k, monkeypatch):
    """The model's heatmap replaced by one that peaks at true source k's cell of every scene, whatever it reads."""
    grid = model.grid
    cell = grid.fractional_index(b.phi[:, k], b.theta[:, k], b.r[:, k]).round().long()
    cell = torch.minimum(cell.clamp_min(0), torch.tensor(grid.shape) - 1)
    logits = torch.full((len(b), *grid.shape), -10.0)
    logits[torch.arange(len(b)), cell[:, 0], cell[:, 1], cell[:, 2]] = 10.0
    monkeypatch.setattr(model, "heatmap", lambda feats, amp=False: Detection(logits, torch.zeros(len(b), 3, *grid.shape), grid, feats))


@pytest.mark.parametrize("K", [1, 2])
def test_round_likelihood_picks_find_what_the_network_misses_and_pay_for_themselves(K, monkeypatch):
    """model.detector_round_picks: with a network that only ever sees source 0, the later rounds of "network" find
    nothing new, so two-source scenes keep one source; "network+likelihood" also proposes the ML fit's likelihood pick
    given the kept fit and finds source 1 in every scene. In one-source scenes that pick is spurious and is proposed only
    where its unrefined likelihood gain exceeds ``ROUND_PICK_GATE`` times MDL's price of one source: it adds no source
    to any scene (no SNR floor, a threshold count: nothing else would drop it)."""
    cfg = _cfg(**{"system.K_min": K, "system.snr_db_min": 30.0, "system.snr_db_max": 30.0, "model.detector_rounds": 2,
                  "model.detector_count": "threshold", "model.detector_relax": 0, "model.detector_min_snr_db": -30.0,
                  "model.refine_iters": 10})
    b = simulate(cfg.system.replace(K_max=K), 6, seed=7)  # K sources in every scene
    hits, counts = {}, {}
    for picks in ("network", "network+likelihood"):
        model = build_model(cfg.system, cfg.model, seed=1).eval()
        model.set_decoding(detector_round_picks=picks)
        _peak_at(model, b, 0, monkeypatch)
        with torch.no_grad():
            src = model(b.y, b.H, b.codes).sources
        if K == 1:
            counts[picks] = src.K
        else:
            hits[picks] = score_sources(src.phi, src.theta, src.r, src.mask, b.phi, b.theta, b.r, b.mask,
                                        crb_for(b, cfg.system)).n_hit
    if K == 1:  # the network's own duplicate peak may refine into a spurious source; the likelihood adds none
        assert torch.equal(counts["network+likelihood"], counts["network"]), counts
    else:
        assert (hits["network"] <= 1).all() and (hits["network+likelihood"] == 2).all(), hits
    with pytest.raises(ConfigError, match="detector_round_picks"):
        _cfg(**{"model.detector_round_picks": "likelihood"})


def _frontier_result(truth_points: dict, ref=(0.04, 0.008), n=256) -> dict:
    """A localiser_vs_ml-shaped result with a frontier: the RELAX fit at (miss, false alarm) ``ref`` at the entry's
    scale, and the perfect search's points {scale: (miss, false alarm, K accuracy)} with binomial-width intervals."""
    def stat(v):
        half = 1.96 * math.sqrt(max(v * (1 - v), 1e-12) / n)
        return {"value": v, "lo": max(v - half, 0.0), "hi": v + half}

    def point(name, oracle, scale, m, f, k):
        return {"snr_db": 20.0, "estimator": name, "oracle": oracle, "scale": scale, "entry": scale == 1.5,
                "miss_rate": stat(m), "false_alarm_rate": stat(f), "k_accuracy": stat(k)}

    front = [point("ML fit + RELAX", "none", 1.5, *ref, 0.9)]
    front += [point("ML fit from the truth", "true locations", x, *v) for x, v in truth_points.items()]
    stats = {k: stat(v) for k, v in zip(("miss_rate", "false_alarm_rate", "k_accuracy"), (*ref, 0.9))}
    stats.update({k: stat(1.0) for k in ("nerr_hit_phi", "nerr_hit_theta", "nerr_hit_r")})
    rows = [{"snr_db": 20.0, "estimator": e, "oracle": "none", "stats": stats, "nmse": stat(0.02), "seconds_per_scene": 0.1}
            for e in ("localiser", "ML fit", "ML fit + RELAX")]
    return {"snr_db": [20.0], "rows": rows, "frontier": front, "mdl_scale": 1.5}


def test_the_frontier_conclusion_says_whether_a_perfect_search_meets_the_goal():
    """frontier_conclusion reads the perfect search's points against half the RELAX fit's rates: met where one scale
    is inside both (naming the least such scale), "excludes the goal" where the fewest misses within the false-alarm
    goal sit above the miss goal with their interval, "not decided" where the interval reaches it; the K-accuracy goal
    from the best scale; each row's misses against the perfect search's fewest at no more false alarms. frontier_figure
    draws one panel per SNR with every estimator and the goal."""
    from workbench.figures.localiser import frontier_conclusion, frontier_figure, frontier_table

    met = frontier_conclusion(_frontier_result({1.0: (0.05, 0.02, 0.8), 2.0: (0.015, 0.003, 0.96), 3.0: (0.012, 0.001, 0.97)}))
    assert "meets both at x2" in met and "0.015 / 0.003" in met and "0.97 at x3 (reaches" in met
    beyond = frontier_conclusion(_frontier_result({1.0: (0.03, 0.02, 0.85), 2.0: (0.06, 0.003, 0.88)}))
    assert "(x2, the least such) it misses 0.06" in beyond and "excludes the goal" in beyond and "(below the goal" in beyond
    # each row's misses against the perfect search's fewest at no more false alarms (here x2's 0.06 at 0.003 <= 0.008)
    assert "localiser 0.04 against 0.06 (0.667x)" in beyond and "ML fit + RELAX 0.04 against 0.06" in beyond
    close = frontier_conclusion(_frontier_result({2.0: (0.025, 0.003, 0.9)}))
    assert "reaches the goal: not decided" in close
    assert "more false alarms than the goal" in frontier_conclusion(_frontier_result({2.0: (0.01, 0.02, 0.9)}))
    assert frontier_conclusion({"snr_db": [20.0], "rows": []}) == "" and frontier_table({"rows": []}) == []
    res = _frontier_result({1.0: (0.03, 0.02, 0.85), 2.0: (0.06, 0.003, 0.88)})
    table = frontier_table(res)
    assert [r["estimator"] for r in table] == ["ML fit + RELAX", "ML fit from the truth"] and table[0]["x1.5*"] == "0.04 / 0.008"
    fig = frontier_figure(res)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert len(fig.axes) == 1 and {"ML fit + RELAX", "ML fit from the truth (oracle)", "localiser", "goal"} <= set(labels)
