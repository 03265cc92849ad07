"""POST /v1/chat/completions and GET /v1/models: the OpenAI-compatible request and responses, with fsmllm's
certificate fields."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

from fsmllm.api.schemas.certificate import CertificateOut
from fsmllm.api.schemas.certify import CertifyParams
from fsmllm.api.schemas.common import EXAMPLE_IMAGE, RequestModel, refuse_unknown_fields
from fsmllm.api.schemas.generate import AnswerCertificateOut, AnsweringParams
from fsmllm.engine.runtime import Policy
from fsmllm.engine.serving import Answered, AnswerTask, Certified
from fsmllm.errors import RequestError
from fsmllm.lm.base import Generation

#: the question asked when the last user message has no text (an image alone: OpenAI's models describe it)
LONE_IMAGE_QUESTION = "What is in this image?"


# The text part carries no example of its own: example tools (schemathesis, Swagger UI) would put it alone in a
# message (a question and no image), a request the server refuses; the message's content gives the whole example.
class ImageURL(BaseModel):
    url: str = Field(
        description="a data:image/...;base64, URL (remote URLs are not fetched)",
        examples=[EXAMPLE_IMAGE],
        json_schema_extra={"pattern": "^data:"},  # checked in question_and_image, with a message that says why
    )


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="a text part")
    text: str = Field(
        description="the text: in the last user message, the question about the image (with none, the question "
        f"is {LONE_IMAGE_QUESTION!r})"
    )


class ImagePart(BaseModel):
    type: Literal["image_url"] = Field(description="an image part (exactly one per conversation)")
    image_url: ImageURL = Field(description="the image, as a data URL")


class ChatMessage(BaseModel):
    role: Literal["developer", "system", "user", "assistant"] = Field(
        description="who speaks ('developer' is OpenAI's newer name for 'system')", examples=["user"]
    )
    content: str | list[TextPart | ImagePart] = Field(
        description="the text, or a list of text and image_url parts",
        examples=[
            [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}}]
        ],
    )


#: the most answers (``n``) one chat completion may ask for: each is a generation from the one certificate
MAX_CHOICES = 8

#: the OpenAI request parameters this server honours (with fsmllm's certification and certify_answer)
HONOURED = (
    "model",
    "messages",
    "max_completion_tokens",
    "max_tokens",
    "n",
    "seed",
    "stop",
    "stream",
    "stream_options.include_usage",
    "temperature",
    "top_p",
    "user",
)

#: OpenAI request parameters this server does not implement, with the values that ask for nothing: sent with one
#: of those (or null) they are accepted, so that clients sending their defaults work; any other value is refused
#: (400 ``unsupported_parameter``)
NOT_IMPLEMENTED: dict[str, tuple[object, ...]] = {
    "logprobs": (False,),
    "top_logprobs": (0,),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "metadata": ({},),
    "prompt_cache_key": (),
}


class StreamOptions(RequestModel):
    include_usage: bool = Field(
        False,
        description="end the stream with one more chunk holding the usage and no choices (the certificate moves to it)",
        examples=[True],
    )


class ChatCertification(CertifyParams):
    """The chat completion's ``certification`` object: POST /certify's fields, ``stream`` apart (the completion
    streams with the top-level ``stream``)."""

    stream: Literal[False] = Field(
        False, description="not here: a chat completion streams with the top-level 'stream'", examples=[False]
    )

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_is_top_level(cls, value: object) -> object:
        if value not in (False, None):
            raise PydanticCustomError(  # its place (certification.stream) is its param
                "unsupported_value",
                "not taken here: a chat completion streams with the top-level 'stream' (its last chunk carries "
                "the certificate)",
                {},
            )
        return False


#: JSON Schema of "a message whose content holds an image part": a conversation must contain one
ONE_IMAGE_MESSAGE: JsonDict = {
    "type": "object",
    "required": ["content"],
    "properties": {
        "content": {
            "type": "array",
            "contains": {"type": "object", "required": ["type"], "properties": {"type": {"const": "image_url"}}},
        }
    },
}


class ChatCompletionRequest(AnsweringParams):
    """An OpenAI chat completion request: the parameters of :data:`HONOURED` are honoured, those of
    :data:`NOT_IMPLEMENTED` accepted only with values that ask for nothing, any other refused naming the one meant."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}},
                            ],
                        }
                    ],
                    "max_completion_tokens": 16,
                    "seed": 7,
                    "certification": {"radius": [0.25]},
                }
            ]
        }
    )

    model: str | None = Field(
        None, description="the served model's id (GET /v1/models); any other id is refused", examples=["fsmllm-demo"]
    )
    messages: list[ChatMessage] = Field(
        ...,
        min_length=1,
        description="the conversation; the last user message's text is the question, and it holds one image",
        json_schema_extra={"contains": ONE_IMAGE_MESSAGE},
        examples=[
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}},
                    ],
                }
            ]
        ],
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,  # as an int64, so that the schema states it exactly (2**63 is written as a float)
        description="seeds the noise and the sampling (overrides certification.seed); answer i of n is seeded seed + i",
        examples=[7],
    )
    stream: bool = Field(False, description="answer as OpenAI chat.completion.chunk events", examples=[False])
    stream_options: StreamOptions | None = Field(
        None, description="with stream: include_usage", examples=[{"include_usage": True}]
    )
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        description="OpenAI's current name for max_tokens; when both are given, this one applies",
        examples=[32],
    )
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description=f"answers to generate from the one certificate (at most {MAX_CHOICES})",
        examples=[1],
    )
    user: str | None = Field(
        None, max_length=256, description="OpenAI's end-user id: accepted, not used", examples=["user-1"]
    )
    certification: ChatCertification | None = Field(
        None,
        description="fsmllm extension: certification parameters, the fields of POST /certify's but 'stream' (unset: "
        "the deployment's defaults)",
        examples=[{"radius": [0.25]}],
    )

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, neutral in NOT_IMPLEMENTED.items():
            value = data.get(name)
            if value is not None and not any(value == accepted for accepted in neutral):
                asks = (
                    ""
                    if not neutral
                    else f" (only {' or '.join(json.dumps(v) for v in neutral)}, which asks for nothing)"
                )
                raise PydanticCustomError(
                    "unsupported_parameter",
                    "{name} is not supported by this server{asks}; leave it out. The parameters it honours: {honoured}",
                    {"name": name, "asks": asks, "honoured": ", ".join(HONOURED), "param": name},
                )
        data = {key: value for key, value in data.items() if key not in NOT_IMPLEMENTED}
        refuse_unknown_fields(data, list(cls.model_fields), {"certification": list(ChatCertification.model_fields)})
        return data

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins, under the same limit
            self.max_tokens = self.max_completion_tokens
        return self

    def question_and_image(self) -> tuple[str, str]:
        """The last user message's text (:data:`LONE_IMAGE_QUESTION` when it has none), and the one image of the
        conversation (as a data URL)."""
        images = [
            part.image_url.url
            for message in self.messages
            if not isinstance(message.content, str)
            for part in message.content
            if part.type == "image_url"
        ]
        if len(images) != 1:
            raise RequestError(
                f"send exactly one image (an image_url content part); this conversation has {len(images)}"
            )
        users = [message for message in self.messages if message.role == "user"]
        if not users:
            raise RequestError("the conversation has no user message")
        content = users[-1].content
        text = content if isinstance(content, str) else " ".join(p.text for p in content if p.type == "text")
        if not images[0].startswith("data:"):
            raise RequestError("image_url must be a data:image/...;base64, URL; this server does not fetch remote URLs")
        return text.strip() or LONE_IMAGE_QUESTION, images[0]

    def to_answer(self, policy: Policy, question: str) -> AnswerTask:
        """The certified answers to ``question`` this asks for (the seed overrides ``certification.seed``)."""
        certification = self.certification or ChatCertification()
        task = self.to_answer_task(policy, question, certification.to_task(policy, seed=self.seed))
        return replace(task, choices=self.n)

    def certificate(self, certified: Certified) -> CertificateOut:
        """The served certificate, with what ``certification`` asks of it (certified_radius, per-token values)."""
        certification = self.certification or ChatCertification()
        return CertificateOut.of(certified, certification.target_cos, certification.per_token)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, generations: Sequence[Generation]) -> Usage:
        """The tokens of the prompt (read once) and of every choice's answer."""
        prompt = generations[0].prompt_tokens
        completion = sum(generation.completion_tokens for generation in generations)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    certificate: CertificateOut = Field(description="fsmllm extension: the certificate of the image's features")
    answer_certificate: AnswerCertificateOut | None = Field(
        None, description="fsmllm extension, with certify_answer: the certified answer and its radius"
    )

    @classmethod
    def of(
        cls, completion_id: str, created: int, answered: Answered, certificate: CertificateOut
    ) -> ChatCompletionResponse:
        voted = answered.answer_certificate
        return cls(
            id=completion_id,
            created=created,
            model=answered.certified.provenance.model,
            choices=[
                ChatChoice(
                    index=index,
                    message=ChatChoiceMessage(content=generation.text),
                    finish_reason=generation.finish_reason,
                )
                for index, generation in enumerate(answered.generations)
            ],
            usage=Usage.of(answered.generations),
            certificate=certificate,
            answer_certificate=None if voted is None else AnswerCertificateOut.from_certificate(voted),
        )


class OpenAIError(BaseModel):
    message: str = Field(description="what is wrong and what to change")
    type: Literal["invalid_request_error", "server_error"] = Field(description="OpenAI's error type")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str = Field(
        description="the kind: unsupported_parameter, unsupported_value, invalid_value, missing_required_parameter, "
        "invalid_image, model_not_found, too_large, overloaded, ..."
    )
    request_id: str | None = Field(None, description="fsmllm extension: the id under which the server log keeps it")


class OpenAIErrorResponse(BaseModel):
    """An error on the OpenAI routes, in OpenAI's shape (the native routes answer :class:`ErrorResponse`)."""

    error: OpenAIError


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fsmllm"
    encoder: str
    booster: str
    input_size: int
    encoder_dtype: str = "float32"
    lm_dtype: str | None = None
    allowed_sigmas: list[float]
    defaults: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
