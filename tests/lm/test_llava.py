"""A LLaVA checkpoint folder as the model: tiny random ``LlavaForConditionalGeneration`` saved, loaded back.

The reference is always transformers' own LLaVA on the same inputs: its language-model logits (weights mapped
right, in both key layouts), its merged ``inputs_embeds`` and its greedy generation from the processor's
``input_ids`` and ``pixel_values`` (prompt layout, projector and feature scaling right).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

from fsmllm.encoders import load_encoder
from fsmllm.lm.base import SamplingParams
from fsmllm.lm.llava import calibration_scale, is_llava_folder, load_language_model
from fsmllm.lm.models import load_model, model_spec
from fsmllm.lm.projector import unit_feature_tokens

from .tiny_llava import TEMPLATE, save_tiny_llava

QUESTION = "What is this?"
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory) -> tuple[Path, LlavaForConditionalGeneration]:
    folder = tmp_path_factory.mktemp("llava")
    return folder, save_tiny_llava(folder)


@pytest.fixture(scope="module")
def other_layout_folder(llava_folder, tmp_path_factory) -> Path:
    """The same checkpoint with the other key layout: transformers 5 saves the llava-hf names of transformers
    < 4.52 (``language_model.model.*``, ``vision_tower.*``, ...), this folder has the names of its modules
    (``model.language_model.*``, ``lm_head.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``)."""
    folder, _ = llava_folder
    old = tmp_path_factory.mktemp("llava-other")
    renames = {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "multi_modal_projector.": "model.multi_modal_projector.",
        "vision_tower.": "model.vision_tower.",
    }
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert all(key.startswith(tuple(renames)) for key in handle.keys())  # saved in the old layout
    state = {}
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        for key in handle.keys():
            new = next(
                (target + key[len(source):] for source, target in renames.items() if key.startswith(source)), None
            )
            assert new is not None, key
            state[new] = handle.get_tensor(key)
    save_file(state, old / "model.safetensors", metadata={"format": "pt"})
    for file in folder.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, old / file.name)
    return old


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_language_model_logits_equal_llava_in_both_layouts(llava_folder, other_layout_folder) -> None:
    folder, llava = llava_folder
    input_ids = torch.tensor([[1, 5, 900, 17, 42, 3000, 7]])
    with torch.no_grad():
        expected = llava(input_ids=input_ids).logits
        for path in (folder, other_layout_folder):
            assert is_llava_folder(path)
            lm = load_language_model(path)
            torch.testing.assert_close(lm(input_ids=input_ids).logits, expected, rtol=0, atol=1e-5)


def test_missing_language_model_weights_are_a_clear_error(other_layout_folder, tmp_path) -> None:
    with safe_open(other_layout_folder / "model.safetensors", framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys() if "layers.1.mlp" not in k}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(other_layout_folder / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp"):
        load_language_model(tmp_path)


def test_spec_of_a_folder_and_unknown_names(llava_folder) -> None:
    folder, _ = llava_folder
    spec = model_spec(str(folder))
    assert (spec.name, spec.encoder, spec.image_size) == (str(folder), f"hf:{folder.resolve()}", 32)
    with pytest.raises(ValueError, match="or a LLaVA checkpoint folder"):
        model_spec("not-a-model")
    with pytest.raises(ValueError, match="LLaVA checkpoint folder"):
        model_spec(str(folder / "tokenizer.json"))  # a file, not a folder


@pytest.mark.parametrize("layout", ["saved", "other"])
def test_prompt_embeds_and_greedy_answer_equal_llava(llava_folder, other_layout_folder, layout) -> None:
    folder, llava = llava_folder
    path = folder if layout == "saved" else other_layout_folder
    model = load_model(str(path))
    encoder = load_encoder(model_spec(str(path)).encoder)
    assert (model.num_tokens, model.token_dim) == (encoder.num_tokens, encoder.token_dim) == (16, 32)
    x = pixels()
    with torch.no_grad():
        raw = encoder(x)[0]  # [16, 32]: LLaVA's vision features (layer -2, CLS dropped)
    # the calibration constant is the bundled photos' mean raw norm; make this image's norm the calibrated one, so
    # that the clean feature u(f(x)) (norm 1) is projected exactly as LLaVA projects f(x)
    assert model.projector.scale == pytest.approx(calibration_scale(encoder))
    model.projector.scale.fill_(float(raw.norm()))
    clean = unit_feature_tokens(raw)

    tokenizer = model.backend.tokenizer
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(folder), tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", chat_template=TEMPLATE, num_additional_image_tokens=1,
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        images=list(x), text=text, do_resize=False, do_center_crop=False, do_rescale=False, return_tensors="pt"
    )
    input_ids = inputs["input_ids"]
    assert model.layout(QUESTION).token_ids(llava.config.image_token_id) == input_ids[0].tolist()
    normalised = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(inputs["pixel_values"], normalised)  # the encoder's pixels, as LLaVA reads them

    with torch.no_grad():
        features = llava.model.get_image_features(
            pixel_values=inputs["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output
        image_features = torch.cat(list(features)).reshape(-1, 32)
        expected = llava.get_input_embeddings()(input_ids)[0].clone()
        expected[input_ids[0] == llava.config.image_token_id] = image_features
    torch.testing.assert_close(model.prompt_embeds(clean, QUESTION), expected, rtol=0, atol=1e-5)
    # scale invariance: the smoothed feature's norm (< 1) does not matter, only its direction
    torch.testing.assert_close(model.prompt_embeds(0.3 * clean, QUESTION), expected, rtol=0, atol=1e-5)

    answer = model.generate(clean, QUESTION, SamplingParams(max_tokens=8))
    assert len(answer.token_ids) == 8  # a random model: no end-of-sequence, all eight tokens compared
    with torch.no_grad():
        generated = llava.generate(
            **inputs, do_sample=False, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )[0, input_ids.shape[1]:].tolist()
    assert list(answer.token_ids) == generated


def test_cli_generate_with_a_folder(llava_folder, capsys) -> None:
    from fsmllm.cli import main

    folder, _ = llava_folder
    argv = ["generate", "sample:chelsea", QUESTION, "--model", str(folder), "--n0", "20", "--n", "50", "--json",
            "--seed", "0", "--max-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == str(folder) and isinstance(result["answer"], str)
    assert result["certificate"]["encoder"] == f"hf:{folder.resolve()}"
    assert result["answer"] and result["finish_reason"] == "length"
    certificate = result["certificate"]
    assert (certificate["n0"], certificate["n"]) == (20, 50) and len(certificate["radii"]) == 3


def test_cli_generate_with_a_bfloat16_encoder(llava_folder, capsys) -> None:
    from fsmllm.cli import main

    folder, _ = llava_folder
    argv = ["generate", "sample:chelsea", QUESTION, "--model", str(folder), "--n0", "20", "--n", "50", "--json",
            "--seed", "0", "--max-tokens", "4", "--no-progress", "--dtype", "bfloat16"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] and result["finish_reason"] == "length"
    assert 0 < result["certificate"]["score_lower"] <= result["certificate"]["score_estimate"] <= 1


def test_prompt_without_a_chat_template_is_llava_15(llava_folder) -> None:
    from fsmllm.lm.llava import llava_layout

    folder, _ = llava_folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    layout = llava_layout(tokenizer, QUESTION, 16, template=None)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = tokenizer(f"USER: <image>\n{QUESTION} ASSISTANT:", add_special_tokens=True)["input_ids"]
    at = ids.index(image_id)
    assert layout.token_ids(image_id) == [*ids[:at], *[image_id] * 16, *ids[at + 1:]]
    with pytest.raises(ValueError, match="image token"):
        llava_layout(tokenizer, "<image> twice", 16, template=TEMPLATE)
