"""``fsmllm evaluate``: attacks and certified curves; its flags are the fields of
:class:`~fsmllm.evaluate.config.EvaluateConfig`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsmllm.cli.common import HelpFormatter, ListEncoders


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fsmllm.evaluate.config import EvaluateConfig

    parser = subparsers.add_parser(
        "evaluate",
        help="attacks and certified curves on held-out images (needs Fashion-MNIST)",
        description="White-box PGD against the encoder without FS, with FS and with FS + booster, and certified "
        "FCSB curves; writes results.json, report.md and curves.png into --out. The held-out images are "
        "Fashion-MNIST test images (apt-get install dataset-fashion-mnist) and the bundled photos.",
        formatter_class=HelpFormatter,
    )
    EvaluateConfig.add_arguments(parser)
    parser.add_argument("--list-encoders", action=ListEncoders)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fsmllm.evaluate import EvaluateConfig
    from fsmllm.evaluate.pipeline import run as evaluate

    config = EvaluateConfig.from_args(args)
    evaluate(config, progress=lambda line: print(line, file=sys.stderr))
    print(Path(config.out, "report.md").read_text())
    return 0
