"""``fsmllm train-projector``: the demo model's projector, its flags the fields of
:class:`~fsmllm.lm.training.TrainConfig`."""

from __future__ import annotations

import argparse

from fsmllm.cli.training import add_training_parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fsmllm.lm.training import TrainConfig

    add_training_parser(
        subparsers,
        "train-projector",
        TrainConfig,
        "fsmllm.lm.training.train_projector",
        "server/fsmllm/models/fsmllm-demo",
        help="train the demo model's projector (encoder and LM frozen; needs Fashion-MNIST)",
        description="Train the projector of fsmllm-demo on Fashion-MNIST (apt-get install dataset-fashion-mnist) "
        "and the bundled photos, from clean and smoothed (σ) DINOv2 features; writes projector.json, "
        "projector.safetensors and training.json.",
    )
