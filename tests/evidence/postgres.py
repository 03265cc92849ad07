"""A throwaway PostgreSQL cluster for the certificate store's tests: Debian's ``postgresql`` (initdb, pg_ctl) in a
temporary folder, listening on a free loopback port (its unix socket in that folder too), password
authentication over TCP as a deployment has it, removed at the end.

initdb refuses to run as root: as root the cluster is made and run by the ``postgres`` user (which the package
creates) through ``runuser``. Without the binaries the tests that need them skip, naming the package; in CI that
skip is a failure (tests/conftest.py, ``REQUIRED_IN_CI``) and .ci/run installs the package.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.api.live import free_port

#: the skip reason when the binaries are missing (matched by tests/conftest.py's REQUIRED_IN_CI)
MISSING = "PostgreSQL server binaries not found (apt-get install postgresql)"
USER, PASSWORD = "fsmllm", "test-only-password"


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl: the newest /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH),
    else the one on PATH; None when there is none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


@dataclass(frozen=True)
class Cluster:
    """A running cluster in ``folder`` (data, log, socket), on 127.0.0.1:``port``."""

    folder: Path
    port: int
    bin_dir: Path
    prefix: tuple[str, ...]  # runs a tool as the cluster's owner

    def url(self, database: str = "postgres") -> str:
        """The URL as FSMLLM_CERT_STORE takes it."""
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.prefix, str(self.bin_dir / tool), *args], check=check, capture_output=True, timeout=120
        )

    def start(self) -> None:
        log = self.folder / "server.log"
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        try:
            self.run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(log), "-o", options, "-w", "start")
        except subprocess.CalledProcessError as error:
            raise RuntimeError(
                f"PostgreSQL did not start: {log.read_text()[-2000:] if log.exists() else error}"
            ) from error

    def stop(self, check: bool = True) -> None:
        """Stop at once: every connection is dropped (as when the database's host goes down)."""
        self.run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "stop", check=check)

    @contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database for one test; its URL. Dropped afterwards (its connections closed by force)."""
        name = f"fsmllm_{uuid.uuid4().hex[:12]}"
        admin = create_engine(
            self.url().replace("postgresql://", "postgresql+psycopg://"),
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
        )
        try:
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            yield self.url(name)
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


def _as_owner(folder: Path) -> tuple[str, ...]:
    """The command prefix that runs the server's tools: ``runuser -u postgres --`` as root, nothing otherwise."""
    if os.geteuid() != 0:
        return ()
    owner = pwd.getpwnam("postgres")  # created by Debian's package; KeyError names what is missing
    os.chown(folder, owner.pw_uid, owner.pw_gid)
    return ("runuser", "-u", "postgres", "--")


@contextmanager
def new_cluster() -> Iterator[Cluster]:
    """A cluster to be: an empty folder its owner may write (not under pytest's tmp_path, whose parents only the
    user running the tests may enter), a free port, the binaries. Stopped (if it runs) and deleted afterwards."""
    bin_dir = binaries()
    assert bin_dir is not None, MISSING
    folder = Path(tempfile.mkdtemp(prefix="fsmllm-postgres-"))
    try:
        cluster = Cluster(folder, free_port(), bin_dir, _as_owner(folder))
        try:
            yield cluster
        finally:
            cluster.stop(check=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[Cluster]:
    """initdb and start a cluster (no fsync: a crash of this machine is not under test); stop and delete it."""
    with new_cluster() as cluster:
        (cluster.folder / "password").write_text(PASSWORD)
        cluster.run(
            "initdb",
            "-D",
            str(cluster.folder / "data"),
            "-U",
            USER,
            f"--pwfile={cluster.folder / 'password'}",
            "--no-sync",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        )
        cluster.start()
        yield cluster
