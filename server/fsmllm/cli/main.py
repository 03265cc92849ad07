"""The ``fsmllm`` parser: one subparser per subcommand module, and the entry point that runs its handler."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fsmllm.cli import certify, evaluate, generate, sample, serve, train_booster, train_projector, verify
from fsmllm.cli.common import HelpFormatter, ListEncoders

#: the subcommands in the order ``fsmllm --help`` lists them; each module has ``add_parser(subparsers)``
SUBCOMMANDS = (certify, generate, sample, serve, evaluate, train_projector, train_booster, verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsmllm",
        description="Certified multimodal inference (Feature-space Smoothing)",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--list-encoders", action=ListEncoders)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:  # user errors (bad values, unreadable or missing files): no traceback
        parser.exit(2, f"fsmllm {args.command}: error: {error}\n")
