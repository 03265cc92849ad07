"""One vocabulary over HTTP: unknown fields get a 422 naming the field meant, every request field is documented
with an example in /openapi.json, the documentation routes stay open behind an API key, and list settings read
from the environment as ``0.25,0.5`` as well as JSON."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from fsmllm.api.settings import Settings

from .live import LiveServer, data_url, live_server, png_bytes


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server() as live:
        yield live


def _refused(response: httpx.Response) -> str:
    """The message of a refusal: 422 on the native routes, OpenAI's 400 on /v1/."""
    assert response.status_code == (400 if response.url.path.startswith("/v1/") else 422), response.text
    return response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "fields", "expected"),
    [
        ("/certify", {"target_cosine": 0.5}, "body: unknown field 'target_cosine' (did you mean 'target_cos'?)"),
        ("/certify", {"radii": [0.1]}, "body: unknown field 'radii' (did you mean 'radius'?)"),
        ("/certify", {"stop_at_fcbs": 0.8}, "unknown field 'stop_at_fcbs' (did you mean 'stop_at_fcsb'?)"),
        ("/certify", {"num_samples": 500}, "unknown field 'num_samples' (did you mean 'n'?)"),
        ("/generate", {"prompt": "Hi", "max_new_tokens": 8}, "unknown field 'max_new_tokens' (did you mean 'max_tokens'?)"),
    ],
)
def test_an_unknown_json_field_names_the_field_meant(server: LiveServer, path: str, fields: dict[str, Any], expected: str) -> None:
    message = _refused(httpx.post(f"{server.url}{path}", json={"image": data_url(png_bytes()), **fields}, timeout=60))
    assert expected in message
    assert "; the fields are " in message and "radius, sigma, n0, n, alpha" in message  # and lists what there is


def test_an_unknown_form_field_names_the_field_meant(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.url}/certify", files={"image": ("cat.png", png_bytes())}, data={"target_cosine": "0.5"}, timeout=60
    )
    assert "unknown field 'target_cosine' (did you mean 'target_cos'?)" in _refused(response)


def test_a_field_of_another_route_is_refused_without_a_wrong_hint(server: LiveServer) -> None:
    """target_cos belongs to /certify; /generate has nothing like it, so no field is suggested."""
    message = _refused(httpx.post(f"{server.url}/generate", json={"image": data_url(png_bytes()), "prompt": "Hi", "target_cos": 0.5}))
    assert message.startswith("body: unknown field 'target_cos'; the fields are ")


def test_the_openai_certification_object_names_the_field_meant(server: LiveServer) -> None:
    chat = {
        "messages": [{"role": "user", "content": "Hi"}],
        "user": "ignored, as OpenAI clients send it",
        "certification": {"radii": [0.25]},
    }
    response = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    assert _refused(response).startswith("certification: unknown field 'radii' (did you mean 'radius'?)")
    assert response.json()["error"]["param"] == "certification.radii"


def _resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        target: Any = spec
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = target
    return schema


def _keys(value: Any) -> set[str]:
    """The keys of every object inside ``value`` (an example)."""
    if isinstance(value, dict):
        return set(value).union(*(_keys(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_keys(item) for item in value))
    return set()


def _properties(
    schema: dict[str, Any], spec: dict[str, Any], where: str, seen: set[str], shown: frozenset[str] = frozenset()
) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Every property of ``schema`` and of the objects inside it (through $ref, anyOf/oneOf/allOf and items), and
    whether the example of a list holding it shows it (``shown``: the fields those examples' items have)."""
    ref = schema.get("$ref")
    if ref is not None:
        if ref in seen:
            return
        seen = seen | {ref}
    schema = _resolve(schema, spec)
    for name, prop in schema.get("properties", {}).items():
        yield f"{where}.{name}", prop, name in shown
        yield from _properties(prop, spec, f"{where}.{name}", seen, shown)
    listed = _keys(schema.get("examples", []))  # what the examples of a list (or of its alternatives) show
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key, []):
            yield from _properties(option, spec, where, seen, shown | listed if option.get("type") == "array" else shown)
    if "items" in schema:
        yield from _properties(schema["items"], spec, f"{where}[]", seen, shown | listed)


def test_every_request_field_has_a_description_and_an_example(server: LiveServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    checked, missing = set(), []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                for where, prop, shown in _properties(content["schema"], spec, f"{method.upper()} {path} ({media})", set()):
                    checked.add(where)
                    lacks = [key for key in ("description", "examples") if not prop.get(key) and not prop.get(key[:-1] if key == "examples" else key)]
                    if shown:  # a content part: its example is in the whole content's (a lone part is refused)
                        lacks = [key for key in lacks if key != "examples"]
                    if lacks:
                        missing.append(f"{where}: no {' and no '.join(lacks)}")
    assert not missing, "\n".join(missing)
    # the walk reached the routes and the nested objects (a walk that found nothing would pass)
    for where in (
        "POST /certify (application/json).target_cos",
        "POST /certify (multipart/form-data).image",
        "POST /generate (application/json).max_tokens",
        "POST /v1/chat/completions (application/json).certification.radius",
        "POST /v1/chat/completions (application/json).messages[].content[].image_url.url",
    ):
        assert where in checked, sorted(checked)


def test_the_api_documentation_stays_open_behind_an_api_key() -> None:
    """The decision the README states: /docs, /redoc and /openapi.json need no key; the API itself does."""
    settings = Settings(model="none", default_n0=20, default_n=100, api_key="s3cret", _env_file=None)
    with live_server(settings) as live:
        for page in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{live.url}{page}").status_code == 200, page
        for method, path in (("GET", "/v1/models"), ("POST", "/certify"), ("POST", "/v1/chat/completions")):
            response = httpx.request(method, f"{live.url}{path}")
            assert response.status_code == 401 and "API key" in response.json()["error"]["message"], path
        authorised = httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert authorised.status_code == 200


@pytest.mark.parametrize(
    ("text", "sigmas"),
    [("0.25,0.5", [0.25, 0.5]), ("0.5, 0.25", [0.25, 0.5]), ("[0.25, 0.5]", [0.25, 0.5]), ("0.25", [0.25])],
)
def test_list_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, text: str, sigmas: list[float]) -> None:
    monkeypatch.setenv("FSMLLM_ALLOWED_SIGMAS", text)
    assert Settings(_env_file=None).allowed_sigmas == sigmas


def test_a_bad_list_setting_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSMLLM_ALLOWED_SIGMAS", "0.25,loud")
    with pytest.raises(ValidationError, match="allowed_sigmas"):
        Settings(_env_file=None)
