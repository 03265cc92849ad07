"""The transformers backend: token-by-token decoding from prompt embeddings with a KV cache.

The decoding loop is written out (rather than ``model.generate``) so that sampling draws from a per-call seeded
``torch.Generator`` (reproducible and thread-safe: no global RNG state), text can be streamed as it becomes
final, and stop strings and finish reasons follow the OpenAI/vLLM conventions (:class:`~fsmllm.lm.base.Generation`).
Greedy decoding gives the same tokens as ``model.generate(inputs_embeds=..., do_sample=False)``.
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fsmllm.encoders.precision import Precision, precision_of, torch_dtype
from fsmllm.lm.base import FinishReason, Generation, GenerationCancelled, SamplingParams, TextStream
from fsmllm.lm.llm_loader import load_causal_lm


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Choose the next token from logits [V]: argmax when greedy, else nucleus sampling at the temperature."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set of most likely tokens whose mass reaches top_p (always at least one)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class _Decoding:
    """One generation in progress: iterate for final text pieces, then read :meth:`result`.

    Text is decoded from all ids so far and released only when final: a trailing partial UTF-8 character, or a
    tail that could still grow into a stop string, is held back. A stop string ends the generation and is cut
    off with everything after it. :meth:`cancel` stops the decoding loop before its next forward pass.
    """

    def __init__(self, backend: TransformersBackend, prompt_embeds: torch.Tensor, params: SamplingParams) -> None:
        if prompt_embeds.ndim != 2 or prompt_embeds.shape[1] != backend.hidden_size:
            raise ValueError(f"prompt_embeds must be [L, {backend.hidden_size}], got {list(prompt_embeds.shape)}")
        self.backend = backend
        self.prompt_embeds = prompt_embeds
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason = "length"
        self._pieces: Iterator[str] | None = None
        self._cancelled = threading.Event()
        self._finished = False
        self._error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        if self._pieces is None:
            self._pieces = self._failures_kept(self._decode())
        return self._pieces

    def _failures_kept(self, pieces: Iterator[str]) -> Iterator[str]:
        """``pieces``, remembering the error that ended them: a generator that raised is exhausted, and
        :meth:`result` must raise that error again rather than mistake the early end for a cancellation."""
        try:
            yield from pieces
        except Exception as error:
            self._error = error
            raise

    def cancel(self) -> None:
        self._cancelled.set()

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise GenerationCancelled(len(self.token_ids))

    def _decode(self) -> Iterator[str]:
        tokenizer = self.backend.tokenizer
        stops = self.params.stop
        text_ids: list[int] = []
        self._check_cancelled()
        for token in self.backend.token_ids(self.prompt_embeds, self.params):
            self.token_ids.append(token)
            if token in self.backend.eos_token_ids:
                self.finish_reason = "stop"
                break
            text_ids.append(token)
            full = cast(str, tokenizer.decode(text_ids, skip_special_tokens=True))
            cut = min((i for i in (full.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.finish_reason = "stop"
                self._finished = True
                yield from self._release(full[:cut])
                return
            yield from self._release(full[: len(full) - _held_back(full, stops)])
            self._check_cancelled()
        self._finished = True
        yield from self._release(cast(str, tokenizer.decode(text_ids, skip_special_tokens=True)))

    def _release(self, final: str) -> Iterator[str]:
        if len(final) > len(self.text):
            piece = final[len(self.text) :]
            self.text = final
            yield piece

    def result(self) -> Generation:
        for _ in self:
            pass
        if self._error is not None:
            raise self._error
        if not self._finished:
            raise GenerationCancelled(len(self.token_ids))
        return Generation(self.text, tuple(self.token_ids), self.finish_reason, self.prompt_embeds.shape[0])


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` are not final yet (partial character, or a stop-string prefix)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def _contiguous_inputs(module: torch.nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    """A forward pre-hook for the output head: its input made contiguous. transformers cuts the last position out
    of the hidden states (``logits_to_keep``) as a strided [B, 1, H] view, and torch's CPU matmul of such a view by
    the [V, H] head copies the weight once per row instead of folding the rows into one product (pytorch#151934):
    for 32 rows of SmolLM2 (V = 49 152) 3 s instead of 5 ms in bfloat16, 86 instead of 12 ms in float32. The
    logits are the same product, summed in another order by another kernel (float32: last-bit differences)."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


class TransformersBackend:
    """A frozen transformers causal LM behind the :class:`~fsmllm.lm.base.LanguageBackend` protocol."""

    max_concurrency = 1  # one decoding loop at a time (the server's LM thread)

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self._tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos_ids)
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_contiguous_inputs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> TransformersBackend:
        """Load a transformers model folder (e.g. the converted SmolLM2 cache) in float32 on ``device``."""
        return cls(*load_causal_lm(directory, device=device))

    def set_precision(self, precision: str) -> None:
        """Cast the model's weights to ``precision`` (the prompt embeddings are cast to it on the way in; the
        sampling's softmax runs in float32)."""
        self.model.to(torch_dtype(precision))

    def timing_trial(self, rows: int = 8, length: int = 64) -> Callable[[Precision], Callable[[], object]]:
        """For ``--lm-dtype auto`` (:mod:`fsmllm.fastest_dtype`): a function of the precision giving one forward
        pass of a copy of the model in it over ``rows`` prompts of ``length`` tokens (a chunk of votes'
        prompts); the model itself is not touched."""
        embeds = torch.randn(rows, length, self.hidden_size, generator=torch.Generator().manual_seed(0))

        def trial(precision: Precision) -> Callable[[], object]:
            model = copy.deepcopy(self.model).to(torch_dtype(precision))
            inputs = embeds.to(self.device, torch_dtype(precision))

            def run() -> object:
                with torch.inference_mode():
                    return model(inputs_embeds=inputs, use_cache=False, logits_to_keep=1)

            return run

        return trial

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def precision(self) -> str:
        return precision_of(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(token_ids.to(self.device))

    @torch.inference_mode()
    def token_ids(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> Iterator[int]:
        """The generated token ids, one at a time (at most ``max_tokens``; an end-of-sequence id is the last)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(secrets.randbits(63) if params.seed is None else params.seed)
        dtype = self.model.get_input_embeddings().weight.dtype
        out = self.model(inputs_embeds=prompt_embeds.to(self.device, dtype)[None], use_cache=True, logits_to_keep=1)
        for step in range(params.max_tokens):
            token = next_token(out.logits[0, -1], params, generator)
            yield token
            if token in self.eos_token_ids or step + 1 == params.max_tokens:
                return
            ids = torch.tensor([[token]], device=self.device)
            out = self.model(input_ids=ids, past_key_values=out.past_key_values, use_cache=True)

    def generate(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> Generation:
        return _Decoding(self, prompt_embeds, params).result()

    @torch.inference_mode()
    def generate_batch(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> list[Generation]:
        """Greedy completions of B prompts of one length [B, L, H], decoded together: one forward pass per token
        for the whole batch, each row's tokens those of :meth:`generate` (no padding: the rows only differ in
        their embeddings; the common prefix, the prompt's text before the image, is computed once, which can
        change a float's last bits but not the result, tested). A row ends at an end-of-sequence token or a stop
        string; the batch when every row has ended or at ``max_tokens``."""
        if not params.greedy:
            raise ValueError("batched generation decodes greedily (temperature 0)")
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[2] != self.hidden_size:
            raise ValueError(f"prompt_embeds must be [B, L, {self.hidden_size}], got {list(prompt_embeds.shape)}")
        rows = prompt_embeds.shape[0]
        dtype = self.model.get_input_embeddings().weight.dtype
        embeds = prompt_embeds.to(self.device, dtype)
        # the rows' common prefix (the text before the image) is computed once and its cache shared by every row
        differs = (embeds != embeds[:1]).any(-1).any(0)
        shared = int(differs.nonzero()[0]) if bool(differs.any()) else embeds.shape[1] - 1
        cache = None
        if shared > 0 and rows > 1:
            cache = self.model(inputs_embeds=embeds[:1, :shared], use_cache=True, logits_to_keep=1).past_key_values
            cache.batch_repeat_interleave(rows)
        else:
            shared = 0
        out = self.model(inputs_embeds=embeds[:, shared:], past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        texts: list[str | None] = [None] * rows  # set when the row has ended
        reasons: list[FinishReason] = ["length"] * rows
        for step in range(params.max_tokens):
            chosen = out.logits[:, -1].argmax(-1)
            for row, token in enumerate(chosen.tolist()):
                if texts[row] is not None:
                    continue
                tokens[row].append(token)
                if token in self.eos_token_ids:
                    texts[row], reasons[row] = self._text(tokens[row][:-1], params.stop), "stop"
                elif params.stop and (text := self._text(tokens[row], params.stop)) != self._text(tokens[row], ()):
                    texts[row], reasons[row] = text, "stop"
            if all(text is not None for text in texts) or step + 1 == params.max_tokens:
                break
            out = self.model(input_ids=chosen[:, None], past_key_values=out.past_key_values, use_cache=True)
        length = prompt_embeds.shape[1]
        return [
            Generation(self._text(ids, params.stop) if text is None else text, tuple(ids), reason, length)
            for ids, text, reason in zip(tokens, texts, reasons)
        ]

    def _text(self, token_ids: list[int], stops: tuple[str, ...]) -> str:
        """The decoded text of ``token_ids``, cut at the first stop string."""
        text = cast(str, self._tokenizer.decode(token_ids, skip_special_tokens=True))
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]

    def stream(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> TextStream:
        return _Decoding(self, prompt_embeds, params)
