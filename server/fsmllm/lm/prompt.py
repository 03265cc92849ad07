"""The multimodal prompt: chat-template text with the projected visual tokens spliced in.

The user turn is ``<image>\\n{question}`` rendered with the tokenizer's chat template; the image placeholder is
replaced by the T projected visual tokens. :func:`build_prompt_embeds` is the one place that assembles the
input embeddings, shared by training and by every backend (transformers ``inputs_embeds``, vLLM
``{"prompt_embeds": ...}``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

#: Marks the image's place in the rendered chat text; never tokenized (the text is split around it).
IMAGE_PLACEHOLDER = "<|fsmllm:image|>"

EmbedTokens = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PromptLayout:
    """Token ids before and after the image, and how many visual tokens go in between."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    num_image_tokens: int

    @property
    def length(self) -> int:
        """L, the number of prompt positions (text tokens plus visual tokens)."""
        return len(self.prefix_ids) + self.num_image_tokens + len(self.suffix_ids)

    @property
    def image_slice(self) -> slice:
        """The positions of the visual tokens in the prompt."""
        return slice(len(self.prefix_ids), len(self.prefix_ids) + self.num_image_tokens)

    def token_ids(self, placeholder_id: int) -> list[int]:
        """All L prompt ids with ``placeholder_id`` at the image positions (for backends taking ids plus a mask)."""
        return [*self.prefix_ids, *([placeholder_id] * self.num_image_tokens), *self.suffix_ids]

    def image_mask(self) -> torch.Tensor:
        """Bool [L], True at the visual-token positions."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        mask[self.image_slice] = True
        return mask


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, num_image_tokens: int, system: str | None = None
) -> PromptLayout:
    """The layout of one user turn ``<image>\\n{question}`` followed by the assistant's generation prompt.

    ``system=None`` keeps the chat template's default system message (if it has one).
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    if IMAGE_PLACEHOLDER in question or (system is not None and IMAGE_PLACEHOLDER in system):
        raise ValueError(f"the prompt must not contain the reserved text {IMAGE_PLACEHOLDER!r}")
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    prefix, suffix = text.split(IMAGE_PLACEHOLDER)

    def ids(part: str) -> tuple[int, ...]:
        return tuple(tokenizer(part, add_special_tokens=False)["input_ids"])

    return PromptLayout(ids(prefix), ids(suffix), num_image_tokens)


def build_prompt_embeds(layout: PromptLayout, image_embeds: torch.Tensor, embed_tokens: EmbedTokens) -> torch.Tensor:
    """Input embeddings [..., L, H]: embedded prefix ids, ``image_embeds`` [..., T, H], embedded suffix ids.

    Leading batch dimensions of ``image_embeds`` are kept (the text parts are shared across them).
    ``embed_tokens`` maps ids [n] to embeddings [n, H] (the language model's input embedding table).
    """
    if image_embeds.shape[-2] != layout.num_image_tokens:
        raise ValueError(
            f"the layout has {layout.num_image_tokens} image positions, "
            f"image_embeds has {image_embeds.shape[-2]} tokens"
        )
    device = image_embeds.device
    prefix = embed_tokens(torch.tensor(layout.prefix_ids, dtype=torch.long, device=device))
    suffix = embed_tokens(torch.tensor(layout.suffix_ids, dtype=torch.long, device=device))
    if prefix.shape[-1] != image_embeds.shape[-1]:
        raise ValueError(f"image embeddings have width {image_embeds.shape[-1]}, the language model {prefix.shape[-1]}")
    batch = image_embeds.shape[:-2]
    parts = [
        prefix.to(image_embeds.dtype).expand(*batch, *prefix.shape),
        image_embeds,
        suffix.to(image_embeds.dtype).expand(*batch, *suffix.shape),
    ]
    return torch.cat(parts, dim=-2)
