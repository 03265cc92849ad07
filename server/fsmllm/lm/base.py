"""What every language-model backend offers: generation from prompt embeddings.

A multimodal prompt reaches the language model as a sequence of input embeddings [L, H] (text token embeddings
with the projected visual tokens spliced in, :func:`fsmllm.lm.prompt.build_prompt_embeds`), so a backend needs
no notion of images. The transformers backend and a vLLM backend (``LLM(..., enable_prompt_embeds=True)``,
``{"prompt_embeds": tensor(L, H)}``) implement the same :class:`LanguageBackend` protocol on the same embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to decode: ``temperature == 0`` is greedy; otherwise nucleus sampling with ``top_p``, seeded.

    ``stop`` strings end the generation and are not part of the returned text; ``seed=None`` draws a fresh
    random seed per call (the result is then not reproducible).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Generation:
    """One completion.

    ``token_ids`` are every generated token, including an end-of-sequence token or the tokens of a stop string
    that ended the generation; ``text`` excludes both. ``finish_reason`` is ``"stop"`` (end of sequence or a
    stop string) or ``"length"`` (``max_tokens`` reached), as in the OpenAI and vLLM APIs.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class GenerationCancelled(Exception):
    """A generation stopped by :meth:`TextStream.cancel` before its end, after ``tokens`` generated tokens."""

    def __init__(self, tokens: int) -> None:
        super().__init__(f"the generation was cancelled after {tokens} tokens")
        self.tokens = tokens


class TextStream(Protocol):
    """A generation in progress: iterate for text pieces as they become final, then read :meth:`result`.

    Iterating again continues where the last iteration stopped; :meth:`result` runs the generation to its end.
    :meth:`cancel` (from any thread) stops it at the next token: the iteration, and :meth:`result`, then raise
    :class:`GenerationCancelled`, and the backend frees what the generation held.
    """

    def __iter__(self) -> Iterator[str]: ...

    def result(self) -> Generation:
        """The whole generation (waits for its end)."""
        ...

    def cancel(self) -> None:
        """Stop generating (the caller has gone); a no-op once the generation has ended."""
        ...


class LanguageBackend(Protocol):
    """A frozen causal language model that generates from prompt embeddings [L, H].

    ``max_concurrency``: how many generations a caller may run at once from different threads (1: calls must
    not overlap; a batching engine such as vLLM decodes concurrent calls together).
    """

    max_concurrency: int

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer whose chat template and vocabulary the model was trained with."""
        ...

    @property
    def hidden_size(self) -> int:
        """H, the width of the input embeddings."""
        ...

    @property
    def precision(self) -> str:
        """The precision the model computes in (``float32``, ``bfloat16`` or ``float16``): a certified answer is
        for the model as computed in it."""
        ...

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings of ``token_ids`` [L] -> [L, H] (float32, on the backend's device)."""
        ...

    def generate(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> Generation:
        """Complete the prompt given as embeddings [L, H]."""
        ...

    def stream(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> TextStream:
        """Like :meth:`generate`, yielding text pieces as they become final (their concatenation is the text)."""
        ...

    def generate_batch(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> list[Generation]:
        """Greedy completions of B prompts of one length [B, L, H], decoded together (the votes of a certified
        answer): row b is what :meth:`generate` gives for ``prompt_embeds[b]``."""
        ...
