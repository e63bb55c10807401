"""Shared fixtures: small simulated batches, computed once per session; a PostgreSQL database per test."""

import os
import uuid

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


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the server at WORKBENCH_PG_URL (dropped afterwards); skips without one."""
    base = os.environ.get("WORKBENCH_PG_URL")
    if not base:
        pytest.skip("WORKBENCH_PG_URL is not set: source .ci/setup-postgres.sh to start a local PostgreSQL server")
    import sqlalchemy as sa

    name = f"wb_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield sa.make_url(base).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A dataset of 40 scenes on a 5 x 4 RIS (not a notebook's square N_side), made by `workbench data generate`."""
    from workbench import cli

    path = tmp_path_factory.mktemp("datasets") / "tiny"
    assert cli.main(["data", "generate", "--n", "40", "--out", str(path), "--set", "N_H", "5", "--set", "N_V", "4", "--quiet"]) == 0
    return path
