"""Saving and loading a module as a folder: a JSON config beside float32 safetensors weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_module(module: nn.Module, config: dict[str, Any], directory: str | Path, stem: str) -> Path:
    """Write ``{stem}.json`` (``config``) and ``{stem}.safetensors`` (the float32 state dict) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {name: value.detach().float().cpu().contiguous() for name, value in module.state_dict().items()}
    save_file(weights, directory / f"{stem}.safetensors")
    return directory


def read_config(directory: str | Path, stem: str) -> dict[str, Any]:
    """The config ``{stem}.json`` in ``directory``; FileNotFoundError naming the folder if it is missing."""
    path = Path(directory) / f"{stem}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {Path(directory)} does not hold a saved {stem}")
    return json.loads(path.read_text())


def load_weights(module: nn.Module, directory: str | Path, stem: str, device: str | torch.device) -> nn.Module:
    """Load ``{stem}.safetensors`` from ``directory`` into ``module`` (strictly); eval mode, on ``device``."""
    module.load_state_dict(load_file(Path(directory) / f"{stem}.safetensors"))
    return module.to(device).eval()
