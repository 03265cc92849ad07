"""Untrusted input at the HTTP edge (api/inputs.py, images.py): every malformed body gets a clear 4xx, the
server's own limits hold whether or not the client declares a length, and the server keeps serving.

A small deployment (4 KiB bodies, 400 decoded pixels) makes the limits cheap to cross.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from fsmllm.images import ImageError, open_image
from fsmllm.api.settings import Settings

from .live import LiveServer, data_url, live_server, png_bytes

MAX_BODY = 4096
MAX_PIXELS = 400


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(model="none", default_n0=20, default_n=100, batch_size=64, max_body_bytes=MAX_BODY,
                        max_image_pixels=MAX_PIXELS, _env_file=None)
    with live_server(settings) as live:
        yield live


def small_png(width: int = 16, height: int = 16, seed: int = 0) -> bytes:
    return png_bytes(seed, (width, height))


def noise_png(size: int) -> bytes:
    """A PNG larger than MAX_BODY (random pixels do not compress)."""
    return png_bytes(1, (size, size))


def post(server: LiveServer, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{server.url}/certify", timeout=60, **kwargs)  # type: ignore[arg-type]


def chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
    """A body sent with chunked transfer encoding: no content-length for the server to check first."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def multipart(fields: dict[str, str | list[str]], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body (also without any file, which httpx would send url-encoded)."""
    boundary = "fsmllm-test-boundary"
    parts = []
    for name, values in fields.items():
        for value in [values] if isinstance(values, str) else values:
            parts.append(f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, mime) in files.items():
        parts.append(f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"content-type: {mime}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def check_error(response: httpx.Response, status: int, kind: str, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and fragment in error["message"], error
    assert error["request_id"] == response.headers["x-request-id"]


def test_the_small_deployment_serves_small_images(server: LiveServer) -> None:
    assert post(server, json={"image": data_url(small_png())}).status_code == 200
    body, content_type = multipart({"seed": "1"}, {"image": ("x.png", small_png(), "image/png")})
    assert post(server, content=body, headers={"content-type": content_type}).status_code == 200


@pytest.mark.parametrize("declared", [True, False])
def test_a_json_body_over_the_limit_is_413(server: LiveServer, declared: bool) -> None:
    body = b'{"image": "' + base64.b64encode(noise_png(64)) + b'"}'
    assert len(body) > MAX_BODY
    content = body if declared else chunks(body)
    check_error(post(server, content=content, headers={"content-type": "application/json"}), 413, "too_large", str(MAX_BODY))
    assert post(server, json={"image": data_url(small_png())}).status_code == 200


@pytest.mark.parametrize("declared", [True, False])
def test_a_multipart_image_part_over_the_limit_is_413(server: LiveServer, declared: bool) -> None:
    body, content_type = multipart({"seed": "1"}, {"image": ("big.png", noise_png(64), "image/png")})
    content = body if declared else chunks(body)
    check_error(post(server, content=content, headers={"content-type": content_type}), 413, "too_large", str(MAX_BODY))


def test_a_multipart_text_part_over_the_limit_is_413(server: LiveServer) -> None:
    body, content_type = multipart({"bound": "x" * (MAX_BODY + 10)}, {"image": ("x.png", small_png(), "image/png")})
    check_error(post(server, content=chunks(body), headers={"content-type": content_type}), 413, "too_large", str(MAX_BODY))


@pytest.mark.parametrize("body", [b"[1, 2]", b'"an image"', b"42", b"null", b"", b"true"])
def test_a_json_body_that_is_not_an_object_is_422(server: LiveServer, body: bytes) -> None:
    response = post(server, content=body, headers={"content-type": "application/json"})
    check_error(response, 422, "invalid_request", "must be an object")
    assert response.json()["error"]["message"] == "the JSON body must be an object with an 'image' field"


@pytest.mark.parametrize("body", [b"{", b'{"image": }', b"\xff\xfe{}"])
def test_a_body_that_is_not_json_is_400(server: LiveServer, body: bytes) -> None:
    check_error(post(server, content=body, headers={"content-type": "application/json"}), 400, "invalid_request", "not valid JSON")


@pytest.mark.parametrize("image", [None, "", 42, ["a"]])
def test_json_without_an_image_string_is_422(server: LiveServer, image: object) -> None:
    body = {"seed": 1} if image is None else {"image": image}
    response = post(server, json=body)
    check_error(response, 422, "invalid_request", "image: required")
    assert response.json()["error"]["message"] == "image: required (base64 text or a data:image/...;base64, URL)"


def test_multipart_without_an_image_file_is_422(server: LiveServer) -> None:
    body, content_type = multipart({"seed": "1"}, {})
    response = post(server, content=body, headers={"content-type": content_type})
    check_error(response, 422, "invalid_request", "image: required")
    assert response.json()["error"]["message"] == (
        "image: required as a file field named 'image' (or its data URL as a text field)"
    )
    misnamed, content_type = multipart({"seed": "1"}, {"other": ("x.png", small_png(), "image/png")})
    check_error(post(server, content=misnamed, headers={"content-type": content_type}), 422, "invalid_request", "file field named 'image'")
    # the image as a text field (its base64, as JSON takes it) is read like the file
    as_text, content_type = multipart({"image": base64.b64encode(small_png()).decode(), "seed": "1"}, {})
    as_file, file_type = multipart({"seed": "1"}, {"image": ("x.png", small_png(), "image/png")})
    by_text = post(server, content=as_text, headers={"content-type": content_type})
    by_file = post(server, content=as_file, headers={"content-type": file_type})
    assert by_text.status_code == by_file.status_code == 200, by_text.text
    assert by_text.json()["certificate"]["score_lower"] == by_file.json()["certificate"]["score_lower"]
    as_text, content_type = multipart({"image": base64.b64encode(small_png()).decode()}, {"other": ("x.png", small_png(), "image/png")})
    # (a file under another name was a 500: an IndexError on its text values)
    check_error(post(server, content=as_text, headers={"content-type": content_type}), 422, "invalid_request",
                "other: a file field; only 'image' may be a file")


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/x-www-form-urlencoded", "image/png"])
def test_other_content_types_are_415(server: LiveServer, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = post(server, content=small_png(), headers=headers)
    check_error(response, 415, "unsupported_media_type", "multipart/form-data")
    assert response.json()["error"]["message"] == (
        f"unsupported content type {content_type or '(none)'}: send application/json or multipart/form-data")


def test_content_type_parameters_and_case_are_ignored(server: LiveServer) -> None:
    body = b'{"image": "' + base64.b64encode(small_png()) + b'", "seed": 4}'
    response = post(server, content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200 and response.json()["certificate"]["seed"] == 4


def test_multipart_form_values_are_validated_like_json(server: LiveServer) -> None:
    image = {"image": ("x.png", small_png(), "image/png")}
    body, content_type = multipart({"radius": ["0.1", "0.2"], "seed": "3", "stream": "false", "n": "100"}, image)
    form = post(server, content=body, headers={"content-type": content_type})
    as_json = post(server, json={"image": data_url(small_png()), "radius": [0.1, 0.2], "seed": 3, "n": 100})
    assert form.status_code == 200 and form.json()["certificate"]["radii"] == as_json.json()["certificate"]["radii"]
    one, content_type = multipart({"radius": "0.3", "seed": "3"}, image)
    assert [r["radius"] for r in post(server, content=one, headers={"content-type": content_type}).json()["certificate"]["radii"]] == [0.3]
    for fields, fragment in (({"radius": "wide"}, "radius"), ({"n": "many"}, "n"), ({"seed": "-1"}, "seed"),
                             ({"stream": "perhaps"}, "stream"), ({"extra": "1"}, "extra")):
        bad, content_type = multipart(fields, image)  # type: ignore[arg-type]
        check_error(post(server, content=bad, headers={"content-type": content_type}), 422, "invalid_request", fragment)


def test_an_image_above_the_servers_pixel_limit_is_413(server: LiveServer) -> None:
    """21 x 20 = 420 pixels: far below Pillow's own decompression-bomb limit, above this server's 400."""
    check_error(post(server, json={"image": data_url(small_png(21, 20))}), 413, "invalid_image", f"limit is {MAX_PIXELS}")
    body, content_type = multipart({}, {"image": ("x.png", small_png(20, 21), "image/png")})
    check_error(post(server, content=body, headers={"content-type": content_type}), 413, "invalid_image", "20x21 = 420")
    assert post(server, json={"image": data_url(small_png(20, 20))}).status_code == 200  # exactly at the limit


def test_every_allowed_format_decodes_and_others_are_refused(server: LiveServer) -> None:
    picture = Image.new("RGB", (12, 10), (128, 64, 32))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt)
        response = post(server, json={"image": data_url(buffer.getvalue(), f"image/{fmt.lower()}")})
        assert response.status_code == 200, (fmt, response.text)
    for fmt in ("ICO", "PPM", "TGA"):
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt)
        check_error(post(server, json={"image": base64.b64encode(buffer.getvalue()).decode()}), 415, "invalid_image",
                    f"unsupported image format {fmt}; send one of PNG, JPEG, WEBP, GIF, BMP, TIFF")
    check_error(post(server, json={"image": base64.b64encode(b"plain text, not an image").decode()}), 415,
                "invalid_image", "the data is not an image this server can read (send PNG, JPEG, WEBP, GIF, BMP, TIFF)")


BASE64_MESSAGE = "the image is not valid base64 (send base64 text or a data:image/...;base64, URL)"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("data:image/png;base64,", "the image is empty"),
        ("   ", "the image is empty"),
        ("data:image/png,abc", "a data URL must look like data:image/png;base64,<data>"),
        ("data:application/pdf;base64,aGVsbG8=", "the data URL holds 'application/pdf', not an image"),
        ("aGVsbG8", BASE64_MESSAGE),
        ("=", BASE64_MESSAGE),
    ],
)
def test_broken_base64_and_data_urls(server: LiveServer, image: str, message: str) -> None:
    response = post(server, json={"image": image})
    check_error(response, 400, "invalid_image", message)
    assert response.json()["error"]["message"] == message


