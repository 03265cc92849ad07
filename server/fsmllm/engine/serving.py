"""One call per endpoint: what a request asks for (:class:`CertifyTask`, :class:`AnswerTask`), run on a
:class:`~fsmllm.engine.runtime.Runtime`, and what comes back (:class:`Certified`, :class:`Answered`,
:class:`AnswerStream`), each carrying the :class:`Provenance` that makes its numbers reproducible.

The HTTP layer turns a request into a task (the request models' ``to_task(policy)``), awaits one call here, and
renders the outcome; the concurrency of an answer and its certified votes lives here, not in the routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace

from PIL import Image

from fsmllm.certify import Certificate, SmoothingConfig, StopRule
from fsmllm.certify.answers import AnswerCertificate, AnswerConfig
from fsmllm.engine.jobs import ProgressCallback, VoteProgressCallback
from fsmllm.engine.runtime import Runtime
from fsmllm.lm.base import Generation, SamplingParams


@dataclass(frozen=True)
class CertifyTask:
    """A certification as a request asks for it, checked against the deployment's policy."""

    config: SmoothingConfig
    radii: list[float]
    seed: int | None
    stop: StopRule | None = None


@dataclass(frozen=True)
class AnswerTask:
    """An answer about an image: its certification, the question, the sampling, (when asked) the parameters
    of the certified answer (its votes), and how many answers (``choices``) to generate from the one certificate."""

    certify: CertifyTask
    prompt: str
    sampling: SamplingParams
    answer: AnswerConfig | None = None
    choices: int = 1

    def choice_sampling(self, index: int) -> SamplingParams:
        """The sampling of answer ``index``: a seeded request's answer i is seeded seed + i (answer 0 is the one
        a single answer would be); unseeded, each draws its own seed."""
        seed = self.sampling.seed
        return replace(self.sampling, seed=None if seed is None else (seed + index) % 2**63)


@dataclass(frozen=True)
class Provenance:
    """What served an outcome: with the certificate's own parameters, enough to reproduce its numbers."""

    encoder: str
    booster: str
    input_size: int
    encoder_dtype: str
    model: str
    lm_dtype: str | None = None


@dataclass(frozen=True)
class Certified:
    """A certificate and how it was made: from the cache or not, the seconds queued, computing, in all."""

    certificate: Certificate
    provenance: Provenance
    cached: bool
    queue_seconds: float
    compute_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class Answered:
    """The answers (one per choice), their certificate, and the certified answer when asked, with the seconds
    each took."""

    certified: Certified
    generations: tuple[Generation, ...]
    answer_certificate: AnswerCertificate | None
    generate_seconds: float
    answer_seconds: float
    total_seconds: float

    @property
    def generation(self) -> Generation:
        """The first answer (the only one unless more choices were asked for)."""
        return self.generations[0]


def provenance(runtime: Runtime) -> Provenance:
    return Provenance(
        runtime.encoder.name,
        runtime.booster,
        runtime.input_size,
        runtime.encoder_dtype,
        runtime.model_name,
        runtime.lm_dtype,
    )


async def certify(
    runtime: Runtime, image: Image.Image, task: CertifyTask, on_progress: ProgressCallback | None = None
) -> Certified:
    """POST /certify: the image's certificate."""
    started = time.perf_counter()
    outcome = await runtime.certify(image, task.config, task.radii, task.seed, on_progress, task.stop)
    return Certified(
        outcome.certificate,
        provenance(runtime),
        outcome.cached,
        outcome.queue_seconds,
        outcome.compute_seconds,
        time.perf_counter() - started,
    )


