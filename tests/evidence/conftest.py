"""Fixtures of the certificate store tests: a throwaway PostgreSQL cluster (tests/evidence/postgres.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.evidence.postgres import MISSING, Cluster, binaries, postgres_cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """One cluster for the session (about 2 s to make); skips, naming the package, without PostgreSQL's binaries."""
    if binaries() is None:
        pytest.skip(MISSING)
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture()
def postgres_url(postgres: Cluster) -> Iterator[str]:
    """A new, empty database of that cluster for one test: its ``postgresql://`` URL."""
    with postgres.database() as url:
        yield url
