"""The ``fsmllm`` command line: ``fsmllm certify | generate | sample | serve | evaluate | train-projector |
train-booster``, a module per subcommand (:mod:`fsmllm.cli.main` assembles them)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub: every weight ships in a package

from fsmllm.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
