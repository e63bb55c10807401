"""Shared fixtures: small simulated batches, computed once per session."""

import pytest

from workbench.config import SystemConfig
from workbench.physics import simulate


@pytest.fixture(scope="session")
def system() -> SystemConfig:
    return SystemConfig()


@pytest.fixture(scope="session")
def batch(system):
    """32 default scenes, seed 0."""
    return simulate(system, 32, seed=0)