async def answer(
    runtime: Runtime,
    image: Image.Image,
    task: AnswerTask,
    on_progress: ProgressCallback | None = None,
    on_votes: VoteProgressCallback | None = None,
) -> Answered:
    """POST /generate and a plain chat completion: certify, then answer from the smoothed features; with
    ``task.answer`` the certified answer's votes run beside them, sharing the device worker and the language
    model (``on_votes`` hears them after each chunk). Either failing cancels the other."""
    started = time.perf_counter()

    async def certified_answer() -> tuple[Certified, tuple[Generation, ...], float]:
        certified = await certify(runtime, image, task.certify, on_progress)
        generation_started = time.perf_counter()
        generations = []
        for index in range(task.choices):  # one after the other: the language model runs one generation at a time
            generations.append(await runtime.generate(certified.certificate, task.prompt, task.choice_sampling(index)))
        return certified, tuple(generations), time.perf_counter() - generation_started

    if task.answer is None:
        (certified, generations, generate_s), voted, answer_s = await certified_answer(), None, 0.0
    else:
        main = asyncio.ensure_future(certified_answer())
        votes = asyncio.ensure_future(_votes(runtime, image, task, task.answer, started, on_votes))
        try:
            await asyncio.gather(main, votes)
        except BaseException:  # the first error (or the caller gone): stop the other side, then report it
            main.cancel()
            votes.cancel()
            await asyncio.gather(main, votes, return_exceptions=True)
            raise
        (certified, generations, generate_s), (voted, answer_s) = main.result(), votes.result()
    return Answered(certified, generations, voted, generate_s, answer_s, time.perf_counter() - started)


async def _votes(
    runtime: Runtime,
    image: Image.Image,
    task: AnswerTask,
    config: AnswerConfig,
    started: float,
    on_votes: VoteProgressCallback | None,
) -> tuple[AnswerCertificate, float]:
    """The certified answer and the seconds since ``started`` when it was done."""
    voted = await runtime.certify_answer(image, task.prompt, config, task.sampling, task.certify.seed, on_votes)
    return voted, time.perf_counter() - started


class AnswerStream:
    """A streamed chat completion: the certificate first (:func:`open_answer_stream`), then each choice's answer
    piece by piece (:meth:`pieces`, choice after choice), then :attr:`generations` and the certified answer
    (:meth:`answer_certificate`)."""

    def __init__(self, runtime: Runtime, image: Image.Image, task: AnswerTask, certified: Certified) -> None:
        self.certified = certified
        self.choices = task.choices
        self._runtime, self._image, self._task = runtime, image, task
        self._generations: dict[int, Generation] = {}
        self._votes: asyncio.Future[AnswerCertificate] | None = None

    def start_votes(self) -> None:
        """Start the certified answer's votes (when asked) beside the streamed answer."""
        if self._task.answer is not None:
            self._votes = asyncio.ensure_future(
                self._runtime.certify_answer(
                    self._image, self._task.prompt, self._task.answer, self._task.sampling, self._task.certify.seed
                )
            )

    async def pieces(self, choice: int = 0) -> AsyncGenerator[str, None]:
        """Answer ``choice``'s text as generated; closed early (the client gone), the generation is cancelled."""
        sampling = self._task.choice_sampling(choice)
        stream = self._runtime.stream(self.certified.certificate, self._task.prompt, sampling)
        async with aclosing(self._runtime.stream_text(stream)) as pieces:
            async for piece in pieces:
                yield piece
        self._generations[choice] = stream.result()

    def generation(self, choice: int) -> Generation:
        """Answer ``choice``'s whole generation, once its :meth:`pieces` have ended."""
        assert choice in self._generations, "the pieces have not ended"
        return self._generations[choice]

    @property
    def generations(self) -> tuple[Generation, ...]:
        """Every choice's whole generation, once their :meth:`pieces` have ended."""
        return tuple(self.generation(index) for index in range(self.choices))

    async def answer_certificate(self) -> AnswerCertificate | None:
        return None if self._votes is None else await self._votes

    def close(self) -> None:
        """Stop the votes (also when the client has gone)."""
        if self._votes is not None:
            self._votes.cancel()


async def open_answer_stream(runtime: Runtime, image: Image.Image, task: AnswerTask) -> AnswerStream:
    """A streamed chat completion: certified first (its 200 and first chunk follow), then streamed."""
    runtime.language_model()
    return AnswerStream(runtime, image, task, await certify(runtime, image, task.certify))
