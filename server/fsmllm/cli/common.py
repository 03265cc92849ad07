"""What the subcommands share: the help formatter, ``--list-encoders``, the server's defaults, request-style
validation of the flags, and loading the (boosted) encoder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from fsmllm.api.schemas import AnswerCertification, validation_message
from fsmllm.api.settings import Settings
from fsmllm.encoders.base import VisionEncoder


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` names every flag's default (argparse's ``(default: X)``) except where the help says it already
    or there is none to name: ``None`` (the help says what happens instead) or a switch that is off."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        said_or_none = "default" in text or action.default is None or action.default is False
        return text if said_or_none else super()._get_help_string(action)


def server_default(setting: str) -> Any:
    """The server's built-in default of ``setting`` (not the environment's): the commands share it."""
    return Settings.model_fields[setting].default


def request_default(model: type[BaseModel], field: str) -> Any:
    """The default a request field gets on the server when a request leaves it out."""
    return model.model_fields[field].default


class ListEncoders(argparse.Action):
    """``--list-encoders``: print the encoder, booster and model names the commands accept, then exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="list the encoders, boosters and models, then exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(catalogue())
        parser.exit()


def catalogue() -> str:
    """The names ``--encoder``, ``--booster`` and ``--model`` accept, one a line with what each is."""
    from fsmllm.booster import available_boosters
    from fsmllm.encoders import available_encoders
    from fsmllm.lm.models import MODELS

    lines = ["encoders (--encoder):"]
    lines += [f"  {name:<20} {text}" for name, text in available_encoders().items()]
    lines += ["boosters (--booster):", f"  {'none':<20} no booster (the default)"]
    lines += [f"  {name:<20} shipped booster" for name in available_boosters()]
    lines += [f"  {'/path/to/folder':<20} a booster trained with fsmllm train-booster"]
    lines += ["models (--model):"]
    lines += [f"  {name:<20} {spec.description}" for name, spec in MODELS.items()]
    lines += [f"  {'/path/to/folder':<20} a LLaVA checkpoint on local disk"]
    lines += [f"  {'none':<20} fsmllm serve: certificates only"]
    return "\n".join(lines)


def validated(model: type[BaseModel], args: argparse.Namespace) -> Any:
    """The command's values checked as the server checks a request (the same messages, fields named as flags:
    ``n`` as ``--n``, the certify_answer object's ``n0`` as ``--answer-n0``)."""
    fields = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    if getattr(args, "certify_answer", False):
        fields["certify_answer"] = {name: getattr(args, f"answer_{name}") for name in AnswerCertification.model_fields}
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        errors = [
            {**item, "loc": (f"answer_{item['loc'][1]}", *item["loc"][2:])}
            if item["loc"][:1] == ("certify_answer",) and len(item["loc"]) > 1
            else item
            for item in error.errors()
        ]
        raise ValueError(validation_message(errors, flags=True)) from None


def quiet_weight_loading() -> None:
    """No progress bars from the libraries that load weights (transformers, huggingface_hub). Their switches,
    not tqdm's environment variable: that would leak into every process started from this one."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    transformers_logging.disable_progress_bar()


def boosted_encoder(args: argparse.Namespace, name: str, image_size: int | None) -> VisionEncoder:
    """The encoder ``name`` in precision ``args.dtype`` behind ``args.booster`` (``"none"``: the encoder itself; a
    booster stays float32) on ``args.device``, compiled (once, for every use) with ``args.compile``. With
    ``--dtype auto`` the precision is measured (or read from the cache) and ``args.dtype`` becomes its name, which
    the certificate reports."""
    from fsmllm.booster import load_booster
    from fsmllm.encoders import load_encoder
    from fsmllm.encoders.precision import compiled, set_precision
    from fsmllm.fastest_dtype import encoder_precision

    encoder = load_encoder(name, image_size=image_size, device=args.device)
    args.dtype = encoder_precision(encoder, args.dtype, args.device, args.batch_size)
    encoder = set_precision(encoder, args.dtype)
    boosted = load_booster(args.booster, encoder, sigma=args.sigma)
    return compiled(boosted) if args.compile else boosted
