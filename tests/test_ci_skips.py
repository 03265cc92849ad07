"""tests/conftest.py: in CI a test skipped for want of Fashion-MNIST or PostgreSQL fails; elsewhere it skips. Checked by
running pytest on a scratch suite that uses the real conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SUITE = """
import pytest

@pytest.mark.skipif(True, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_needs_the_data():
    pass

@pytest.mark.skipif(True, reason="hadolint is not installed")
def test_optional_tool():
    pass

@pytest.fixture()
def database():
    pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")  # tests/evidence/postgres.py


def test_needs_a_database(database):
    pass


def test_runs():
    pass
"""


def run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_missing_data_set_fails_in_ci_and_skips_elsewhere(tmp_path: Path) -> None:
    ci = run(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout
    # (a skip decided in setup becomes an error of that phase: the run fails either way)
    assert "1 passed, 1 skipped, 2 errors" in ci.stdout, ci.stdout
    failed = [line for line in ci.stdout.splitlines() if "skipped in CI, where it must run" in line]
    assert any("Fashion-MNIST" in line for line in failed) and any("PostgreSQL" in line for line in failed), failed
    local = run(tmp_path, None)
    assert local.returncode == 0 and "1 passed, 3 skipped" in local.stdout, local.stdout
    assert run(tmp_path, "false").returncode == 0
