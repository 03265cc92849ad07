"""POST /v1/chat/completions and GET /v1/models: the OpenAI-compatible request and responses, with fsmllm's
certificate fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fsmllm.api.schemas.certificate import CertificateOut, CertificationParams
from fsmllm.api.schemas.common import EXAMPLE_IMAGE
from fsmllm.api.schemas.generate import AnswerCertificateOut, AnsweringParams
from fsmllm.engine.runtime import Policy
from fsmllm.engine.serving import Answered, AnswerTask
from fsmllm.errors import RequestError
from fsmllm.lm.base import Generation


class ImageURL(BaseModel):
    url: str = Field(description="a data:image/...;base64, URL (remote URLs are not fetched)", examples=[EXAMPLE_IMAGE])


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="a text part", examples=["text"])
    text: str = Field(
        description="the text: in the last user message, the question about the image", examples=["What is this?"]
    )


class ImagePart(BaseModel):
    type: Literal["image_url"] = Field(
        description="an image part (exactly one per conversation)", examples=["image_url"]
    )
    image_url: ImageURL = Field(description="the image, as a data URL", examples=[{"url": EXAMPLE_IMAGE}])


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="who speaks", examples=["user"])
    content: str | list[TextPart | ImagePart] = Field(
        description="the text, or a list of text and image_url parts",
        examples=[
            [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}}]
        ],
    )


class ChatCompletionRequest(AnsweringParams):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (n=1, user, ...)

    model: str | None = Field(
        None, description="the served model's id (GET /v1/models); any other id is refused", examples=["fsmllm-demo"]
    )
    messages: list[ChatMessage] = Field(
        ...,
        min_length=1,
        description="the conversation; the last user message's text is the question, and it holds one image",
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
        lt=2**63,
        description="seeds the noise and the sampling (overrides certification.seed)",
        examples=[7],
    )
    stream: bool = Field(False, description="answer as OpenAI chat.completion.chunk events", examples=[False])
    max_tokens: int = Field(64, ge=1, description="largest number of new tokens", examples=[32])
    certification: CertificationParams | None = Field(
        None,
        description="fsmllm extension: certification parameters, the fields of POST /certify's (unset: the "
        "deployment's defaults)",
        examples=[{"radius": [0.25]}],
    )

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_fields(cls, data: Any) -> Any:
        return data  # unknown fields are ignored here: OpenAI clients send fields we do not use (n=1, user, ...)

    def question_and_image(self) -> tuple[str, str]:
        """The last user message's text, and the one image of the conversation (as a data URL)."""
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
        if not text.strip():
            raise RequestError("the last user message has no text: ask a question about the image")
        if not images[0].startswith("data:"):
            raise RequestError("image_url must be a data:image/...;base64, URL; this server does not fetch remote URLs")
        return text.strip(), images[0]

    def to_answer(self, policy: Policy, question: str) -> AnswerTask:
        """The certified answer to ``question`` this asks for (the seed overrides ``certification.seed``)."""
        certification = self.certification or CertificationParams()
        return self.to_answer_task(policy, question, certification.to_task(policy, seed=self.seed))


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
    def of(cls, generation: Generation) -> Usage:
        return cls(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            total_tokens=generation.prompt_tokens + generation.completion_tokens,
        )


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
    def of(cls, completion_id: str, created: int, answered: Answered, per_token: bool) -> ChatCompletionResponse:
        generation, voted = answered.generation, answered.answer_certificate
        return cls(
            id=completion_id,
            created=created,
            model=answered.certified.provenance.model,
            choices=[
                ChatChoice(message=ChatChoiceMessage(content=generation.text), finish_reason=generation.finish_reason)
            ],
            usage=Usage.of(generation),
            certificate=CertificateOut.of(answered.certified, per_token=per_token),
            answer_certificate=None if voted is None else AnswerCertificateOut.from_certificate(voted),
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fsmllm"
    encoder: str
    booster: str
    input_size: int
    encoder_dtype: str = "float32"
    allowed_sigmas: list[float]
    defaults: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
