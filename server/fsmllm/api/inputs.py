"""Reading a request body as JSON or multipart into (image, validated parameters)."""

from __future__ import annotations

import hashlib
import json
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from fsmllm.errors import BodyTooLarge, MalformedBody, RequestError, UnsupportedMediaType
from fsmllm.images import decode_base64_image, open_image

Params = TypeVar("Params", bound=BaseModel)

#: form fields that may repeat (multipart sends lists as repeated fields)
_LIST_FIELDS = {"radius", "stop"}


def _refuse_declared(request: Request, limit: int) -> None:
    """413 from the headers alone when the declared length is over ``limit`` (the body is not waited for). A
    body without a declared length is bounded while it is read, by the app's ``BodyLimit`` middleware."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is {declared} bytes; the limit is {limit}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes."""
    _refuse_declared(request, limit)
    return await request.body()


def _form_value(values: list[str], name: str) -> object:
    """The text of a form field, as JSON would carry it; the model converts it ("0.1" -> 0.1, "true" -> True)
    and names the field when it cannot."""
    if name in _LIST_FIELDS:
        return values
    return values[-1]


async def image_and_params(
    request: Request, model: type[Params], max_body: int, max_pixels: int
) -> tuple[Image.Image, Params, str]:
    """Parse ``model`` plus an image from JSON (``image`` as base64 or data URL) or multipart (file ``image``, or
    a text field ``image`` holding what JSON's would); with the SHA-256 of the image's bytes as received (hex),
    which its certificate is bound to."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await read_body(request, max_body)
        try:
            payload = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MalformedBody(f"the body is not valid JSON: {error}") from None
        if not isinstance(payload, dict):
            raise RequestError("the JSON body must be an object with an 'image' field")
        image_text = payload.pop("image", None)
        if not isinstance(image_text, str) or not image_text:
            raise RequestError("image: required (base64 text or a data:image/...;base64, URL)")
        image_bytes = decode_base64_image(image_text)
    elif content_type == "multipart/form-data":
        _refuse_declared(request, max_body)
        form = await request.form(max_files=1, max_fields=64, max_part_size=max_body)
        upload = form.get("image")
        if isinstance(upload, UploadFile):
            image_bytes = await upload.read()  # no larger than the body, which BodyLimit bounds
        elif isinstance(upload, str) and upload:  # a text field: the JSON form's base64 or data URL
            image_bytes = decode_base64_image(upload)
        else:
            raise RequestError("image: required as a file field named 'image' (or its data URL as a text field)")
        files = [key for key, value in form.multi_items() if key != "image" and not isinstance(value, str)]
        if files:
            raise RequestError(f"{files[0]}: a file field; only 'image' may be a file (the others are text fields)")
        payload = {key: _form_value([str(v) for v in form.getlist(key)], key) for key in form.keys() if key != "image"}
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {content_type or '(none)'}: send application/json or multipart/form-data"
        )
    try:
        params = model.model_validate(payload)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    return open_image(image_bytes, max_pixels), params, hashlib.sha256(image_bytes).hexdigest()
