"""``fsmllm sample NAME``: a bundled photo as a PNG, to try the server with."""

from __future__ import annotations

import argparse
import io
import sys

from fsmllm.cli.common import HelpFormatter
from fsmllm.images import SAMPLE_IMAGES, sample_image


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="write a bundled photo as a PNG file (fsmllm sample chelsea > cat.png)",
        description="Write one of the photos bundled with scikit-image as a PNG, to stdout or to --out, to try the "
        "server with: fsmllm sample chelsea > cat.png (chelsea is a cat, coffee a cup of espresso).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("name", choices=SAMPLE_IMAGES, help="the photo")
    parser.add_argument("--out", default=None, help="PNG file to write (default: stdout, which must not be a terminal)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.out is None and sys.stdout.isatty():
        raise ValueError(
            f"a PNG is binary: redirect it (fsmllm sample {args.name} > {args.name}.png) or use --out FILE"
        )
    buffer = io.BytesIO()
    sample_image(args.name).save(buffer, format="PNG")
    if args.out is None:
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.flush()
    else:
        with open(args.out, "wb") as file:
            file.write(buffer.getvalue())
    return 0
