"""The runtime's language-model side (engine/runtime.py): every generation is accounted once when it starts,
``("started", 0)``, and once when it ends, with its outcome and the tokens it generated (``on_generation``, which
feeds the metrics), whether it is awaited whole, streamed to its end, or left early by its reader. The real tiny
encoder, worker and tiny test language model (its random weights decode the full ``max_tokens`` unless stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import threading
from contextlib import aclosing

import pytest
import torch
from PIL import Image

from fsmllm.api.serve import policy_from
from fsmllm.api.settings import Settings
from fsmllm.encoders import load_encoder
from fsmllm.certify import SmoothedEncoder, SmoothingConfig, StopRule
from fsmllm.engine.runtime import Runtime
from fsmllm.errors import CertificatesOnly
from fsmllm.lm.base import SamplingParams
from fsmllm.lm.models import load_model

from ..api.live import png_bytes, wait_until


def tiny_runtime(settings: Settings | None = None, **options: object) -> Runtime:
    """A runtime on the tiny CNN encoder (16 px), with the deployment defaults of ``settings`` (no model's)."""
    settings = settings or Settings(model="none", _env_file=None)
    return Runtime(load_encoder("tiny-cnn", image_size=16), policy_from(settings), **options)  # type: ignore[arg-type]


def test_each_generation_is_accounted_when_it_starts_and_when_it_ends() -> None:
    events: list[tuple[str, int]] = []
    lock = threading.Lock()

    def record(event: str, tokens: int) -> None:
        with lock:
            events.append((event, tokens))

    batches: list[tuple[int, int]] = []
    settings = Settings(model="none", default_n0=20, default_n=100, _env_file=None)
    runtime = tiny_runtime(settings, model=load_model("tiny-test"), model_name="tiny-test", batch_size=64,
                           on_generation=record, on_batch=lambda samples, size, _: batches.append((samples, size)))
    runtime.start()
    image = Image.open(io.BytesIO(png_bytes()))
    config = runtime.policy.config(None, None, None, None, "betting")

    async def scenario() -> None:
        certificate = (await runtime.certify(image, config, [0.1], seed=1)).certificate
        stream = runtime.stream(certificate, "what is it?", SamplingParams(max_tokens=4, seed=0))
        async with aclosing(runtime.stream_text(stream)) as pieces:
            text = "".join([piece async for piece in pieces])
        assert events == [("started", 0), ("completed", 4)]
        # the pieces were decoded on the LM threads (their number bounds the concurrent generations)
        assert any(thread.name.startswith("fsmllm-lm") for thread in threading.enumerate())
        events.clear()

        whole = await runtime.generate(certificate, "what is it?", SamplingParams(max_tokens=4, seed=0))
        assert events == [("started", 0), ("completed", 4)] and whole.text == text
        events.clear()

        stream = runtime.stream(certificate, "what is it?", SamplingParams(max_tokens=64, seed=0))
        async with aclosing(runtime.stream_text(stream)) as pieces:
            async for _ in pieces:
                break  # the reader leaves after the first piece: the generation is cancelled
        wait_until(lambda: len(events) == 2, "the cancelled generation to be accounted")
        (started, ended) = events
        assert started == ("started", 0) and ended[0] == "cancelled" and 1 <= ended[1] < 64
        events.clear()

        # a generation cancelled while it waits for the (one, busy) LM thread ends there, with no token
        release = threading.Event()
        busy = runtime._lm_executor.submit(release.wait, 60)
        waiting = asyncio.ensure_future(runtime.generate(certificate, "what is it?", SamplingParams(max_tokens=4)))
        await asyncio.sleep(0)  # the task starts and queues its generation behind the busy thread
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        release.set()
        busy.result(60)
        assert events == [("started", 0), ("cancelled", 0)]
        events.clear()

        # the votes of a certified answer: one batched generation per chunk (2 selection votes, then 4), accounted
        # like the others with all the chunk's tokens
        answer = runtime.policy.answer_config(0.25, 2, 4, 0.1)
        await runtime.certify_answer(image, "what is it?", answer, SamplingParams(max_tokens=2), seed=0)
        assert events == [("started", 0), ("completed", 4), ("started", 0), ("completed", 8)]
        events.clear()

        # stopping the runtime waits for the generation on the LM thread to end
        long = runtime.stream(certificate, "what is it?", SamplingParams(max_tokens=64, seed=0))
        runtime._lm_executor.submit(runtime._complete, long)
        runtime.stop()
        assert events == [("completed", 64)]

    try:
        asyncio.run(scenario())
    finally:
        runtime.stop()  # (again: stopping twice is harmless)
    # every encoder batch was reported (the metrics' samples and batches): the certification's n0 + n samples and
    # the 6 votes' samples
    assert sum(samples for samples, _ in batches) == 126 and {size for _, size in batches} == {64}


def test_a_runtime_without_a_language_model_refuses_to_generate() -> None:
    encoder = load_encoder("tiny-cnn", image_size=16)
    runtime = Runtime(encoder, policy_from(Settings(model="none", _env_file=None)))
    certificate = SmoothedEncoder(encoder).certify(torch.rand(3, 16, 16), SmoothingConfig(0.25, n0=10, n=20), seed=0)
    message = "this deployment serves certificates only (model 'none'); use POST /certify"
    with pytest.raises(CertificatesOnly, match=f"^{re.escape(message)}$"):
        runtime.stream(certificate, "what is it?", SamplingParams())
    answer = runtime.policy.answer_config(0.25, 2, 4, 0.1)
    with pytest.raises(CertificatesOnly, match=f"^{re.escape(message)}$"):
        asyncio.run(runtime.certify_answer(Image.new("RGB", (16, 16)), "what is it?", answer, SamplingParams(), seed=0))


def test_the_runtimes_defaults_and_the_sizes_it_passes_on() -> None:
    runtime = tiny_runtime()
    # the LM threads: as many as the model runs generations at once (its backend is not safe beyond that)
    assert runtime._lm_executor._max_workers == 1 and runtime.ready is False
    wide = BreakingModel()
    wide.max_concurrency = 3
    assert tiny_runtime(model=wide)._lm_executor._max_workers == 3
    assert (runtime.model_name, runtime.booster, runtime.certifier.timeout_s) == ("none", "none", 600.0)
    assert (runtime.worker.batch_size, runtime.worker.capacity, runtime.certifier.cache.capacity) == (32, 32, 256)
    sized = tiny_runtime(batch_size=8, queue_capacity=3, timeout_s=5.0, cache_size=0)
    assert (sized.worker.batch_size, sized.worker.capacity, sized.certifier.timeout_s, sized.certifier.cache.capacity) == (8, 3, 5.0, 0)


class BreakingModel:
    """The tiny test language model, whose decoding breaks after two pieces (as a device error would), and whose
    batched generation (the votes of a certified answer) breaks at once."""

    name = "tiny-test-breaking"
    max_concurrency = 1
    precision = "float32"

    def __init__(self) -> None:
        self.model = load_model("tiny-test")

    def stream(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> "BreakingStream":
        return BreakingStream(self.model.stream(visual_tokens, prompt, params))

    def generate_batch(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> list:
        raise RuntimeError("device error while decoding the votes")


class BreakingStream:
    def __init__(self, inner) -> None:  # noqa: ANN001 - the real model's TextStream
        self.inner = inner
        self.pieces = 0

    def __iter__(self):  # noqa: ANN204
        for piece in self.inner:
            if self.pieces == 2:
                raise RuntimeError("device error while decoding")
            self.pieces += 1
            yield piece
        raise AssertionError("the tiny model decodes more than two pieces at max_tokens 16")

    def result(self):  # noqa: ANN201
        if self.pieces == 2:  # broken for good, as a backend whose decoding raised
            raise RuntimeError("device error while decoding")
        for _ in self:
            pass

    def cancel(self) -> None:
        self.inner.cancel()


def test_a_generation_that_breaks_is_accounted_as_failed_and_the_lm_thread_goes_on() -> None:
    """Awaited whole, streamed, or voted: the error reaches the caller, the generation is accounted once as
    ("failed", 0), and the next generation runs on the same LM thread."""
    events: list[tuple[str, int]] = []
    settings = Settings(model="none", default_n0=10, default_n=20, _env_file=None)
    runtime = tiny_runtime(settings, model=BreakingModel(), on_generation=lambda event, tokens: events.append((event, tokens)))
    runtime.start()
    image = Image.open(io.BytesIO(png_bytes()))
    params = SamplingParams(max_tokens=16, seed=0)

    async def scenario() -> None:
        config = runtime.policy.config(None, None, None, None, "betting")
        certificate = (await runtime.certify(image, config, [0.1], seed=1)).certificate
        with pytest.raises(RuntimeError, match="^device error while decoding$"):
            await runtime.generate(certificate, "what is it?", params)
        assert events == [("started", 0), ("failed", 0)]
        events.clear()

        received: list[str] = []
        with pytest.raises(RuntimeError, match="^device error while decoding$"):
            async with aclosing(runtime.stream_text(runtime.stream(certificate, "what is it?", params))) as pieces:
                async for piece in pieces:
                    received.append(piece)
        assert len(received) == 2
        wait_until(lambda: len(events) == 2, "the broken stream to be accounted")
        assert events == [("started", 0), ("failed", 0)]
        events.clear()

        answer = runtime.policy.answer_config(0.25, 2, 4, 0.1)
        with pytest.raises(RuntimeError, match="^device error while decoding the votes$"):
            await runtime.certify_answer(image, "what is it?", answer, params, seed=0)
        assert events == [("started", 0), ("failed", 0)]
        events.clear()

        # the LM thread survived every failure: a generation's first pieces still arrive
        async with aclosing(runtime.stream_text(runtime.stream(certificate, "what is it?", params))) as pieces:
            first = await anext(pieces)
        assert first and events[0] == ("started", 0)

    try:
        asyncio.run(scenario())
    finally:
        runtime.stop()


def test_the_runtime_passes_the_stop_rule_on() -> None:
    runtime = tiny_runtime()
    runtime.start()
    config = runtime.policy.config(None, 20, 2000, None, "betting")
    rule = StopRule.requested(config, [0.01], 0.0)
    try:
        outcome = asyncio.run(runtime.certify(Image.open(io.BytesIO(png_bytes())), config, [0.01], seed=1, stop=rule))
    finally:
        runtime.stop()
    assert outcome.certificate.stopped_by == "target_reached" and outcome.certificate.n < 2000
