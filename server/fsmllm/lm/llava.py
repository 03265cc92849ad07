"""A LLaVA-style checkpoint folder on local disk as the model: its vision tower, projector and language model.

The folder is what ``LlavaForConditionalGeneration.save_pretrained`` writes (``config.json`` with a
``vision_config`` and a ``text_config``, single or sharded safetensors, the tokenizer, optionally the
processor's ``preprocessor_config.json`` and chat template). Both key layouts are read: transformers >= 4.52
(``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``) and
the older llava-hf one (``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.*``). Nothing is downloaded.

The three parts, and the one change made to LLaVA's computation:

* **Encoder** f: the vision tower, loaded by ``load_encoder("hf:FOLDER")``
  (:mod:`fsmllm.encoders.hf_vision`): features ``hidden_states[vision_feature_layer]``, the CLS token dropped
  for the "default" selection strategy, the preprocessor's image size and statistics. Its T x W tokens are
  exactly what LLaVA feeds its projector.
* **Projector** with feature scaling. LLaVA's ``multi_modal_projector`` is
  ``P(v) = linear_2(act(linear_1(v)))`` applied per token to the *raw* vision features v [T, W]. The language
  model here reads the *smoothed feature* instead: the mean over noisy copies of the L2-normalised flattened
  feature u(f(x)) = f(x) / ||f(x)|| (``unit_feature_tokens``), whose norm is at most 1 (and shrinks with the
  noise), in the encoder's layout [T, W]. So :class:`LlavaProjector` first rescales its input to a fixed norm::

      P_c(v) = P(c · v / ||v||)          (||v||: the norm of the flattened T·W feature)

  where c is the mean norm of the raw flattened features f(x) of the six bundled photos
  (``fsmllm.images.SAMPLE_IMAGES``), computed once when the model is loaded, with its own encoder, and kept as
  the buffer ``scale``. P_c is scale-invariant, so the language model sees exactly the *direction* of the
  smoothed feature, which is what the cosine certificate bounds; and for a clean image whose raw norm equals c,
  P_c(u(f(x))) = P(f(x)): LLaVA's own image embeddings. For other images it equals P(f(x) · c / ||f(x)||), i.e.
  LLaVA's input up to the ratio of the image's norm to the typical one (vision features of natural images have
  similar norms, so this ratio stays near 1).
* **Language model**: ``AutoModelForCausalLM.from_config(text_config)`` filled from the checkpoint by renaming
  ``language_model.X -> X`` (old layout) or ``model.language_model.X -> model.X`` and ``lm_head.X -> lm_head.X``
  (new layout); every weight must be found (a missing ``lm_head.weight`` means tied input/output embeddings).
  Float32 on CPU, the checkpoint's dtype elsewhere. For the ``vllm`` backend the assembled language model and
  tokenizer are saved once to ``$FSMLLM_CACHE/llava-lm-{hash}`` and vLLM loads that folder.

**Prompt** (:func:`llava_layout`): the chat template (the tokenizer's, else the folder's ``chat_template.json``
or ``chat_template.jinja`` written by LLaVA processors) is rendered with LLaVA's list content
``[{"type": "image"}, {"type": "text", "text": question}]``; the text is split at the one image token string it
emits (the token of ``image_token_id``/``image_token_index``, e.g. ``<image>``) and the T projected visual
tokens go there, as LLaVA's own processor expands that token to T image positions. Without a chat template the
LLaVA-1.5 format ``"USER: <image>\\n{question} ASSISTANT:"`` is used. A BOS token is prepended when the
tokenizer adds one and the rendered text does not start with it (LLaVA's processor tokenizes with special
tokens).

What was tested (``tests/lm/test_llava.py``): tiny random LLaVA checkpoints in both key layouts; no real LLaVA
weights are available offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from fsmllm.lm.projector import ProjectorConfig
from fsmllm.lm.prompt import PromptLayout

if TYPE_CHECKING:
    from fsmllm.encoders.hf_vision import HFVisionEncoder
    from fsmllm.lm.vllm_backend import VllmOptions
    from fsmllm.lm.vlm import ProjectedVLM

PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
#: The prompt used when the folder has no chat template (LLaVA-1.5's conversation format).
FALLBACK_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"
_COMPLETE_MARKER = ".fsmllm-llava-lm"


def _checkpoint_keys(path: Path) -> dict[str, Path]:
    from fsmllm.encoders.hf_vision import _checkpoint_keys as keys

    return keys(path)


def _read_tensors(checkpoint: dict[str, Path], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """``{target name: tensor}`` for ``names`` = ``{target name: checkpoint key}``, reading each file once."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, key in names.items():
        by_file.setdefault(checkpoint[key], []).append((target, key))
    state: dict[str, torch.Tensor] = {}
    for file, pairs in by_file.items():
        with safe_open(file, framework="pt") as handle:
            state.update({target: handle.get_tensor(key) for target, key in pairs})
    return state


