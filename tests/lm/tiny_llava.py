"""A tiny random LLaVA checkpoint folder (CLIP tower, small Llama, SmolLM2's tokenizer plus ``<image>``), as
``LlavaForConditionalGeneration.save_pretrained`` writes it, for the LLaVA tests of both backends."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from fsmllm.lm.llm_loader import ensure_converted

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# LLaVA's processor templates: list content, the image as a "<image>" token before the text
TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def save_tiny_llava(folder: Path, seed: int = 0, **text: int) -> LlavaForConditionalGeneration:
    """Save a seeded random LLaVA (text-model sizes :data:`TEXT`, overridden by ``text``) with its tokenizer and
    a 32-px CLIP image processor into ``folder``; return the model."""
    tokenizer = AutoTokenizer.from_pretrained(ensure_converted())
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(
            **(TEXT | text), vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return llava
