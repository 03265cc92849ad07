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
        "boosters/gsb-{encoder}",
        help="train a noise-conditioned Gaussian Smoothness Booster on folders of photos (encoder frozen)",
        description="Train a purifier + token mapper, conditioned on the noise level, in front of / behind the "
        "frozen encoder, so that its features under noise stay the clean ones (and apart from other images'): "
        "first --pixel-steps denoising steps of the purifier alone, then --steps through the encoder. Writes "
        "booster.json, booster.safetensors and training.json (checkpoints every --checkpoint-every steps, resumed "
        "on restart; --stop-at splits a run). Ship it under server/fsmllm/models/boosters/NAME to use it as "
        "--booster NAME (docs/booster-card.md has the recipes, a GPU one included).",
        resumable=True,
    )
