"""The certificate store on both of its databases: SQLite (a file) and a real PostgreSQL (tests/evidence/postgres.py,
skipped without its binaries except in CI). Migrations, put and get, the filtered list, retention; on PostgreSQL
also a database restart under a running store, and a real server configured by ``FSMLLM_CERT_STORE``."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, exc, inspect, text

from fsmllm.api.settings import Settings
from fsmllm.evidence.store import CertificateStore, store_url
from tests.api.live import data_url, live_server, png_bytes
from tests.evidence.postgres import Cluster

MIGRATIONS = Path(__file__).resolve().parents[2] / "server" / "fsmllm" / "evidence" / "migrations"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty store's database, as FSMLLM_CERT_STORE names it (a SQLite file, or a PostgreSQL database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'certificates.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


def opened(url: str, retention_days: float | None = None) -> CertificateStore:
    return CertificateStore(store_url(url, Path("unused")), retention_days)


def document(number: int, issued_at: datetime, model: str = "tiny-test", image: str = "a") -> dict[str, Any]:
    """A certificate as the issuer hands it to the store (the fields the store reads, and some it only keeps)."""
    return {
        "id": f"cert-{number:04d}",
        "issued_at": issued_at.isoformat(timespec="microseconds"),
        "model": model,
        "image": {"sha256": image * 64},
        "radii": [{"radius": 0.25, "certified_fcsb": 0.5 + number / 1000}],
        "note": "ünïcode ✓",
        "signature": "eyJ..",
    }


def test_the_schema_is_migrated_once_to_the_newest_revision(url: str) -> None:
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    for _ in range(2):  # a second start finds the schema current
        opened(url).close()
    engine = create_engine(store_url(url, Path("unused")))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
    schema = inspect(engine)
    assert {column["name"] for column in schema.get_columns("certificates")} == {
        "id",
        "completion_id",
        "issued_at",
        "model",
        "image_sha256",
        "document",
    }
    assert {index["name"] for index in schema.get_indexes("certificates")} >= {
        "ix_certificates_completion_id",
        "ix_certificates_issued_at",
        "ix_certificates_image_sha256",
    }
    engine.dispose()


def test_a_certificate_comes_back_as_put_by_its_id_or_its_completion_id_and_only_once(url: str) -> None:
    store = opened(url)
    first = document(1, NOW)
    store.put(first, completion_id="chatcmpl-1")
    assert store.get("cert-0001") == first and store.get("chatcmpl-1") == first
    assert store.get("cert-0002") is None
    with pytest.raises(exc.IntegrityError):  # an id is stored once: the same id again is refused, not added
        store.put(document(1, NOW + timedelta(seconds=1)))
    assert store.count() == 1 and store.get("cert-0001") == first
    store.close()


def test_the_list_filters_by_image_model_and_issue_time_newest_first(url: str) -> None:
    store = opened(url)
    east = timezone(timedelta(hours=2))
    documents = [
        document(0, NOW - timedelta(hours=3), image="a"),
        document(1, NOW - timedelta(hours=2), image="b"),
        document(2, (NOW - timedelta(hours=1)).astimezone(east), image="a", model="other"),  # offset +02:00
        document(3, NOW, image="a"),
    ]
    for item in documents:
        store.put(item)
    ids = lambda found: [item["id"] for item in found]  # noqa: E731
    assert ids(store.list()) == ["cert-0003", "cert-0002", "cert-0001", "cert-0000"]
    assert ids(store.list(limit=2)) == ["cert-0003", "cert-0002"]
    assert ids(store.list(image_sha256="a" * 64)) == ["cert-0003", "cert-0002", "cert-0000"]
    assert ids(store.list(model="other")) == ["cert-0002"]
    assert ids(store.list(image_sha256="a" * 64, model="tiny-test")) == ["cert-0003", "cert-0000"]
    # since <= t < until, in UTC whatever the offset it is given in; a naive time is UTC
    hour_ago = NOW - timedelta(hours=1)
    assert ids(store.list(since=hour_ago)) == ["cert-0003", "cert-0002"]
    assert ids(store.list(since=hour_ago.astimezone(east).replace(tzinfo=None) - timedelta(hours=2))) == [
        "cert-0003",
        "cert-0002",
    ]
    assert ids(store.list(until=hour_ago)) == ["cert-0001", "cert-0000"]
    assert ids(store.list(since=NOW - timedelta(hours=2), until=NOW)) == ["cert-0002", "cert-0001"]
    assert store.list(image_sha256="c" * 64) == []
    store.close()


def test_retention_deletes_the_older_certificates_at_start_and_on_purge(url: str) -> None:
    kept = opened(url)
    for number, age in enumerate((10, 3, 0.5)):
        kept.put(document(number, NOW - timedelta(days=age)))
    kept.close()
    store = opened(url, retention_days=5)  # purges when it opens
    assert store.count() == 2 and store.get("cert-0000") is None
    store.retention = timedelta(days=1)
    assert store.purge() == 1 and [item["id"] for item in store.list()] == ["cert-0002"]
    store.close()


def test_a_running_store_outlives_a_restart_of_its_database(postgres: Cluster, postgres_url: str) -> None:
    """The database goes down and comes back (every pooled connection is dead by then): the next reads and
    writes work, nothing committed is lost."""
    store = opened(postgres_url)
    store.put(document(1, NOW))
    assert store.get("cert-0001") is not None  # the pool holds a connection now
    postgres.stop()
    postgres.start()
    store.put(document(2, NOW))
    assert sorted(item["id"] for item in store.list()) == ["cert-0001", "cert-0002"]
    store.close()


def test_a_server_with_fsmllm_cert_store_commits_to_postgresql(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A real server (uvicorn on loopback, the tiny test model) given the database by the environment variable: the
    certificates of /certify and of a chat completion are rows of that database, served back by the routes."""
    from fsmllm.lm.models import load_model

    monkeypatch.setenv("FSMLLM_CERT_STORE", postgres_url)
    settings = Settings(
        model="tiny-test", default_n0=20, default_n=100, max_tokens_limit=8, cert_folder=str(tmp_path), _env_file=None
    )
    assert settings.cert_store == postgres_url
    image = png_bytes(5)
    with live_server(settings, model=load_model("tiny-test")) as live:
        certified = httpx.post(f"{live.url}/certify", json={"image": data_url(image), "seed": 3}, timeout=120)
        assert certified.status_code == 200, certified.text
        certificate = certified.json()["certificate"]
        chat = httpx.post(
            f"{live.url}/v1/chat/completions",
            timeout=120,
            json={
                "max_tokens": 2,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is it?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()},
                            },
                        ],
                    }
                ],
            },
        )
        assert chat.status_code == 200, chat.text
        fetched = httpx.get(f"{live.url}/v1/certificates/{certificate['id']}").json()
        by_completion = httpx.get(f"{live.url}/v1/certificates/{chat.json()['id']}").json()
        listed = httpx.get(f"{live.url}/v1/certificates", params={"image_sha256": certificate["image"]["sha256"]})
    assert fetched == certificate
    assert by_completion == chat.json()["certificate"] and by_completion["completion_id"] == chat.json()["id"]
    assert {item["id"] for item in listed.json()["data"]} == {certificate["id"], by_completion["id"]}
    engine = create_engine(store_url(postgres_url, tmp_path))
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id FROM certificates")).scalars().all()
    engine.dispose()
    assert sorted(rows) == sorted([certificate["id"], by_completion["id"]])
    assert not (tmp_path / "certificates.sqlite3").exists()  # nothing went to the default SQLite store