def is_llava_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a directory holding a LLaVA-style checkpoint (``model_type == "llava"``, or a config
    with ``vision_config`` and ``text_config`` whose weights include a ``multi_modal_projector``)."""
    path = Path(folder).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    if config.get("model_type") == "llava":
        return True
    if "vision_config" not in config or "text_config" not in config:
        return False
    try:
        keys = _checkpoint_keys(path)
    except (OSError, ValueError):
        return False
    return any(key.startswith(PROJECTOR_PREFIXES) for key in keys)


# ---------------------------------------------------------------------------------------------- projector


class LlavaProjector(nn.Module):
    """``forward(tokens [..., T, W]) -> [..., T, H]``: LLaVA's projector on the tokens rescaled to norm ``scale``.

    ``linear_2(act(linear_1(c · v / ||v||)))`` with the norm over the flattened T·W feature (module docstring).
    ``config`` has the attributes of :class:`~fsmllm.lm.projector.ProjectorConfig`.
    """

    def __init__(
        self,
        config: ProjectorConfig,
        *,
        intermediate_size: int,
        activation: str = "gelu",
        bias: bool = True,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = config
        self.linear_1 = nn.Linear(config.token_dim, intermediate_size, bias=bias)
        self.act = ACT2FN[activation]
        self.linear_2 = nn.Linear(intermediate_size, config.hidden_size, bias=bias)
        self.scale: torch.Tensor
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        expected = (self.config.num_tokens, self.config.token_dim)
        if tuple(tokens.shape[-2:]) != expected:
            raise ValueError(
                f"projector expects visual tokens [..., {expected[0]}, {expected[1]}], got {list(tokens.shape)}"
            )
        flat = nn.functional.normalize(tokens.flatten(-2).to(self.linear_1.weight.dtype), dim=-1)
        scaled = (flat * self.scale).reshape(tokens.shape)
        return self.linear_2(self.act(self.linear_1(scaled)))

    @classmethod
    def from_checkpoint(cls, folder: str | Path, num_tokens: int, scale: float = 1.0) -> LlavaProjector:
        """LLaVA's projector weights from ``folder`` (under either prefix), for ``num_tokens`` visual tokens."""
        path = Path(folder).expanduser()
        checkpoint = _checkpoint_keys(path)
        prefix = next((p for p in PROJECTOR_PREFIXES if p + "linear_1.weight" in checkpoint), None)
        if prefix is None or prefix + "linear_2.weight" not in checkpoint:
            raise ValueError(f"{path}: no multi_modal_projector.linear_1/linear_2 weights in the checkpoint")
        names = ["linear_1.weight", "linear_2.weight"]
        bias = prefix + "linear_1.bias" in checkpoint
        if bias:
            names += ["linear_1.bias", "linear_2.bias"]
        state = _read_tensors(checkpoint, {name: prefix + name for name in names})
        inner, width = state["linear_1.weight"].shape
        hidden = state["linear_2.weight"].shape[0]
        config = AutoConfig.from_pretrained(path)
        projector = cls(
            ProjectorConfig(num_tokens=num_tokens, token_dim=int(width), hidden_size=int(hidden)),
            intermediate_size=int(inner),
            activation=getattr(config, "projector_hidden_act", "gelu") or "gelu",
            bias=bias,
            scale=scale,
        )
        projector.load_state_dict({name: tensor.float() for name, tensor in state.items()} | {"scale": projector.scale})
        return projector.eval().requires_grad_(False)


