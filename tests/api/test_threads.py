"""Threads per server process (FSMLLM_THREADS): by default the CPUs the process may use, not the host's cores;
the number is set before the server starts its threads and shown on /metrics."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pydantic
import pytest

from fsmllm.api.settings import Settings
from fsmllm.threads import usable_cpus
from tests.api.live import free_port, metric_in, serve_process

ONE_CPU = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "


def _in_child(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_default_is_the_cpus_the_process_may_use() -> None:
    assert usable_cpus() == min(os.cpu_count() or 1, len(os.sched_getaffinity(0)))  # no CPU quota on a test runner
    # a process pinned to one CPU gets one thread (torch's own default follows the affinity too; what it does not
    # follow is a container's CPU quota, which joblib reads and a test runner does not have)
    printed = _in_child(
        ONE_CPU
        + "import torch; from fsmllm.threads import set_threads; print(set_threads(None), torch.get_num_threads())"
    )
    assert printed == "1 1"


def test_fsmllm_threads_is_validated() -> None:
    assert Settings(threads=3, _env_file=None).threads == 3
    with pytest.raises(pydantic.ValidationError, match="threads"):
        Settings(threads=0, _env_file=None)


def test_the_server_runs_with_the_threads_it_was_given_and_says_so_on_metrics() -> None:
    port = free_port()
    server = serve_process(port, env={"FSMLLM_THREADS": "1"})
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert metric_in(text, "fsmllm_torch_threads") == 1
    finally:
        server.terminate()
        server.wait(timeout=60)
