"""``--dtype auto`` and ``--lm-dtype auto``: the fastest precision a model runs in on this machine, by measuring.

At start-up each candidate precision (float32 and bfloat16; float16 too on CUDA) runs one batch of the model,
after a warm-up, in ``REPEATS`` rounds interleaved (so drifting load hits every candidate alike; a round of a fast
model repeats the batch for ``MIN_SECONDS``); the best round of each counts. A reduced precision is chosen only
when it takes at most ``1 / MARGIN`` of float32's time (:func:`choose`): where bfloat16 is emulated in software (a
CPU without AMX or AVX512-BF16) it is no faster, or slower, and the margin keeps timing noise from picking it. The
choice is cached in ``cache_dir()/fastest-dtype.json`` under a key naming the machine (:func:`machine`: the CPU or
GPU, the torch version, the threads), the model and the version of the trials (``TRIALS``), so later starts on the
same machine skip the timing and choose the same precision (certificates with the same seed stay the same). A
timing near the margin (a speed-up within ``NEAR`` times of it either way, as a busy machine gives: one measured
1.49x where the idle machine measures 4x) is not trusted: the candidates are timed again, up to ``RETIMES``
times, each keeping the best of all rounds, and a timing still that close is used for this start but not cached,
so the next start times again.

What a reduced precision means for a certificate is unchanged (docs/method.md, "Reduced precision"): it is for
the model as computed in that precision; the noise is drawn in float32.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, get_args

import torch

from fsmllm.encoders._common import cache_dir
from fsmllm.encoders.base import VisionEncoder
from fsmllm.encoders.precision import PRECISIONS, Precision, timing_trial

log = logging.getLogger("fsmllm.dtype")

#: what ``--dtype`` / ``--lm-dtype`` accept: a precision, or ``auto`` (measured)
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_CHOICES: tuple[DtypeChoice, ...] = get_args(DtypeChoice)
#: a reduced precision must be at least this many times faster than float32 to be chosen
MARGIN = 1.5
#: the version of what is timed, part of the cache key: timings cached by an earlier version are redone (2: the
#: language model's output head takes a contiguous input, which made its bfloat16 pass 4x faster on AMX CPUs)
TRIALS = 2
#: timed rounds per candidate (after one warm-up run each), interleaved; the best counts
REPEATS = 3
#: a round of a candidate repeats its run for at least this long and counts the mean (one call of a small model
#: is at the mercy of a busy machine's scheduler)
MIN_SECONDS = 0.05

#: a timing is decisive when the best speed-up of a reduced precision is at least MARGIN * NEAR or at most
#: MARGIN / NEAR; one in between is timed again (up to RETIMES more times) and, if still in between, not cached
NEAR = 1.25
RETIMES = 2

#: one timed run of the model in the given precision (a closure over a copy of the model in it and its input)
Trial = Callable[[], object]
#: measures every candidate: precision -> seconds of one batch
Measure = Callable[[Sequence[Precision]], dict[Precision, float]]


def candidates(device: str | torch.device) -> tuple[Precision, ...]:
    """The precisions timed on ``device``: float32 and bfloat16; float16 as well on CUDA (on CPUs it has no fast
    kernels and a narrower range than bfloat16)."""
    return ("float32", "bfloat16", "float16") if torch.device(device).type == "cuda" else ("float32", "bfloat16")


def choose(seconds: Mapping[Precision, float], margin: float = MARGIN) -> Precision:
    """float32, unless a reduced precision takes at most ``1 / margin`` of float32's time: then the fastest of those.

    ``seconds``: one batch's time per candidate, float32 among them."""
    if "float32" not in seconds:
        raise ValueError(f"the timings must include float32, got {sorted(seconds)}")
    fast: dict[Precision, float] = {
        p: s for p, s in seconds.items() if p != "float32" and s * margin <= seconds["float32"]
    }
    return min(fast, key=fast.__getitem__) if fast else "float32"


def decisive(seconds: Mapping[Precision, float], margin: float = MARGIN, near: float = NEAR) -> bool:
    """Whether ``seconds`` settle :func:`choose` beyond timing noise: the best reduced precision's speed-up over
    float32 is at least ``margin * near`` or at most ``margin / near`` (no reduced candidate: trivially)."""
    reduced = [s for p, s in seconds.items() if p != "float32"]
    if not reduced:
        return True
    speedup = seconds["float32"] / min(reduced)
    return speedup >= margin * near or speedup <= margin / near


