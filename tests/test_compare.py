"""The comparison study (workbench.studies.compare, `workbench compare`): every entry trained on the same scenes with
the same budget, a NaN-prone entry shows its skipped steps, and the results table equals a direct recomputation from
the checkpoints it saved. Tiny systems throughout (the "tiny" budget: a 4 x 4 RIS, 16 training scenes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench import cli
from workbench import experiments as E
from workbench.checkpoints import RunFolder, load_checkpoint
from workbench.config import ConfigError
from workbench.figures import compare as fig_compare
from workbench.forward import TrainingData, rsamp_cache
from workbench.studies import compare as C
from workbench.studies.baselines import baseline_rows, network_nmse
from workbench.studies.localisation import localisation_vs_snr, model_sources

pytestmark = pytest.mark.slow
SNRS = (10.0, 20.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """seed_fix2 and recommended with the subspace term on (weight 0.1) for both: seed_fix2 differentiates it with plain
    eigh through its degenerate spectrum (NaN gradients), recommended with the safe backward."""
    out = tmp_path_factory.mktemp("compare")
    overrides = E.budget_overrides("tiny", {"loss.subspace": 0.1})
    result = C.compare(["seed_fix2", "recommended"], overrides, out, snrs_db=SNRS, n_per_snr=3, progress=False)
    return out, overrides, result


def test_every_entry_trains_on_the_same_scenes(study):
    out, overrides, result = study
    cfgs = {name: RunFolder(out / name).config() for name in result["entries"]}
    keys = {TrainingData.key_of(c) for c in cfgs.values()}
    assert len(keys) == 1  # same system, scene counts, seed
    assert cfgs["seed_fix2"].fixes != cfgs["recommended"].fixes  # yet different presets
    data = TrainingData.simulate(cfgs["recommended"])
    assert result["scenes"]["digest"] == E.scenes_digest(data)
    steps = {n: r["steps"] for n, r in result["runs"].items()}
    assert len(set(steps.values())) == 1 and steps["recommended"] == overrides["train.epochs"] * math.ceil(16 / 8)


def test_a_nan_prone_preset_shows_its_skipped_steps(study):
    _, _, result = study
    rows = {r["row"]: r for r in result["table"]}
    assert rows["seed_fix2: R_pred"]["skipped"] > 0 and rows["recommended: R_pred"]["skipped"] == 0
    assert any("subspace" in p for p in result["runs"]["seed_fix2"]["provenance"])
    assert "seed_fix2" in fig_compare.conclusion(result).split("\n")[0]


def test_table_equals_a_recomputation_from_the_saved_checkpoints(study):
    """Every number of a trained row comes from the held-out test split: the NMSE recomputed from the checkpoint on
    C.test_scenes, the localisation statistics recomputed by localisation_vs_snr on the "test" split (same seeds)."""
    out, _, result = study
    rows = {r["row"]: r for r in result["table"]}
    loc = result["localisation"]
    assert loc["split"] == "test" and result["scenes"]["test_seed"] == result["scenes"]["seed"]
    for name in result["entries"]:
        run = load_checkpoint(out / name / "checkpoint.pt")
        test = C.test_scenes(run.config)
        cache = rsamp_cache(test)
        values = network_nmse(run.model, test, cache.rsamp_of(run.config), run.config, prior=cache.prior_of(run.config))
        assert rows[f"{name}: R_pred"]["nmse"]["value"] == pytest.approx(float(values.mean()), rel=1e-5)
        assert rows[f"{name}: R_pred"]["nmse"]["lo"] <= rows[f"{name}: R_pred"]["nmse"]["value"] <= rows[f"{name}: R_pred"]["nmse"]["hi"]
        again = localisation_vs_snr(run.config.system, list(SNRS), 3, model_sources({name: run}, blend=False), seed=run.config.train.seed,
                                    split="test")
        assert again["scene_seeds"] == loc["scene_seeds"]
        for i, s in enumerate(SNRS):
            mine = rows[f"{name}: R_pred"]["localisation"][f"{s:g}"]
            for mode in ("true_k", "own_k"):
                for stat in ("nerr_phi", "rmse_r_m", "miss_rate", "false_alarm_rate", "k_accuracy"):
                    assert mine[mode][stat] == again["per_source"][f"{name}:R_pred"][mode][i][stat], (name, s, mode, stat)


def test_test_scenes_are_disjoint_from_training_and_a_second_test_seed_rescores():
    from workbench.forward import SPLITS, split_seed
    from workbench.studies.localisation import snr_scene_seed

    cfg = E.entry_config("recommended", E.budget_overrides("tiny"))
    seeds = {split_seed(0, s) for s in SPLITS} | {split_seed(0, "test", 0), snr_scene_seed(0, 0, "test"), snr_scene_seed(0, 0, "dev")}
    assert len(seeds) == len(SPLITS) + 3  # every stream has its own seed
    data, test = TrainingData.simulate(cfg), C.test_scenes(cfg)
    for t in (data.train.y, data.val.y):
        assert not any(torch.equal(t[i], test.y[j]) for i in range(len(t)) for j in range(len(test)))
    other = C.test_scenes(cfg, test_seed=1)
    assert not torch.equal(other.y, test.y) and len(other) == len(test) == cfg.train.n_val


def test_the_table_holds_the_references_and_the_fitted_baselines(study):
    _, _, result = study
    rows = {r["row"]: r for r in result["table"]}
    assert rows["R_true (exact, noise-free)"]["nmse"]["value"] == 0.0
    for m in rows["R_true (exact, noise-free)"]["localisation"].values():
        assert m["true_k"]["nerr_phi"]["value"] < 1e-3 and m["true_k"]["miss_rate"]["value"] == 0.0
    nmse = {r["predictor"]: r for r in result["nmse"]}
    assert rows["scaled identity"]["nmse"] == nmse["identity"]["nmse_ci"] and rows["scaled identity"]["localisation"] is None
    assert "noise variance" in rows["beamscan R_samp (a B + c I)"]["oracle"]
    phys = rows["physics baseline: ML from snapshots (a X + c I)"]
    assert phys["oracle"].startswith("none") and phys["penalty_scale"] == nmse["physics_affine"]["penalty_scale"]
    from workbench.studies.baselines import PHYSICS_SCALES

    assert phys["penalty_scale"] in PHYSICS_SCALES and "penalty_scale" not in rows["scaled identity"]
    # the conclusion names the fitted penalty where the physics baseline is the best one
    best = min((r for r in result["table"] if r["kind"] == "baseline" and r["nmse"]), key=lambda r: r["nmse"]["value"])
    text = fig_compare.conclusion(result)
    assert (f"MDL penalty (x{phys['penalty_scale']:g}" in text) == (best is phys)
    only_physics = {**result, "table": [r for r in result["table"] if r["kind"] != "baseline" or r is phys]}
    assert f"MDL penalty (x{phys['penalty_scale']:g} Rissanen's" in fig_compare.conclusion(only_physics)
    assert rows["recommended: R_pred"]["oracle"].startswith("true noise variance") and rows["seed_fix2: R_pred"]["oracle"] == "none"
    # the beamscan baselines came from the R_samp caches: the same numbers as from their own source
    cfg = E.entry_config("recommended", E.budget_overrides("tiny"))
    data = TrainingData.simulate(cfg)
    test = C.test_scenes(cfg)
    direct = {r["predictor"]: r for r in baseline_rows(data.train, test, cfg.system, names=("beamscan_scaled", "beamscan_affine"))}
    for name in ("beamscan_scaled", "beamscan_affine"):
        assert direct[name]["nmse"] == pytest.approx(nmse[name]["nmse"], rel=1e-4)
        assert direct[name]["a"] == pytest.approx(nmse[name]["a"], rel=1e-4)
    table = fig_compare.format_table(result["table"])
    n_loc = sum(len(r["localisation"] or {}) for r in result["table"])
    assert table.count("\n") == len(result["table"]) + 1 + 3 + n_loc and "err/√CRB φ (true K)" in table and "miss (own K)" in table


def test_runs_are_reused_only_when_their_config_is_the_same(study, tmp_path):
    out, overrides, result = study
    cfgs = E.entry_configs(["recommended"], overrides)
    data = TrainingData.simulate(cfgs["recommended"])
    again = E.train_entries(cfgs, data, out, progress=False)["recommended"]
    assert again.extra["reused"] and again.history == result["runs"]["recommended"]["history"]
    longer = E.entry_configs(["recommended"], {**overrides, "train.epochs": 3})
    run = E.train_entries(longer, data, tmp_path, progress=False)["recommended"]
    assert not run.extra["reused"] and len(run.history) == 3


def test_bad_entries_and_data_are_refused():
    with pytest.raises(ConfigError, match="entry = 'seed_fix9' is not allowed"):
        E.entry_configs(["seed_fix9"])
    with pytest.raises(ConfigError, match="given twice"):
        E.entry_configs(["recommended", "recommended"])
    with pytest.raises(ConfigError, match="budget = 'huge' is not allowed"):
        E.budget_overrides("huge")
    tiny = E.budget_overrides("tiny")
    other = TrainingData.simulate(E.entry_config("recommended", {**tiny, "train.seed": 5}))
    with pytest.raises(ConfigError, match="another system, size or seed"):
        C.compare(["recommended"], tiny, data=other, progress=False)
    # the physics-head variant is a measurements-only network: no R_samp input, no oracle
    cfg = E.entry_config("physics_head")
    assert cfg.model.head == "physics" and not cfg.model.rsamp_input and C._entry_oracle(cfg.to_dict()) == "none"


def test_cli_writes_the_table_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--budget", "tiny", "--presets", "seed_before", "--snrs", "20", "--n-per-snr", "2", "--out", str(out),
                   "--no-progress", "--threads", "1"])
    printed = capsys.readouterr().out
    assert rc == 0 and "| seed_before: R_pred |" in printed
    saved = json.loads((out / "compare.json").read_text())
    assert saved["entries"] == ["seed_before"] and (out / "table.md").read_text().startswith("| predictor |")
    assert (out / "seed_before" / "checkpoint.pt").exists()
    assert cli.main(["compare", "--presets", "seed_before,nope", "--out", str(tmp_path / "x")]) == 2
    assert "--presets = 'nope' is not allowed" in capsys.readouterr().err
    assert cli.main(["compare", "--snrs", "0,x", "--out", str(tmp_path / "x")]) == 2
    assert "--snrs" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_training_rows_and_conclusion_come_from_the_histories(study):
    out, _, result = study
    runs = {n: load_checkpoint(out / n / "checkpoint.pt") for n in result["entries"]}
    rows = {r["preset"]: r for r in C.training_rows(runs)}
    assert rows["seed_fix2"]["gradients finite"] is False and rows["recommended"]["gradients finite"] is True
    assert rows["seed_fix2"]["skipped steps"] == result["runs"]["seed_fix2"]["skipped_nonfinite"]
    text = fig_compare.training_conclusion(list(rows.values()))
    assert f"seed_fix2: {rows['seed_fix2']['skipped steps']} steps skipped" in text
    assert f"{rows['recommended']['final val NMSE']:.3g}" in text
    assert torch.isfinite(torch.tensor(rows["recommended"]["final val NMSE"]))
