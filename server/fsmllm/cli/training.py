"""A training subcommand whose flags are the fields of its config dataclass (``--steps`` ...), and its run."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from fsmllm.cli.common import HelpFormatter, quiet_weight_loading


def add_training_parser(
    subparsers: argparse._SubParsersAction,
    name: str,
    config_cls: type[Any],
    train: str,
    out: str,
    help: str,
    description: str,
    resumable: bool = False,
) -> None:
    """Subcommand ``name``: a flag per field of the dataclass ``config_cls`` (its help from
    ``config_cls.FLAG_HELP``), then ``train(config, folder, progress=...)`` (a dotted path, imported on use)
    writes into ``--out`` (default ``out`` formatted with the config's fields) and its summary is printed."""
    parser = subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    for field, value in vars(config_cls()).items():
        flag = f"--{field.replace('_', '-')}"
        text = config_cls.FLAG_HELP[field]
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        elif isinstance(value, tuple):  # one or more values: --sigmas 0.25 0.5
            parser.add_argument(flag, nargs="+", type=type(value[0]) if value else str, default=value, help=text)
        else:
            parser.add_argument(flag, type=type(value), default=value, help=text)
    parser.add_argument("--out", default=None, help=f"output folder (default {out})")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (training and weight loading)"
    )
    if resumable:
        parser.add_argument(
            "--stop-at",
            type=int,
            default=None,
            help="stop after this step, keeping the checkpoint (default: run all steps)",
        )

    def handler(args: argparse.Namespace) -> int:
        module, function = train.rsplit(".", 1)
        config = config_cls(**{k: getattr(args, k) for k in vars(config_cls())})
        options = {"stop_at": args.stop_at} if resumable else {}
        folder = args.out if args.out is not None else out.format(**vars(config))
        if args.no_progress:
            quiet_weight_loading()
        summary = getattr(importlib.import_module(module), function)(
            config, folder, progress=not args.no_progress, **options
        )
        print(json.dumps(summary, indent=2))
        return 0

    parser.set_defaults(handler=handler)
