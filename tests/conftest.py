"""Suite-wide settings: no Hypothesis deadline, and no silent skips in CI.

* Hypothesis' default deadline (200 ms per example) fails tests on a loaded machine for reasons that have
  nothing to do with the code; every property test runs without one.
* Served encoders and language models are float32 (``FSMLLM_DTYPE``, ``FSMLLM_LM_DTYPE``), not the default
  ``auto`` whose choice depends on the machine; tests of ``auto`` name it.
* Certificates issued by the servers tests start (in process or as processes) are stored, with the generated
  signing key, in a folder of the test session (``FSMLLM_CERT_FOLDER``), not in the user's cache.
* In CI (``CI`` set to a true value, as .ci/run does), a test skipped because the Fashion-MNIST data set or
  PostgreSQL's server (the certificate store's tests) is missing is a failure: CI must not report green without
  running it. Locally the same tests skip, with the
  reason in the summary. (The vLLM test skips in the main environment, where the extra is not installed by
  design; ``make test-vllm`` fails before pytest if vLLM cannot be imported in its own environment.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator

import pytest
from hypothesis import settings

# Tests compare served certificates with numbers computed in the test in float32: servers (FSMLLM_* settings, also
# in the servers tests start as processes) keep the encoder and the language model in float32 unless a test asks
# otherwise. ``--dtype auto``, the default, is tested on its own (tests/test_fastest_dtype.py).
os.environ.setdefault("FSMLLM_DTYPE", "float32")
os.environ.setdefault("FSMLLM_LM_DTYPE", "float32")
os.environ.setdefault("FSMLLM_CERT_FOLDER", tempfile.mkdtemp(prefix="fsmllm-test-certificates-"))

settings.register_profile("fsmllm", deadline=None)
settings.load_profile("fsmllm")

#: skip reasons that name something CI must provide (matched case-insensitively)
REQUIRED_IN_CI = ("fashion-mnist", "postgresql")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_required_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (report.skipped and in_ci()):
        return
    reason = _skip_reason(report)
    if any(name in reason.lower() for name in REQUIRED_IN_CI):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where it must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    _fail_required_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    outcome = yield
    _fail_required_skip(outcome.get_result())
