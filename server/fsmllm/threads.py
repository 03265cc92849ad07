"""How many CPU threads torch uses in a server process: the CPUs the process may run on, not the host's cores.

torch starts one intra-op thread per CPU of its affinity, which in a container is every core of the host. A
process that gets fewer CPUs than that (a container's CPU limit: Docker ``cpus``, Kubernetes
``resources.limits.cpu``; or replicas sharing a host) then runs more threads than it has CPUs, and every parallel
region waits for threads that are not running: on a 2-core machine, two processes certifying at once with 2
threads each encode 3.7–4.3× fewer samples together than with 1 thread each in bfloat16, 1.6× in float32
(docs/benchmarks.md, "Threads per process").
"""

from __future__ import annotations

import logging

import joblib
import torch

log = logging.getLogger("fsmllm.serve")


def usable_cpus() -> int:
    """The CPUs this process may use: the host's, bounded by its CPU affinity and its container's CPU quota
    (cgroup v1 or v2, rounded up); ``joblib.cpu_count``."""
    return max(1, int(joblib.cpu_count()))


def set_threads(threads: int | None) -> int:
    """Give torch ``threads`` intra-op threads (None: :func:`usable_cpus`) and return that number. Call it before
    other threads start: each thread takes torch's count when it first runs an operator."""
    count = threads if threads is not None else usable_cpus()
    if count < 1:
        raise ValueError(f"threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    source = "FSMLLM_THREADS" if threads is not None else "the CPUs this process may use"
    log.info("torch threads: %d (%s)", count, source)
    return count
