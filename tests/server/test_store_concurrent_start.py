"""Replicas that share one certificate store start together (the compose stack's two replicas share the cache
volume): every one of them opens the store, the schema is migrated once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from sqlalchemy import create_engine, text

PROCESSES = 6


def _open_store(url: str, barrier: object, results: object) -> None:
    from fsmllm.evidence.store import CertificateStore  # imported before the barrier: the opens start together

    barrier.wait()  # type: ignore[attr-defined]
    try:
        CertificateStore(url)
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as error:  # reported to the test, which names it
        results.put(repr(error))  # type: ignore[attr-defined]


def test_replicas_starting_together_all_open_the_same_sqlite_store(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for trial in range(3):
        url = f"sqlite:///{tmp_path / f'certificates-{trial}.sqlite3'}"
        barrier, results = context.Barrier(PROCESSES), context.Queue()
        processes = [context.Process(target=_open_store, args=(url, barrier, results)) for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert outcomes == ["ok"] * PROCESSES, outcomes
        with create_engine(url).connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        assert len(versions) == 1
