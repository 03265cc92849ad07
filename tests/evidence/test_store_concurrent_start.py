"""Replicas that share one certificate store start together (the compose stack's two replicas share a PostgreSQL
database; replicas on one host may share a SQLite file): every one of them opens the store, the schema is migrated
once. Serialised by a lock file beside SQLite, by ``pg_advisory_xact_lock`` on PostgreSQL (a real one:
tests/evidence/postgres.py)."""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from fsmllm.evidence.store import store_url

PROCESSES = 6
TRIALS = 5


def _open_stores(urls: object, barrier: object, results: object) -> None:
    """In each trial: take the trial's URL, wait for the others, open the store (so the opens start together)."""
    from fsmllm.evidence.store import CertificateStore  # before the first barrier: the opens start together

    for _ in range(TRIALS):
        url = urls.get()  # type: ignore[attr-defined]
        barrier.wait()  # type: ignore[attr-defined]
        try:
            CertificateStore(url).close()
            results.put("ok")  # type: ignore[attr-defined]
        except Exception as error:  # reported to the test, which names it
            results.put(repr(error))  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], AbstractContextManager[str]]:
    """Makes a new, empty database for each trial: a SQLite file, or a database of the PostgreSQL cluster."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres").database
    numbers = itertools.count()

    @contextmanager
    def sqlite_file() -> Iterator[str]:
        yield f"sqlite:///{tmp_path / f'certificates-{next(numbers)}.sqlite3'}"

    return sqlite_file


def test_replicas_starting_together_all_open_the_same_store(
    fresh_store: Callable[[], AbstractContextManager[str]],
) -> None:
    # processes of their own (as replicas are), forked from one that imported the store once (seconds, not 6 times)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fsmllm.evidence.store"])
    urls, barrier, results = context.Queue(), context.Barrier(PROCESSES), context.Queue()
    processes = [context.Process(target=_open_stores, args=(urls, barrier, results)) for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    try:
        for _ in range(TRIALS):
            with fresh_store() as setting:
                url = store_url(setting, Path("unused"))
                for _ in processes:
                    urls.put(url)
                outcomes = [results.get(timeout=300) for _ in processes]
                assert outcomes == ["ok"] * PROCESSES, outcomes
                engine = create_engine(url)
                with engine.connect() as connection:
                    versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
                engine.dispose()
                assert len(versions) == 1
    finally:  # after the last trial they have ended; after a failure some still wait for a URL
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