@torch.no_grad()
def calibration_scale(encoder: HFVisionEncoder) -> float:
    """c: the mean norm of the raw flattened features [T·W] of the bundled photos (``SAMPLE_IMAGES``)."""
    from fsmllm.images import SAMPLE_IMAGES, sample_image, to_pixels

    device = next(encoder.parameters()).device
    pixels = torch.stack([to_pixels(sample_image(name), encoder.image_size) for name in SAMPLE_IMAGES])
    features = encoder(pixels.to(device))
    return float(features.flatten(1).float().norm(dim=1).mean())


# ---------------------------------------------------------------------------------------------- language model


def language_model_key(key: str) -> str | None:
    """The causal LM's parameter name for a LLaVA checkpoint key; None for the vision tower and projector."""
    if key.startswith("language_model."):  # old layout: language_model.model.*, language_model.lm_head.*
        return key[len("language_model.") :]
    if key.startswith("model.language_model."):  # transformers >= 4.52
        return "model." + key[len("model.language_model.") :]
    if key.startswith("lm_head."):
        return key
    return None


def load_language_model(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The checkpoint's language model as a frozen ``AutoModelForCausalLM`` (float32 on CPU unless ``dtype``)."""
    path = Path(folder).expanduser()
    device = torch.device(device)
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
    if dtype is None:
        saved = getattr(text_config, "dtype", None) or getattr(config, "dtype", None)
        dtype = torch.float32 if device.type == "cpu" or not isinstance(saved, torch.dtype) else saved
    model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    checkpoint = _checkpoint_keys(path)
    names = {target: key for key in checkpoint if (target := language_model_key(key)) is not None}
    expected = set(model.state_dict())
    unexpected = sorted(set(names) - expected)
    missing = sorted(expected - set(names))
    tie = missing == ["lm_head.weight"] and model.get_output_embeddings() is not None
    if unexpected or (missing and not tie):
        raise ValueError(
            f"{path}: the language model's weights do not match {type(model).__name__}"
            f" (missing: {', '.join(missing[:5]) or 'none'}{' ...' if len(missing) > 5 else ''};"
            f" unexpected: {', '.join(unexpected[:5]) or 'none'}{' ...' if len(unexpected) > 5 else ''})"
        )
    state = {name: tensor.to(dtype) for name, tensor in _read_tensors(checkpoint, names).items()}
    model.load_state_dict(state, strict=not tie)
    if tie:  # no lm_head in the checkpoint: the output embeddings are the input embeddings
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
    generation_eos = getattr(text_config, "eos_token_id", None)
    if generation_eos is not None:
        model.generation_config.eos_token_id = generation_eos
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(Path(folder).expanduser())


def vllm_cache_folder(folder: str | Path) -> Path:
    """``$FSMLLM_CACHE/llava-lm-{hash}``: hash of the resolved folder and its ``config.json``'s mtime and size."""
    from fsmllm.encoders._common import cache_dir

    path = Path(folder).expanduser().resolve()
    stat = (path / "config.json").stat()
    digest = hashlib.sha256(f"{path}|{stat.st_mtime_ns}|{stat.st_size}".encode()).hexdigest()[:16]
    return cache_dir() / f"llava-lm-{digest}"


def ensure_language_model_folder(folder: str | Path) -> Path:
    """Save the checkpoint's language model and tokenizer as a plain causal-LM folder (once; for vLLM).

    Written to a temporary sibling folder renamed into place when complete (like ``ensure_converted``).
    """
    target = vllm_cache_folder(folder)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    path = Path(folder).expanduser()
    saved = getattr(AutoConfig.from_pretrained(path).get_text_config(), "dtype", None)
    model = load_language_model(path, "cpu", dtype=saved if isinstance(saved, torch.dtype) else torch.float32)
    model.save_pretrained(staging)
    tokenizer = load_tokenizer(path)
    template = chat_template(path, tokenizer)
    if template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(staging)
    (staging / _COMPLETE_MARKER).write_text(f"language model of {path.resolve()}\n")
    import shutil

    if (target / _COMPLETE_MARKER).is_file():  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        return target
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


# ---------------------------------------------------------------------------------------------- prompt


def chat_template(folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's chat template, else the folder's ``chat_template.json`` / ``chat_template.jinja``."""
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        return tokenizer.chat_template
    path = Path(folder).expanduser()
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    file = path / "chat_template.json"
    if file.is_file():
        template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return None


def image_token(folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> str:
    """The image token string of the checkpoint (the token of ``image_token_id`` / ``image_token_index``)."""
    config = AutoConfig.from_pretrained(Path(folder).expanduser())
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is not None and 0 <= int(token_id) < len(tokenizer):
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(token, str) and token:
            return token
    return "<image>"


def llava_layout(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    num_image_tokens: int,
    *,
    image: str = "<image>",
    template: str | None = None,
) -> PromptLayout:
    """The prompt layout of one user turn (an image, then ``question``) and the assistant's generation prompt.

    With ``template`` (a chat template using LLaVA's list content), the rendered text is split at the one
    ``image`` token string it holds; without, the LLaVA-1.5 format :data:`FALLBACK_TEMPLATE`.
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    if image in question:
        raise ValueError(f"the prompt must not contain the image token {image!r}")
    if template is None:
        text = FALLBACK_TEMPLATE.format(image=image, question=question)
    else:
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        text = cast(
            str,
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template),
        )
        assert isinstance(text, str)
    parts = text.split(image)
    if len(parts) != 2:
        raise ValueError(f"the chat template emits the image token {image!r} {len(parts) - 1} times, expected once")
    prefix, suffix = parts

    def ids(part: str) -> list[int]:
        return list(tokenizer(part, add_special_tokens=False)["input_ids"])

    prefix_ids = ids(prefix)
    bos = tokenizer.bos_token_id
    if bos is not None and not text.startswith(str(tokenizer.bos_token)) and _adds_bos(tokenizer):
        prefix_ids = [bos, *prefix_ids]
    return PromptLayout(tuple(prefix_ids), tuple(ids(suffix)), num_image_tokens)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


# ---------------------------------------------------------------------------------------------- the model


def load_llava(
    folder: str | Path,
    device: torch.device,
    backend: str = "transformers",
    options: VllmOptions | None = None,
    name: str | None = None,
) -> ProjectedVLM:
    """The checkpoint in ``folder`` as a :class:`~fsmllm.lm.vlm.ProjectedVLM` reading the ``hf:FOLDER`` encoder.

    The vision tower is loaded here only to count its tokens and compute the calibration constant c (it runs the
    six bundled photos once); whoever computes the visual tokens loads its own copy (``spec.encoder``).
    """
    from fsmllm.encoders.hf_vision import load_hf_vision_encoder
    from fsmllm.lm.transformers_backend import TransformersBackend
    from fsmllm.lm.vlm import ProjectedVLM

    path = Path(folder).expanduser().resolve()
    encoder = load_hf_vision_encoder(path).to(device)
    scale = calibration_scale(encoder)
    projector = LlavaProjector.from_checkpoint(path, encoder.num_tokens, scale=scale).to(device)
    if projector.config.token_dim != encoder.token_dim:
        raise ValueError(
            f"{path}: the projector takes width {projector.config.token_dim}, the encoder gives {encoder.token_dim}"
        )
    del encoder
    lm_backend: Any
    if backend == "vllm":
        from fsmllm.lm.vllm_backend import VllmBackend

        lm_backend = VllmBackend.from_pretrained(ensure_language_model_folder(path), options)
    else:
        lm_backend = TransformersBackend(load_language_model(path, device), load_tokenizer(path))
    tokenizer = lm_backend.tokenizer
    template = chat_template(path, tokenizer)
    token = image_token(path, tokenizer)
    num_tokens = projector.config.num_tokens

    def layout(question: str) -> PromptLayout:
        return llava_layout(tokenizer, question, num_tokens, image=token, template=template)

    return ProjectedVLM(name or str(folder), projector, lm_backend, layout=layout)
