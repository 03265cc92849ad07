"""``hf:PATH`` encoders: tiny random transformers vision towers saved with ``save_pretrained`` and loaded back.

The reference is always the transformers model's own computation on the same pixels: for CLIP its own image
processor (resize and crop off, so the pixels stay the same) feeding ``CLIPVisionModel``, for LLaVA the
checkpoint's ``get_image_features`` (vision tower, feature layer, CLS selection, projector).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from fsmllm.encoders import load_encoder

from ..lm.tiny_llava import VISION
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)


def pixels(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> tuple[Path, CLIPVisionModel]:
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    # non-default statistics, so that the test sees whether the preprocessor file is read
    CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.3, 0.25],
    ).save_pretrained(folder)
    return folder, model


def test_clip_vision_model_equals_transformers(clip_folder) -> None:
    folder, model = clip_folder
    encoder = load_encoder(f"hf:{folder}")
    assert (encoder.image_size, encoder.num_tokens, encoder.token_dim) == (32, 17, 32)  # CLS + 4 x 4 patches
    assert encoder.name == f"hf:{folder.name}" and not any(p.requires_grad for p in encoder.parameters())
    x = pixels()
    processor = CLIPImageProcessor.from_pretrained(folder)
    processed = processor(images=list(x), do_resize=False, do_center_crop=False, do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        expected = model(pixel_values=processed["pixel_values"]).last_hidden_state
        tokens = encoder(x)
    assert tokens.shape == (2, 17, 32)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)
    assert (tokens[0] - tokens[1]).abs().max() > 1e-2  # different images, different tokens


def test_plain_folder_path_and_other_input_size(clip_folder) -> None:
    folder, model = clip_folder
    encoder = load_encoder(str(folder), image_size=48)  # a directory path works without the hf: prefix
    assert (encoder.image_size, encoder.num_tokens) == (48, 1 + 6 * 6)
    x = pixels(1, 48)
    with torch.no_grad():
        expected = model(
            pixel_values=normalise(x, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]), interpolate_pos_encoding=True
        ).last_hidden_state
        torch.testing.assert_close(encoder(x), expected, rtol=0, atol=1e-5)


def test_siglip_vision_model_equals_transformers(tmp_path) -> None:
    torch.manual_seed(1)
    model = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()
    model.save_pretrained(tmp_path)
    encoder = load_encoder(f"hf:{tmp_path}")  # no preprocessor file: SigLIP's own statistics, 0.5 / 0.5
    assert (encoder.image_size, encoder.num_tokens, encoder.token_dim) == (32, 16, 32)  # no CLS token
    x = pixels(seed=1)
    with torch.no_grad():
        expected = model(pixel_values=(x - 0.5) / 0.5).last_hidden_state
        torch.testing.assert_close(encoder(x), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no CLS token"):
        load_encoder(f"hf:{tmp_path}", drop_cls=True)


def test_vision_tower_of_a_dual_encoder_checkpoint(tmp_path) -> None:
    torch.manual_seed(2)
    model = SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)).eval()
    model.save_pretrained(tmp_path)
    encoder = load_encoder(f"hf:{tmp_path}")
    x = pixels(seed=2)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=(x - 0.5) / 0.5).last_hidden_state
        torch.testing.assert_close(encoder(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("feature_layer", "strategy", "tokens", "width"), [(-2, "default", 16, 32), ([-3, -1], "full", 17, 64)]
)
def test_llava_checkpoint_tower_feeds_the_projector_exactly(tmp_path, feature_layer, strategy, tokens, width) -> None:
    torch.manual_seed(3)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=100,
        ),
        image_token_index=99,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded: exercises the safetensors index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    encoder = load_encoder(f"hf:{tmp_path}")
    assert (encoder.num_tokens, encoder.token_dim) == (tokens, width)
    x = pixels(seed=3)
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    with torch.no_grad():
        image_features = llava.model.get_image_features(
            pixel_values=normalise(x, clip_mean, clip_std),
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=strategy,
        ).pooler_output
        projected = llava.model.multi_modal_projector(encoder(x))
    torch.testing.assert_close(projected, torch.stack(list(image_features)), rtol=0, atol=1e-5)


def test_folder_without_a_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(f"hf:{tmp_path}")
    config = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model", **VISION}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_encoder(f"hf:{tmp_path}")
