"""The transformers backend, the prompt layout and the projector, on the tiny test model (real transformers code)."""

from __future__ import annotations

import pytest
import torch

from fsmllm.lm.base import GenerationCancelled, SamplingParams
from fsmllm.lm.models import load_model, model_spec
from fsmllm.lm.projector import Projector, ProjectorConfig, unit_feature_tokens
from fsmllm.lm.prompt import IMAGE_PLACEHOLDER, build_prompt_embeds, chat_prompt


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-test")


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))


def test_greedy_equals_transformers_generate(model) -> None:
    embeds = model.prompt_embeds(tokens(), "What is this?")
    ours = model.backend.generate(embeds, SamplingParams(max_tokens=10))
    with torch.inference_mode():
        reference = model.backend.model.generate(
            inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            max_new_tokens=10, do_sample=False, pad_token_id=model.backend.tokenizer.eos_token_id,
        )
    assert list(ours.token_ids) == reference[0].tolist()[: len(ours.token_ids)]
    assert ours.prompt_tokens == embeds.shape[0]


def test_sampling_is_seeded_and_differs_across_seeds(model) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=3)
    a = model.generate(tokens(), "What is this?", params)
    b = model.generate(tokens(), "What is this?", params)
    c = model.generate(tokens(), "What is this?", SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=4))
    assert a == b and a.token_ids != c.token_ids


def test_max_tokens_and_finish_reason(model) -> None:
    result = model.generate(tokens(), "What is this?", SamplingParams(max_tokens=5))
    assert result.completion_tokens == 5 and result.finish_reason == "length"