def measure_trials(make_trial: Callable[[Precision], Trial], device: str | torch.device) -> Measure:
    """A :data:`Measure` that times ``make_trial(p)()`` for each candidate ``p``: one warm-up run each, then
    ``REPEATS`` rounds interleaved over the candidates (each at least ``MIN_SECONDS`` of runs, their mean), the best
    round of each (CUDA synchronised around a run)."""
    cuda = torch.device(device).type == "cuda"

    def timed(trial: Trial) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start, calls = time.perf_counter(), 0
        while calls == 0 or time.perf_counter() - start < MIN_SECONDS:  # a fast model: several calls, their mean
            trial()
            if cuda:
                torch.cuda.synchronize(device)
            calls += 1
        return (time.perf_counter() - start) / calls

    def measure(precisions: Sequence[Precision]) -> dict[Precision, float]:
        trials = {p: make_trial(p) for p in precisions}
        for trial in trials.values():
            trial()  # warm-up: kernels chosen, caches allocated
        best = dict.fromkeys(trials, float("inf"))
        for _ in range(REPEATS):
            for p, trial in trials.items():
                best[p] = min(best[p], timed(trial))
        return best

    return measure


def machine(device: str | torch.device) -> str:
    """What the timing depends on besides the model: the CPU model (or the GPU's name), torch, the threads."""
    device = torch.device(device)
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            chip = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")
                ),
                chip,
            )
    return f"{device.type}: {chip}; torch {torch.__version__}; {torch.get_num_threads()} threads"


def cache_key(model: str, device: str | torch.device) -> str:
    """The cache's key for ``model`` on ``device``: the model, the :func:`machine` and the version of the trials."""
    return f"{model} | {machine(device)} | trials {TRIALS}"


@dataclass(frozen=True)
class Choice:
    """The chosen precision, the timings it was chosen from (seconds of one batch), and whether they came from
    the cache."""

    precision: Precision
    seconds: dict[Precision, float]
    cached: bool


def cache_file() -> Path:
    return cache_dir() / "fastest-dtype.json"


def _read(path: Path) -> dict[str, dict[str, float]]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _store(path: Path, key: str, seconds: Mapping[Precision, float]) -> None:
    """Cache ``seconds`` under ``key``: the file written whole under another name, then renamed into place (never
    half a file); a cache that cannot be written is logged, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path)
        entries[key] = {str(p): s for p, s in seconds.items()}
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(json.dumps(entries, indent=1, sort_keys=True))
        staging.replace(path)
    except OSError as error:
        log.warning("could not cache the precision timing in %s: %s", path, error)


def fastest(model: str, device: str | torch.device, measure: Measure, path: Path | None = None) -> Choice:
    """The fastest sound precision of ``model`` (a key naming the model and its batch) on ``device``: from the cache
    if this machine timed it before, else measured now (``measure``; again while not :func:`decisive`) and cached
    when decisive."""
    path = cache_file() if path is None else path
    key = cache_key(model, device)
    stored = _read(path).get(key)
    seconds: dict[Precision, float]
    if (
        isinstance(stored, dict)
        and "float32" in stored
        and all(p in PRECISIONS and isinstance(s, float) for p, s in stored.items())
        and decisive(cast(dict[Precision, float], stored))  # one cached by an older version near the margin: redone
    ):
        seconds, cached = cast(dict[Precision, float], stored), True
    else:
        seconds, cached = measure(candidates(device)), False
        for _ in range(RETIMES):
            if decisive(seconds):
                break
            again = measure(candidates(device))
            seconds = {p: min(s, again[p]) for p, s in seconds.items()}
        if decisive(seconds):
            _store(path, key, seconds)
        else:
            log.warning(
                "%s: the timings %s are too close to the %.1fx margin to keep; the next start times again",
                model,
                ", ".join(f"{p} {s * 1e3:.1f} ms" for p, s in seconds.items()),
                MARGIN,
            )
    choice = Choice(choose(seconds), seconds, cached)
    timings = ", ".join(f"{p} {s * 1e3:.1f} ms" for p, s in choice.seconds.items())
    log.info(
        "%s: dtype auto -> %s (one batch: %s%s; a reduced precision needs %.1fx float32's speed)",
        model,
        choice.precision,
        timings,
        ", cached" if cached else "",
        MARGIN,
    )
    return choice


def resolve(
    requested: str,
    model: str,
    device: str | torch.device,
    make_trial: Callable[[Precision], Trial],
    path: Path | None = None,
) -> Precision:
    """``requested`` itself when it names a precision; for ``auto`` the :func:`fastest` one, timed with
    ``make_trial`` (a function of the precision giving one run of the model in it) unless cached."""
    if requested != "auto":
        if requested not in PRECISIONS:
            raise ValueError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        return requested
    return fastest(model, device, measure_trials(make_trial, device), path).precision


def encoder_precision(encoder: VisionEncoder, requested: str, device: str | torch.device, batch_size: int) -> Precision:
    """The precision of the (float32, unboosted) ``encoder`` on the certified path: ``requested``, or for ``auto``
    the fastest on a batch of ``batch_size`` (:func:`resolve`)."""
    model = f"encoder {encoder.name} at {encoder.image_size} px, batch {batch_size}"
    return resolve(requested, model, device, timing_trial(encoder, batch_size))
