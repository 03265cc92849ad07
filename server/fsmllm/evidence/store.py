"""The certificate store: every issued certificate, committed before its response is sent.

SQLite by default (embedded, a file under the cache folder; WAL journal, so readers never wait for the writer and a
killed process loses no committed certificate; ``synchronous=NORMAL``: a committed transaction survives the
process being killed, only a power loss can take the last ones), or any SQLAlchemy URL, e.g.
``postgresql://user:password@host/db`` (psycopg 3), so that replicas share it. The schema is made and upgraded by
Alembic migrations (``fsmllm/evidence/migrations``) when the store opens.

Each row holds the certificate's JSON exactly as served (signature included) and the columns it is looked up and
filtered by: its id, the chat completion id it came with, the time it was issued, the model, the image's SHA-256.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    select,
)

metadata = MetaData()
certificates = Table(
    "certificates",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("completion_id", String(128), nullable=True),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("model", String(512), nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("document", Text, nullable=False),
    Index("ix_certificates_completion_id", "completion_id"),
    Index("ix_certificates_issued_at", "issued_at"),
    Index("ix_certificates_image_sha256", "image_sha256"),
)
#: how often, at most, certificates past the retention are deleted (besides at start)
PURGE_EVERY_S = 3600.0


def store_url(setting: str | None, cache: Path) -> str:
    """The database URL: the setting, or a SQLite file under the cache folder; ``postgresql://`` uses psycopg 3."""
    if not setting:
        cache.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{cache / 'certificates.sqlite3'}"
    if setting.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + setting.split("://", 1)[1]
    return setting


def _utc(moment: datetime | None) -> datetime | None:
    """A time in UTC (a naive one is taken as UTC), as the store keeps them."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


#: the PostgreSQL advisory lock that replicas take while they migrate (any fixed 64-bit key: b"fsmllm")
MIGRATION_LOCK_KEY = int.from_bytes(b"fsmllm", "big")


@contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """Hold an exclusive lock on ``<database>.migration-lock`` (replicas sharing the file on one host); nothing for
    another database or an in-memory one."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migration-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (Alembic ``upgrade head``). Replicas that start together migrate
    one after the other (an advisory lock on PostgreSQL, a lock file beside a SQLite database); the others then
    find the schema current. Without it the second replica's ``CREATE TABLE`` fails and it does not start."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with _sqlite_migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # released when this transaction ends
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class CertificateStore:
    """Put, get and list certificates (thread-safe: the routes call it from worker threads)."""

    def __init__(self, url: str, retention_days: float | None = None) -> None:
        self.url = url
        # pre-ping: a pooled connection the database dropped (a restart, a failover) is replaced, not used and failed
        self.engine = create_engine(
            url, connect_args={"timeout": 30} if url.startswith("sqlite") else {}, pool_pre_ping=True
        )
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        migrate(self.engine)
        self.retention = None if retention_days is None else timedelta(days=retention_days)
        self._purged = 0.0
        self._lock = threading.Lock()
        self.purge()

    def put(self, document: dict[str, Any], completion_id: str | None = None) -> None:
        """Commit one certificate (its JSON as served); returns once the transaction is committed."""
        row = {
            "id": document["id"],
            "completion_id": completion_id,
            "issued_at": _utc(datetime.fromisoformat(document["issued_at"])),  # SQLite keeps no offset: all in UTC
            "model": document.get("model", ""),
            "image_sha256": document["image"]["sha256"],
            "document": json.dumps(document, separators=(",", ":")),
        }
        with self.engine.begin() as connection:
            connection.execute(certificates.insert().values(**row))
        if self.retention is not None and time.monotonic() - self._purged > PURGE_EVERY_S:
            self.purge()

    def get(self, key: str) -> dict[str, Any] | None:
        """The certificate with this id, or the one issued with this chat completion id."""
        query = select(certificates.c.document).where(
            (certificates.c.id == key) | (certificates.c.completion_id == key)
        )
        with self.engine.connect() as connection:
            document = connection.execute(query.limit(1)).scalar()
        return None if document is None else dict(json.loads(document))

    def list(
        self,
        image_sha256: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 20,
    ) -> list[dict[str, Any]]:
        """The newest certificates first, filtered by image hash, model and issue time (``since`` ≤ t < ``until``)."""
        query = select(certificates.c.document).order_by(certificates.c.issued_at.desc(), certificates.c.id)
        since, until = _utc(since), _utc(until)
        if image_sha256 is not None:
            query = query.where(certificates.c.image_sha256 == image_sha256)
        if model is not None:
            query = query.where(certificates.c.model == model)
        if since is not None:
            query = query.where(certificates.c.issued_at >= since)
        if until is not None:
            query = query.where(certificates.c.issued_at < until)
        with self.engine.connect() as connection:
            return [dict(json.loads(text)) for text in connection.execute(query.limit(limit)).scalars()]

    def count(self) -> int:
        with self.engine.connect() as connection:
            return len(connection.execute(select(certificates.c.id)).all())

    def purge(self) -> int:
        """Delete the certificates older than the retention (none without one); returns how many."""
        with self._lock:
            self._purged = time.monotonic()
        if self.retention is None:
            return 0
        cutoff = datetime.now(UTC) - self.retention
        with self.engine.begin() as connection:
            return int(connection.execute(delete(certificates).where(certificates.c.issued_at < cutoff)).rowcount)

    def close(self) -> None:
        self.engine.dispose()