def test_stop_string_cuts_the_text_and_ends_generation(model) -> None:
    full = model.generate(tokens(1), "What is this?", SamplingParams(max_tokens=12))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop.strip(), full.text
    cut = model.generate(tokens(1), "What is this?", SamplingParams(max_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.text) == full.text.find(stop)


@pytest.mark.parametrize("with_stop", [False, True])
def test_batched_greedy_rows_equal_single_generations(model, with_stop: bool) -> None:
    """generate_batch (the votes of a certified answer) gives each row exactly what generate gives it, also when
    a stop string ends some rows early and not others."""
    batch = torch.stack([tokens(seed) for seed in range(6)])
    stop: tuple[str, ...] = ()
    if with_stop:
        first = model.generate(batch[0], "What is this?", SamplingParams(max_tokens=10)).text
        stop = (first[len(first) // 2 : len(first) // 2 + 2],)
    params = SamplingParams(max_tokens=10, stop=stop)
    rows = model.generate_batch(batch, "What is this?", params)
    singles = [model.generate(row, "What is this?", params) for row in batch]
    assert rows == singles
    assert len({row.text for row in rows}) > 1  # the rows differ, so a mix-up of rows would show
    if with_stop:
        assert rows[0].finish_reason == "stop" and any(row.finish_reason == "length" for row in rows)


def test_the_output_head_reads_a_contiguous_input(model) -> None:
    """transformers hands the head the last position as a strided view, which torch's CPU matmul multiplies by
    copying the head's weight once per row (pytorch#151934; 600x slower in bfloat16): the backend's pre-hook makes
    it contiguous before the head (a probe registered after it sees what the head gets)."""
    head = model.backend.model.get_output_embeddings()
    seen: list[bool] = []
    probe = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    try:
        model.generate_batch(torch.stack([tokens(0), tokens(1), tokens(2)]), "What?", SamplingParams(max_tokens=2))
    finally:
        probe.remove()
    assert seen and all(seen)


def test_batched_generation_is_greedy_only(model) -> None:
    with pytest.raises(ValueError, match="greedily"):
        model.generate_batch(torch.stack([tokens(0), tokens(1)]), "What?", SamplingParams(temperature=0.7, seed=1))


def test_stream_pieces_concatenate_to_the_generated_text(model) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=1)
    stream = model.stream(tokens(2), "Describe it.", params)
    pieces = list(stream)
    assert "".join(pieces) == model.generate(tokens(2), "Describe it.", params).text
    assert stream.result() == model.generate(tokens(2), "Describe it.", params)


def test_result_continues_a_partly_read_stream(model) -> None:
    params = SamplingParams(max_tokens=12)
    stream = model.stream(tokens(2), "Describe it.", params)
    first = next(iter(stream))
    whole = stream.result()
    assert whole == model.generate(tokens(2), "Describe it.", params)
    assert whole.text.startswith(first) and whole.completion_tokens == 12


def test_cancel_stops_the_generation_at_the_next_token(model) -> None:
    stream = model.stream(tokens(0), "What is this?", SamplingParams(max_tokens=200))
    pieces = iter(stream)
    next(pieces)
    stream.cancel()
    with pytest.raises(GenerationCancelled) as stopped:
        list(pieces)
    assert 1 <= stopped.value.tokens <= 2  # the token in flight at most, not the 200 asked for
    with pytest.raises(GenerationCancelled):
        stream.result()  # a cancelled generation never passes for a whole one
    assert model.generate(tokens(0), "What is this?", SamplingParams(max_tokens=200)).completion_tokens == 200


def test_cancel_before_the_start_generates_nothing(model) -> None:
    stream = model.stream(tokens(0), "What is this?", SamplingParams(max_tokens=200))
    stream.cancel()
    with pytest.raises(GenerationCancelled) as stopped:
        stream.result()
    assert stopped.value.tokens == 0


def test_a_failure_mid_generation_is_not_mistaken_for_a_cancellation(model) -> None:
    calls = 0

    def fail_on_the_fourth_forward(module, args, output):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("device lost")

    handle = model.backend.model.register_forward_hook(fail_on_the_fourth_forward)
    try:
        stream = model.stream(tokens(0), "What is this?", SamplingParams(max_tokens=50))
        with pytest.raises(RuntimeError, match="device lost"):
            list(stream)
        with pytest.raises(RuntimeError, match="device lost"):
            stream.result()  # the stream ended early because it failed, and says so again
    finally:
        handle.remove()
    assert model.generate(tokens(0), "What is this?", SamplingParams(max_tokens=5)).completion_tokens == 5


def test_prompt_layout_splices_the_image_tokens(model) -> None:
    tokenizer = model.backend.tokenizer
    layout = chat_prompt(tokenizer, "What is this?", 4)
    text = tokenizer.decode(list(layout.prefix_ids) + list(layout.suffix_ids))
    assert "What is this?" in text and "assistant" in text
    image = torch.randn(2, 4, 32)
    embeds = build_prompt_embeds(layout, image, model.backend.embed_tokens)
    assert embeds.shape == (2, layout.length, 32)
    assert torch.equal(embeds[:, layout.image_slice], image)
    with pytest.raises(ValueError, match="reserved"):
        chat_prompt(tokenizer, f"look {IMAGE_PLACEHOLDER}", 4)
    with pytest.raises(ValueError, match="visual tokens"):
        model.prompt_embeds(torch.randn(5, 16), "What is this?")


def test_projector_round_trip_and_scale_invariance(tmp_path) -> None:
    projector = Projector(ProjectorConfig(num_tokens=4, token_dim=16, hidden_size=8))
    loaded = Projector.load(projector.save(tmp_path))
    x = torch.randn(3, 4, 16)
    assert torch.equal(projector.eval()(x), loaded(x))
    unit = unit_feature_tokens(x)
    assert torch.allclose(unit.flatten(1).norm(dim=1), torch.ones(3))
    # a smoothed feature is a shrunk mean of unit features: the per-token LayerNorm reads it like a clean one
    assert torch.allclose(loaded(unit), loaded(0.3 * unit), atol=1e-4)


def test_unknown_models_and_backends_are_named_errors() -> None:
    with pytest.raises(ValueError, match="fsmllm-demo"):
        model_spec("llava-13b")
    with pytest.raises(ValueError, match="backend"):
        load_model("tiny-test", backend="onnx")
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
