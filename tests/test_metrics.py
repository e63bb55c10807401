"""Per-source localisation statistics on hand-made cases: a missed source, a false alarm, a source beyond the gate,
the per-source CRB normalisation, permutation invariance, and the bootstrap interval."""

import math

import numpy as np
import pytest

from workbench import metrics as M
from workbench.config import ConfigError

CRB = np.array([[[1e-4, 4e-4, 0.01], [1e-6, 1e-6, 1e-4]]])  # [B=1,T=2,3]: source 0 loosely bounded, source 1 tightly
TRUE = (np.array([[0.1, -0.3]]), np.array([[0.0, 0.2]]), np.array([[2.0, 5.0]]), np.array([[True, True]]))


def _score(ep, et, er, em, crb=CRB, **kw):
    return M.score_sources(np.array([ep]), np.array([et]), np.array([er]), np.array([em]), *TRUE, crb, **kw)


def test_exact_estimates_score_zero_error_and_no_miss():
    s = M.statistics(_score([0.1, -0.3], [0.0, 0.2], [2.0, 5.0], [True, True]))
    assert s["miss_rate"] == 0 and s["false_alarm_rate"] == 0 and s["k_accuracy"] == 1
    assert s["rmse_phi_deg"] == 0 and s["nerr_r"] == 0


def test_errors_are_normalised_by_each_source_own_bound():
    """One sqrt(CRB_k) off on every coordinate of both sources: nerr is exactly 1 although the errors differ 10-fold."""
    sd = np.sqrt(CRB[0])
    s = M.statistics(_score([0.1 + sd[0, 0], -0.3 + sd[1, 0]], [sd[0, 1], 0.2 + sd[1, 1]], [2.0 + sd[0, 2], 5.0 + sd[1, 2]], [True, True]))
    assert s["nerr_phi"] == pytest.approx(1.0) and s["nerr_theta"] == pytest.approx(1.0) and s["nerr_r"] == pytest.approx(1.0)
    assert s["nerr_hit_phi"] == pytest.approx(1.0) and s["miss_rate"] == 0
    rmse = math.sqrt((sd[0, 0] ** 2 + sd[1, 0] ** 2) / 2)
    assert s["rmse_phi_deg"] == pytest.approx(math.degrees(rmse))


def test_a_missed_source_a_false_alarm_and_a_source_beyond_the_gate():
    # only source 0 estimated: one miss, no false alarm, wrong count
    s = M.statistics(_score([0.1, 0.0], [0.0, 0.0], [2.0, 1.0], [True, False]))
    assert s["miss_rate"] == 0.5 and s["false_alarm_rate"] == 0 and s["k_accuracy"] == 0
    # three estimates for two sources: one false alarm
    s = M.statistics(M.score_sources(np.array([[0.1, -0.3, 0.9]]), np.array([[0.0, 0.2, 0.0]]), np.array([[2.0, 5.0, 3.0]]),
                                     np.array([[True, True, True]]), *TRUE, CRB))
    assert s["miss_rate"] == 0 and s["false_alarm_rate"] == pytest.approx(1 / 3) and s["k_accuracy"] == 0
    # source 1 estimated 4 sqrt(CRB) off in phi: beyond the 3-sigma gate -> a miss and a false alarm, still a Hungarian pair
    off = 4 * math.sqrt(CRB[0, 1, 0])
    sc = _score([0.1, -0.3 + off], [0.0, 0.2], [2.0, 5.0], [True, True])
    s = M.statistics(sc)
    assert s["miss_rate"] == 0.5 and s["false_alarm_rate"] == 0.5 and sc.n_pair[0] == 2 and sc.n_hit[0] == 1
    assert s["nerr_phi"] == pytest.approx(math.sqrt(16 / 2))  # over both pairs
    assert s["nerr_hit_phi"] == 0.0  # over the detection only
    # a wider gate makes it a detection; a grid-step floor wider than 4 sigma does too
    assert M.statistics(_score([0.1, -0.3 + off], [0.0, 0.2], [2.0, 5.0], [True, True], gate=5.0))["miss_rate"] == 0
    assert M.statistics(_score([0.1, -0.3 + off], [0.0, 0.2], [2.0, 5.0], [True, True], floor=(off, 0.0, 0.0)))["miss_rate"] == 0


def test_matching_is_invariant_to_the_order_of_the_estimates():
    a = M.statistics(_score([0.1, -0.29], [0.0, 0.2], [2.1, 5.0], [True, True]))
    b = M.statistics(_score([-0.29, 0.1], [0.2, 0.0], [5.0, 2.1], [True, True]))
    assert a == b


