"""The errors a request can cause: one hierarchy, the client's to fix (the HTTP layer's one table,
``fsmllm.api.errors.ERROR_TABLE``, answers each with its status and kind; anything else is a 500)::

    ValueError
     └── RequestError                  422  the request cannot be served as asked
          ├── PolicyError              422  beyond what this deployment allows (sigma, n0 + n, radii, max_tokens)
          ├── CertificatesOnly         422  an answer asked of a deployment without a language model (model 'none')
          ├── UnknownModel             404  a model this deployment does not serve
          ├── CertificateNotFound      404  no stored certificate has that id (or chat completion id)
          ├── MalformedBody            400  the body is not valid JSON
          ├── BodyTooLarge             413  the body is over the limit
          ├── UnsupportedMediaType     415  neither JSON nor multipart
          └── ImageError               400  the image is corrupt, truncated, empty or not base64
               ├── UnsupportedImage    415  a format outside the list, or no image at all
               └── ImageTooLarge       413  more pixels than the limit

They derive from ``ValueError``, so the command line reports them as it reports any bad value. A ``ValueError``
that is not a :class:`RequestError` (an encoder's, a bug's) is the server's fault, not the client's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class RequestError(ValueError):
    """The request cannot be served as asked; the message says what to change, ``param`` (when one field is at
    fault) names that field as the request spells it (the OpenAI route's errors carry it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PolicyError(RequestError):
    """The request asks for more than, or other than, this deployment allows."""


class CertificatesOnly(RequestError):
    """An answer was asked of a deployment that serves certificates only (``--model none``)."""

    def __init__(self) -> None:
        super().__init__("this deployment serves certificates only (model 'none'); use POST /certify")


class UnknownModel(RequestError):
    """The request names a model this deployment does not serve."""


class CertificateNotFound(RequestError):
    """No stored certificate has the id (or the chat completion id) asked for."""


class MalformedBody(RequestError):
    """The body cannot be read as what its content type says."""


class BodyTooLarge(RequestError):
    """The body is larger than the deployment's limit."""


class UnsupportedMediaType(RequestError):
    """The body's content type is neither ``application/json`` nor ``multipart/form-data``."""


class ImageError(RequestError):
    """The image cannot be used: corrupt, truncated, empty, or not valid base64."""


class UnsupportedImage(ImageError):
    """The data is an image in a format outside the accepted list, or no image at all."""


class ImageTooLarge(ImageError):
    """The decoded image has more pixels than the limit allows."""


@contextlib.contextmanager
def as_request_error() -> Iterator[None]:
    """Around building the engine's parameters from a request: a ``ValueError`` raised there (a core value
    type refusing a value) is the request's, and becomes a :class:`RequestError` with the same message."""
    try:
        yield
    except RequestError:
        raise
    except ValueError as error:
        raise RequestError(str(error)) from error
