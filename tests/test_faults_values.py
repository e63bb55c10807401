"""Finite, meaningful values only: infinity is refused for every float field of every config, a channel that
underflows is a ConfigError naming the field (not a _LinAlgError), no scene has K = 0, and every JSON file the
workbench writes is strict JSON (NaN and infinities written as null)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import numpy as np
import pytest
import torch

from workbench.cli import main
from workbench.config import ConfigBase, ConfigError, FixConfig, LossWeights, ModelConfig, SystemConfig, TrainConfig
from workbench.io import atomic_write_json
from workbench.physics import simulate

CONFIGS = (SystemConfig, FixConfig, LossWeights, ModelConfig, TrainConfig)
FLOAT_FIELDS = [(cls, f.name) for cls in CONFIGS for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is float]


def test_every_config_has_float_fields_to_check():
    assert {"r_max_m", "bs_distance_m", "ridge", "c_eps", "lr"} <= {name for _, name in FLOAT_FIELDS}


@pytest.mark.parametrize("value", [math.inf, -math.inf])
@pytest.mark.parametrize("cls, name", FLOAT_FIELDS, ids=[f"{c._section}.{n}" for c, n in FLOAT_FIELDS])
def test_infinity_is_refused_for_every_float_field(cls: type[ConfigBase], name, value):
    with pytest.raises(ConfigError, match=rf"{cls._section}\.{name} = -?inf: must be a finite number"):
        cls(**{name: value})


@pytest.mark.parametrize("kwargs, field", [
    ({"bs_distance_m": 1e20}, "system.bs_distance_m"),  # path gain 6e-44: float32 underflows, the channel is singular
    ({"bs_distance_m": 1e9}, "system.bs_distance_m"),  # 6e-22: the beamscan estimator's solve was singular
    ({"carrier_hz": 1e6}, "system.bs_distance_m"),  # 20 m is closer than lambda / (4 pi) = 24 m: a gain above 1
    ({"carrier_hz": 1e7, "bs_distance_m": 30.0}, "system.r_min_m"),
])
def test_a_channel_outside_float32_or_free_space_is_a_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"{field} = "):
        SystemConfig(**kwargs)


def test_the_singular_channel_fails_at_the_command_line_before_any_computation(capsys):
    assert main(["diagnose", "--preset", "recommended", "--set", "system.bs_distance_m", "1e20"]) == 2
    err = capsys.readouterr().err
    assert "system.bs_distance_m = 1e+20" in err and "singular" in err and "LinAlgError" not in err


def test_no_scene_has_zero_sources():
    with pytest.raises(ConfigError, match="system.K_min = 0"):
        SystemConfig(K_min=0)
    batch = simulate(SystemConfig(N_H=4, N_V=4, M=4, L=4, K_max=3), 256, seed=5)
    assert int(batch.K.min()) >= 1 and torch.equal(batch.mask.sum(1), batch.K)


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_written_by_the_workbench_is_strict_with_null_for_non_finite_numbers(tmp_path):
    path = atomic_write_json(tmp_path / "m.json", {"nan": math.nan, "inf": [math.inf, -math.inf, 1.5], "np": np.float32("nan"),
                                                    "np_ok": np.float64(2.0), "tensor": torch.tensor(math.inf), "int": np.int64(3),
                                                    "nested": {"x": (math.nan,)}, "path": tmp_path})
    data = _strict(path.read_text())
    assert data == {"nan": None, "inf": [None, None, 1.5], "np": None, "np_ok": 2.0, "tensor": None, "int": 3, "nested": {"x": [None]},
                    "path": str(tmp_path)}
