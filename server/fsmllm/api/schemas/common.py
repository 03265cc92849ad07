"""What every request and response model shares: the request base that names unknown fields, the validation
message, the words of the certificate's statement, and the error body."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

NORM_NOTE = (
    "sigma and every radius are l2 norms over the encoder's input pixels in [0, 1] "
    "(3 x S x S values after resizing the shorter side to S and centre-cropping)"
)
#: the documentation's example image: a whole 8 x 8 PNG as a data URL, so that every example is a request that works
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAGUlEQVR42mNkYGhQYGDARCwMCgxYweCUAABo"
    "bwJednxjlwAAAABJRU5ErkJggg=="
)
#: names people send for a field, mapped to the field's one name (the client and both CLIs use these names too)
ALIASES = {
    "radii": "radius",
    "epsilon": "radius",
    "eps": "radius",
    "target_cosine": "target_cos",
    "target": "target_cos",
    "noise": "sigma",
    "noise_level": "sigma",
    "samples": "n",
    "num_samples": "n",
    "n_samples": "n",
    "max_new_tokens": "max_tokens",
    "question": "prompt",
}
#: the one meaning of ``abstain`` (method.md step 4; the client's table and plot say the same)
ABSTAIN = "true when nothing is certified at any requested radius (every radii[].certified_fcsb is null)"
STATEMENT = (
    "With probability at least 1 - alpha over the noise, for every image x' within l2 distance radius of x: "
    "cos(F(x), F(x')) >= certified_fcsb, where F is the Gaussian-smoothed encoder, and cos(F_hat(x), F(x')) >= "
    "served_fcsb, where F_hat(x) is the Monte Carlo mean handed to the language model (with granularity 'token', "
    "the same for every visual token at once, F, F_hat and the cosine taken token by token)"
)


def suggestion(name: str, known: list[str]) -> str | None:
    """The field a person most likely meant by the unknown ``name``: its entry in :data:`ALIASES` when that is
    one of ``known``, else the closest of ``known`` by :func:`difflib.get_close_matches` (None if none is close)."""
    alias = ALIASES.get(name.lower())
    if alias in known:
        return alias
    close = difflib.get_close_matches(name.lower(), known, n=1)
    return close[0] if close else None


def validation_message(errors: Sequence[Mapping[str, Any]], flags: bool = False) -> str:
    """One line naming each invalid field and why (pydantic's ``errors()``), as the 422 answers and the CLIs
    print it; ``flags``: fields named as command-line flags (``n`` -> ``--n``)."""
    parts = []
    for item in errors:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        if flags and where:
            where = "--" + where.replace("_", "-")
        parts.append(f"{where or ('arguments' if flags else 'body')}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def refuse_unknown_fields(
    data: Mapping[str, Any], known: list[str], nested: Mapping[str, list[str]] | None = None
) -> None:
    """Refuse the keys of ``data`` outside ``known`` with one error naming each and the field most likely meant,
    among ``known`` or, failing that, the fields of the objects in ``nested`` (``certification.target_cos``);
    its context's ``param`` is the first unknown name."""
    unknown = [str(key) for key in data if key not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        meant = suggestion(name, known)
        for parent, fields in (nested or {}).items():
            inner = None if meant else suggestion(name, fields)
            meant = meant or (inner and f"{parent}.{inner}")
        hints.append(f"unknown field {name!r}" + (f" (did you mean {meant!r}?)" if meant else ""))
    raise PydanticCustomError(
        "unknown_field",
        "{hints}; the fields are {known}",
        {"hints": "; ".join(hints), "known": ", ".join(known), "param": unknown[0]},
    )


class RequestModel(BaseModel):
    """A request body (or part of one) that refuses unknown fields with a 422 naming the field meant."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unknown_fields(data, list(cls.model_fields))
        return data


class ErrorBody(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