def test_data_url_forms_that_are_accepted(server: LiveServer) -> None:
    encoded = base64.b64encode(small_png()).decode()
    for image in (f"data:;base64,{encoded}", f"data:image/png;charset=binary;base64,{encoded}", f"  {encoded}\n"):
        assert post(server, json={"image": image, "seed": 5}).status_code == 200, image


def test_multipart_text_that_reads_like_a_boolean_stays_text() -> None:
    """A prompt "True" is a question like any other (it used to be turned into a boolean and refused)."""
    from fsmllm.lm.models import load_model

    settings = Settings(model="tiny-test", default_n0=20, default_n=100, batch_size=64, max_tokens_limit=8, _env_file=None)
    with live_server(settings, model=load_model("tiny-test")) as live:
        body, content_type = multipart({"prompt": "True", "stop": "false", "max_tokens": "2", "seed": "1"},
                                       {"image": ("x.png", small_png(), "image/png")})
        response = httpx.post(f"{live.url}/generate", content=body, headers={"content-type": content_type}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["completion_tokens"] <= 2


def padded_json(size: int) -> bytes:
    """A valid JSON request of exactly ``size`` bytes (whitespace padding)."""
    body = b'{"image": "' + base64.b64encode(small_png()) + b'", "seed": 9}'
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_a_body_of_exactly_the_limit_is_accepted(server: LiveServer) -> None:
    body = padded_json(MAX_BODY)
    assert len(body) == MAX_BODY
    for content in (body, chunks(body)):
        response = post(server, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
    form, _ = multipart({"seed": "9"}, {"image": ("x.png", small_png(), "image/png")})
    name = "x" * (1 + MAX_BODY - len(form)) + ".png"  # the file name pads the body to the limit
    form, content_type = multipart({"seed": "9"}, {"image": (name, small_png(), "image/png")})
    assert len(form) == MAX_BODY
    for content in (form, chunks(form)):
        response = post(server, content=content, headers={"content-type": content_type})
        assert response.status_code == 200, response.text


def test_a_declared_length_over_the_limit_is_refused_before_the_body_arrives(server: LiveServer) -> None:
    """The server answers 413 from the headers alone: it does not wait for (or read) a body it will refuse."""
    host, port = server.url.removeprefix("http://").split(":")
    for content_type in ("application/json", "multipart/form-data; boundary=x"):
        with socket.create_connection((host, int(port)), timeout=60) as connection:
            connection.sendall(f"POST /certify HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\n"
                               f"content-length: {10 * MAX_BODY}\r\n\r\n".encode() + b"{")
            answer = b""  # the rest of the declared body is never sent; the answer comes anyway
            while b"}}" not in answer and (data := connection.recv(65536)):
                answer += data
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert f"the request body is {10 * MAX_BODY} bytes; the limit is {MAX_BODY}".encode() in answer


def test_multipart_limits_on_files_fields_and_parts() -> None:
    """One file, 64 fields; a text field may be as large as the deployment's body limit (not Starlette's 1 MiB)."""
    image = ("x.png", small_png(), "image/png")
    with live_server() as live:  # the default 20 MiB body limit

        def send(body: bytes, content_type: str) -> httpx.Response:
            return httpx.post(f"{live.url}/certify", content=body, headers={"content-type": content_type}, timeout=60)

        two_files = multipart({}, {"image": image, "other": ("y.bin", b"y", "application/octet-stream")})
        check_error(send(*two_files), 400, "invalid_request", "files")
        fields = {f"f{i}": "1" for i in range(65)}
        check_error(send(*multipart(fields, {"image": image})), 400, "invalid_request", "fields")  # type: ignore[arg-type]
        fields.pop("f64")
        check_error(send(*multipart(fields, {"image": image})), 422, "invalid_request", "f0")  # type: ignore[arg-type]
        large = multipart({"bound": "x" * 1_100_000}, {"image": image})
        check_error(send(*large), 422, "invalid_request", "bound")  # refused by validation, not by the parser


def test_an_empty_image_file_is_400(server: LiveServer) -> None:
    body, content_type = multipart({}, {"image": ("x.png", b"", "image/png")})
    response = post(server, content=body, headers={"content-type": content_type})
    check_error(response, 400, "invalid_image", "the image is empty")
    assert response.json()["error"]["message"] == "the image is empty"


@pytest.mark.parametrize("size", [(1, 20), (20, 1), (1, 1)])
def test_one_pixel_wide_images_are_images(server: LiveServer, size: tuple[int, int]) -> None:
    assert post(server, json={"image": data_url(small_png(*size))}).status_code == 200


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "I;16"])
def test_open_image_always_returns_rgb(mode: str) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (5, 4)).save(buffer, format="PNG")
    image = open_image(buffer.getvalue(), MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (5, 4)
    with pytest.raises(ImageError, match="^the image is empty$"):
        open_image(b"", MAX_PIXELS)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb needs no more to be refused)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_pillows_own_decompression_bomb_limit_is_a_413(server: LiveServer) -> None:
    response = post(server, json={"image": data_url(png_header_only(100_000, 100_000))})
    check_error(response, 413, "invalid_image", "decodes to more than")
    assert response.json()["error"]["message"] == f"the image decodes to more than the limit of {MAX_PIXELS} pixels"


@pytest.mark.parametrize("width", [0, 5])
def test_zero_size_and_truncated_images(server: LiveServer, width: int) -> None:
    if width == 0:  # Pillow does not identify a zero-width file as an image at all
        check_error(post(server, json={"image": data_url(png_header_only(0, 5))}), 415, "invalid_image", "not an image")
    else:
        response = post(server, json={"image": data_url(png_bytes(0, (16, 16))[:60])})
        check_error(response, 400, "invalid_image", "the image is corrupt or truncated: ")
        assert response.json()["error"]["message"].startswith("the image is corrupt or truncated: ")


def test_pillows_limit_is_named_when_it_is_the_lower_one() -> None:
    """A deployment allowing more pixels than Pillow decodes gets Pillow's limit in the message, not its own."""
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < 100_000_000
    settings = Settings(model="none", default_n0=20, default_n=100, max_image_pixels=200_000_000, _env_file=None)
    with live_server(settings) as live:
        response = httpx.post(f"{live.url}/certify", json={"image": data_url(png_header_only(10_000, 10_000))}, timeout=60)
    check_error(response, 413, "invalid_image", f"the limit of {Image.MAX_IMAGE_PIXELS} pixels")
