"""``fsmllm serve``: the HTTP server; its flags are the fields of :class:`~fsmllm.api.settings.Settings`."""

from __future__ import annotations

import argparse

from fsmllm.cli.common import HelpFormatter, ListEncoders


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fsmllm.api.settings import add_arguments

    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the certified inference server. Every option can also be set as an environment "
        "variable FSMLLM_<OPTION> (e.g. FSMLLM_PORT=9000); flags win over the environment.",
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--list-encoders", action=ListEncoders)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fsmllm.api.serve import serve
    from fsmllm.api.settings import settings_from_args

    serve(settings_from_args(args))
    return 0
