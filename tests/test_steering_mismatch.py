"""The cost of an approximate steering model (studies/steering.py): zero bias for the exact model, a separable-model
bias that vanishes at broadside in the far field and exceeds the bound off broadside in the near field."""

import pytest

from workbench.config import SystemConfig
from workbench.studies.steering import mismatch_rows

SMALL = SystemConfig(N_H=8, N_V=8, M=8, L=8)


def _by(rows):
    return {(round(r["phi_deg"]), r["r_m"]): r for r in rows}


def test_the_exact_model_has_no_bias_and_the_separable_one_does_off_broadside():
    exact = _by(mismatch_rows(SMALL, (0.0, 50.0), (1.0, 8.0), model="exact"))
    for r in exact.values():
        assert abs(r["bias_phi_deg"]) < 1e-4 and abs(r["bias_r_m"]) < 1e-4, r
    sep = _by(mismatch_rows(SMALL, (0.0, 50.0), (1.0, 8.0), model="separable"))
    assert abs(sep[(0, 8.0)]["bias_phi_deg"]) < 0.05 and abs(sep[(0, 8.0)]["bias_r_m"]) < 0.05 * 8.0  # broadside, far: small
    near = sep[(50, 1.0)]
    assert near["bias_over_crb_r"] > 1.0 or near["bias_over_crb_phi"] > 1.0, near  # the approximation, not the noise
    assert abs(near["bias_r_m"]) > abs(sep[(0, 1.0)]["bias_r_m"])  # worse off broadside than at broadside
    assert all(r["sqrt_crb_phi_deg"] > 0 and r["sqrt_crb_r_m"] > 0 for r in sep.values())


def test_bad_model_is_refused():
    from workbench.config import ConfigError

    with pytest.raises(ConfigError, match="model"):
        mismatch_rows(SMALL, (0.0,), (1.0,), model="planar")
