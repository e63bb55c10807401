import json
import math

import pytest

from workbench.config import (
    PRESETS,
    SEED_PRESETS,
    ConfigError,
    ExperimentConfig,
    FixConfig,
    ModelConfig,
    SystemConfig,
    TrainConfig,
    preset,
    resolve_device,
)


@pytest.mark.parametrize(
    "cls, kwargs, needles",
    [
        (SystemConfig, {"M": "16"}, ["system.M", "'16'", "integer"]),
        (SystemConfig, {"coherent": 1}, ["system.coherent", "true/false"]),
        (SystemConfig, {"carrier_hz": "1e9"}, ["system.carrier_hz", "number"]),
        (FixConfig, {"rsamp_estimator": 3}, ["fixes.rsamp_estimator", "string"]),
        (TrainConfig, {"epochs": 2.5}, ["train.epochs", "2.5", "integer"]),
    ],
)
def test_wrong_type_names_field_and_value(cls, kwargs, needles):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize(
    "cls, kwargs, needles",
    [
        (SystemConfig, {"M": 0}, ["system.M", "0", "[1, 256]"]),
        (SystemConfig, {"L": 0}, ["system.L", "0", "[1, 4096]"]),
        (SystemConfig, {"K_max": 0}, ["system.K_max", "0"]),
        (FixConfig, {"beta": 1.5}, ["fixes.beta", "1.5", "[0.0, 1.0]"]),
        (FixConfig, {"c_eps": -1.0}, ["fixes.c_eps", "-1.0"]),
        (FixConfig, {"gap_backend": "qr"}, ["fixes.gap_backend", "'qr'", "'eigh'", "'svd'"]),
        (TrainConfig, {"device": "tpu"}, ["train.device", "'tpu'", "'cuda'"]),
    ],
)
def test_out_of_range_names_field_value_and_allowed(cls, kwargs, needles):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    for needle in needles:
        assert needle in str(e.value)


@pytest.mark.parametrize("name", ["snr_db_min", "snr_db_max", "r_max_m", "carrier_hz"])
def test_nan_is_rejected(name):
    with pytest.raises(ConfigError, match=f"system.{name} = nan"):
        SystemConfig(**{name: math.nan})


def test_relations_between_fields():
    with pytest.raises(ConfigError, match="K_min"):
        SystemConfig(K_min=4, K_max=3)
    with pytest.raises(ConfigError, match="snr_db_min"):
        SystemConfig(snr_db_min=10.0, snr_db_max=0.0)
    with pytest.raises(ConfigError, match="K_max"):
        SystemConfig(N_H=2, N_V=2, K_max=4)  # K_max <= N - 1
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(width=100, heads=3)


def test_unknown_key_fails_naming_it_and_listing_allowed():
    with pytest.raises(ConfigError) as e:
        SystemConfig.from_dict({"M": 8, "antennas": 4})
    assert "antennas" in str(e.value) and "snr_db_min" in str(e.value)
    with pytest.raises(ConfigError, match="c_epsilon"):
        ExperimentConfig.from_dict({"fixes": {"c_epsilon": 1.0}})


def test_ints_are_accepted_for_floats_and_converted():
    s = SystemConfig(carrier_hz=2_000_000_000)
    assert isinstance(s.carrier_hz, float) and s.wavelength_m == pytest.approx(299_792_458.0 / 2e9)


def _non_default() -> ExperimentConfig:
    return ExperimentConfig(
        system=SystemConfig(M=8, L=32, coherent=True, snr_db_min=3.0, snr_db_max=7.5),
        fixes=FixConfig(c_eps=0.01, rsamp_estimator="covariance_matching", gap_backend="svd"),
        train=TrainConfig(epochs=3, lr=3e-4, device="cpu"),
    )


def test_dict_round_trip():
    cfg = _non_default()
    d = cfg.to_dict()
    assert d["system"]["L"] == 32 and d["fixes"]["gap_backend"] == "svd"
    assert ExperimentConfig.from_dict(d) == cfg
    assert ExperimentConfig.from_dict(d) != ExperimentConfig()


def test_json_round_trip_is_plain_json():
    cfg = _non_default()
    text = cfg.to_json()
    assert json.loads(text)["system"]["coherent"] is True
    assert ExperimentConfig.from_json(text) == cfg
    # a JSON with a bad value fails on load, naming the field
    bad = json.loads(text)
    bad["system"]["M"] = -1
    with pytest.raises(ConfigError, match="system.M"):
        ExperimentConfig.from_json(json.dumps(bad))


def test_presets_exist_and_are_valid():
    assert set(SEED_PRESETS) <= set(PRESETS) and "recommended" in PRESETS
    for name in PRESETS:
        cfg = preset(name)
        assert isinstance(cfg, ExperimentConfig)
        cfg.validate()
    with pytest.raises(ConfigError, match="'seed_fix9'"):
        preset("seed_fix9")


def test_seed_before_has_the_seed_notes_values():
    f = preset("seed_before").fixes
    # docs/design.md section 3, "seed value" column: before any fix
    assert (f.rsamp_normalise, f.rblend_trace_normalise) == (False, True)
    assert (f.c_eps, f.lam_gap, f.eps_psd, f.gap_margin, f.beta) == (1.0, 0.012, 1e-4, 0.03, 0.3)
    assert (f.rsamp_estimator, f.gap_backend) == ("seed", "eigh")


def _diff(a: ExperimentConfig, b: ExperimentConfig) -> dict:
    da, db = a.to_dict(), b.to_dict()
    return {(sec, k): (da[sec][k], db[sec][k]) for sec in da for k in da[sec] if da[sec][k] != db[sec][k]}


def test_seed_fixes_are_cumulative_one_knob_each():
    """Each seed fix changes exactly the knob the seed note names, on top of the previous preset."""
    steps = [
        ("seed_before", "seed_fix1", {("fixes", "rsamp_normalise"): (False, True)}),  # Fix 1: normalise R_samp
        ("seed_fix1", "seed_fix2", {("fixes", "rblend_trace_normalise"): (True, False)}),  # Fix 2: drop blend normalisation
        ("seed_fix2", "seed_fix3", {("fixes", "lam_gap"): (0.012, 0.0)}),  # Fix 3: disable the eigengap loss
    ]
    for a, b, expected in steps:
        assert _diff(preset(a), preset(b)) == expected, (a, b)


def test_recommended_differs_from_the_seed():
    assert _diff(preset("seed_fix3"), preset("recommended"))


def test_replace_with_dotted_keys_validates_and_copies():
    cfg = preset("seed_fix1")
    new = cfg.replace(**{"system.L": 32, "fixes.c_eps": 0.5, "train.device": "cpu"})
    assert (new.system.L, new.fixes.c_eps, new.train.device) == (32, 0.5, "cpu")
    assert cfg.system.L == 16 and cfg.fixes.c_eps == 1.0  # the original is untouched
    assert _diff(cfg, new).keys() == {("system", "L"), ("fixes", "c_eps"), ("train", "device")}
    with pytest.raises(ConfigError, match="system.L"):
        cfg.replace(**{"system.L": 0})
    with pytest.raises(ConfigError, match="nosuch"):
        cfg.replace(**{"nosuch.L": 1})
    with pytest.raises(ConfigError, match="system.Q"):
        cfg.replace(**{"system.Q": 1})
    assert preset("seed_fix2", **{"fixes.beta": 0.5}).fixes.beta == 0.5


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="device"):
        resolve_device(3)
