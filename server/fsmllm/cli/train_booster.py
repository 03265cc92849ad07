"""``fsmllm train-booster``: a Gaussian Smoothness Booster, its flags the fields of
:class:`~fsmllm.booster.training.BoosterTrainConfig` (plus ``--out``, ``--no-progress`` and ``--stop-at``)."""

from __future__ import annotations

import argparse

from fsmllm.cli.training import add_training_parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fsmllm.booster.training import BoosterTrainConfig

    add_training_parser(
        subparsers,
        "train-booster",
        BoosterTrainConfig,
        "fsmllm.booster.training.train_booster",
        "boosters/gsb-{encoder}-{sigma}",
        help="train a Gaussian Smoothness Booster (encoder, projector and LM frozen; needs Fashion-MNIST)",
        description="Train a purifier + smoothness mapper in front of / behind the frozen encoder at noise level "
        "σ, to raise the Gaussian robustness score (and so the certificate) while keeping answers right; writes "
        "booster.json, booster.safetensors and training.json (checkpoints every --checkpoint-every steps, resumed "
        "on restart). Ship it under server/fsmllm/models/boosters/NAME to use it as --booster NAME. Its "
        "labelled images are Fashion-MNIST's (apt-get install dataset-fashion-mnist).",
        resumable=True,
    )
