"""A vision-language model assembled from parts: visual tokens -> projector -> prompt embeddings -> backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fsmllm.lm.base import Generation, LanguageBackend, SamplingParams, TextStream
from fsmllm.lm.prompt import PromptLayout, build_prompt_embeds, chat_prompt

if TYPE_CHECKING:
    from fsmllm.lm.llava import LlavaProjector
    from fsmllm.lm.projector import Projector

#: ``layout(question) -> PromptLayout``: where the text tokens and the visual tokens go in the prompt.
LayoutFn = Callable[[str], PromptLayout]


class ProjectedVLM:
    """Answers a question about an image given as visual tokens [T, W] (smoothed or clean features).

    The visual tokens are projected to the language model's width and spliced into the chat prompt at the
    image's place (:func:`~fsmllm.lm.prompt.build_prompt_embeds`); the backend generates from the embeddings.

    ``projector``: any module mapping [..., T, W] to [..., T, H] whose ``config`` has ``num_tokens``,
    ``token_dim`` and ``hidden_size`` (:class:`~fsmllm.lm.projector.Projector`, or the LLaVA projector of
    :mod:`fsmllm.lm.llava`). ``layout``: the prompt layout of a question; default
    :func:`~fsmllm.lm.prompt.chat_prompt` with ``system``.
    """

    def __init__(
        self,
        name: str,
        projector: Projector | LlavaProjector,
        backend: LanguageBackend,
        system: str | None = None,
        layout: LayoutFn | None = None,
    ) -> None:
        if projector.config.hidden_size != backend.hidden_size:
            raise ValueError(
                f"projector outputs width {projector.config.hidden_size}, "
                f"the language model takes {backend.hidden_size}"
            )
        self.name = name
        self.projector = projector.eval()
        self.backend = backend
        self.system = system
        self._layout = layout

    @property
    def max_concurrency(self) -> int:
        return self.backend.max_concurrency

    @property
    def precision(self) -> str:
        """The language model's precision (the projector stays float32)."""
        return self.backend.precision

    @property
    def num_tokens(self) -> int:
        return self.projector.config.num_tokens

    @property
    def token_dim(self) -> int:
        return self.projector.config.token_dim

    def layout(self, question: str) -> PromptLayout:
        """The prompt layout (text ids before and after the image, and T) of one question."""
        if self._layout is not None:
            return self._layout(question)
        return chat_prompt(self.backend.tokenizer, question, self.num_tokens, system=self.system)

    @torch.inference_mode()
    def prompt_embeds(self, visual_tokens: torch.Tensor, prompt: str) -> torch.Tensor:
        """The language model's input embeddings [L, H] for one image [T, W] and question."""
        if visual_tokens.shape != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"visual tokens must be [{self.num_tokens}, {self.token_dim}], got {list(visual_tokens.shape)}"
            )
        device = next(self.projector.parameters()).device
        image_embeds = self.projector(visual_tokens.to(device, torch.float32))
        return build_prompt_embeds(self.layout(prompt), image_embeds, self.backend.embed_tokens)

    def generate(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> Generation:
        """The answer to ``prompt`` about the image whose (smoothed) visual tokens are ``visual_tokens`` [T, W]."""
        return self.backend.generate(self.prompt_embeds(visual_tokens, prompt), params)

    @torch.inference_mode()
    def generate_batch(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> list[Generation]:
        """Greedy answers to ``prompt`` for B images at once, given as visual tokens [B, T, W] (the votes of a
        certified answer); the prompt's text is shared, so every row has the same length."""
        if visual_tokens.ndim != 3 or visual_tokens.shape[1:] != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"visual tokens must be [B, {self.num_tokens}, {self.token_dim}], got {list(visual_tokens.shape)}"
            )
        device = next(self.projector.parameters()).device
        image_embeds = self.projector(visual_tokens.to(device, torch.float32))
        embeds = build_prompt_embeds(self.layout(prompt), image_embeds, self.backend.embed_tokens)
        return self.backend.generate_batch(embeds, params)

    def stream(self, visual_tokens: torch.Tensor, prompt: str, params: SamplingParams) -> TextStream:
        """Like :meth:`generate`, yielding the answer's text in pieces as they become final."""
        return self.backend.stream(self.prompt_embeds(visual_tokens, prompt), params)