def test_bootstrap_interval_brackets_the_value_and_narrows_with_more_scenes():
    rng = np.random.default_rng(0)

    def scores(n):
        tp = rng.uniform(-1, 1, (n, 1))
        crb = np.full((n, 1, 3), 1e-4)
        est = tp + rng.normal(0, 1e-2, (n, 1))
        return M.score_sources(est, np.zeros((n, 1)), np.full((n, 1), 3.0), np.ones((n, 1), bool), tp, np.zeros((n, 1)),
                               np.full((n, 1), 3.0), np.ones((n, 1), bool), crb)

    small, big = M.summarise(scores(30), n_boot=400), M.summarise(scores(600), n_boot=400)
    for s in (small, big):
        v = s["nerr_phi"]
        assert v["lo"] <= v["value"] <= v["hi"]
        assert 0.8 < v["value"] < 1.2  # errors of one sqrt(CRB) on average
    assert (big["nerr_phi"]["hi"] - big["nerr_phi"]["lo"]) < 0.5 * (small["nerr_phi"]["hi"] - small["nerr_phi"]["lo"])
    sc = scores(20)
    assert M.summarise(sc, n_boot=50, seed=3) == M.summarise(sc, n_boot=50, seed=3)  # seeded


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="gate"):
        _score([0.1, -0.3], [0.0, 0.2], [2.0, 5.0], [True, True], gate=0)
    with pytest.raises(ConfigError, match="crb"):
        _score([0.1, -0.3], [0.0, 0.2], [2.0, 5.0], [True, True], crb=np.full((1, 2, 3), np.nan))
    with pytest.raises(ConfigError, match="n_boot"):
        M.summarise(_score([0.1, -0.3], [0.0, 0.2], [2.0, 5.0], [True, True]), n_boot=0)


def test_detected_marks_the_true_slots_and_miss_rate_by_bins_them():
    """``detected`` names which true source was found (slot 1 beyond the gate here); :func:`miss_rate_by` bins the true
    sources by a per-source value: every source in one bin, the bins' misses adding up to the overall miss rate."""
    off = 4 * math.sqrt(CRB[0, 1, 0])
    sc = _score([0.1, -0.3 + off], [0.0, 0.2], [2.0, 5.0], [True, True])
    assert sc.detected.tolist() == [[True, False]]
    two = M.SourceScores.cat([sc, _score([0.1, -0.3], [0.0, 0.2], [2.0, 5.0], [True, True])])  # scene 2: both found
    mask = np.ones((2, 2), dtype=bool)
    snr_db = np.array([[3.0, 12.0], [3.0, 12.0]])
    rows = M.miss_rate_by(two, mask, snr_db, [-math.inf, 10.0, math.inf], n_boot=50)
    assert [(r["lo"], r["hi"], r["n"]) for r in rows] == [(None, 10.0, 2), (10.0, None, 2)]
    assert rows[0]["miss"]["value"] == 0.0 and rows[1]["miss"]["value"] == 0.5
    total = sum(r["miss"]["value"] * r["n"] for r in rows) / sum(r["n"] for r in rows)
    assert total == pytest.approx(M.statistics(two)["miss_rate"])
    assert rows[1]["miss"]["lo"] <= 0.5 <= rows[1]["miss"]["hi"]
    assert math.isnan(M.miss_rate_by(two, mask, snr_db, [20.0, 30.0], n_boot=10)[0]["miss"]["value"])  # an empty bin
    with pytest.raises(ConfigError, match="edges"):
        M.miss_rate_by(two, mask, snr_db, [10.0, 5.0])
    with pytest.raises(ConfigError, match="values"):
        M.miss_rate_by(two, mask, snr_db[:1], [0.0, 5.0])


def test_a_detection_is_never_traded_for_two_pairs_outside_the_gate():
    """One estimate on source 0, another 10 sigma beyond it, source 1 10 sigma the other way: the least-error pairs
    cross (100 + 100 sigma^2 against 0 + 400), both outside the gate; the detections are matched gate first, so source
    0 is found (a miss and a false alarm, not two of each), while the errors over pairs stay those of the least-error
    assignment (what peers report as RMSE)."""
    crb = np.full((1, 2, 3), 1e-4)
    sd = 1e-2
    true = (np.array([[0.0, 10 * sd]]), np.zeros((1, 2)), np.full((1, 2), 2.0), np.ones((1, 2), dtype=bool))
    sc = M.score_sources(np.array([[0.0, -10 * sd]]), np.zeros((1, 2)), np.full((1, 2), 2.0), np.ones((1, 2), dtype=bool), *true, crb)
    s = M.statistics(sc)
    assert sc.n_hit[0] == 1 and sc.detected.tolist() == [[True, False]]
    assert s["miss_rate"] == 0.5 and s["false_alarm_rate"] == 0.5 and s["nerr_hit_phi"] == 0.0
    assert s["nerr_phi"] == pytest.approx(math.sqrt((100 + 100) / 2))  # the crossed, least-error pairs
