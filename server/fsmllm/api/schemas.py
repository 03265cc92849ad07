"""Request and response models of the HTTP API (pydantic; they are the OpenAPI schema)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fsmllm.certify import BOUND_METHODS, DEFAULT_RADII, Certificate, StopRule
from fsmllm.certify.answers import AnswerCertificate, AnswerConfig
from fsmllm.engine.runtime import Policy
from fsmllm.engine.serving import Answered, AnswerTask, Certified, CertifyTask
from fsmllm.errors import PolicyError, RequestError, as_request_error
from fsmllm.lm.base import Generation, SamplingParams

NORM_NOTE = (
    "sigma and every radius are l2 norms over the encoder's input pixels in [0, 1] "
    "(3 x S x S values after resizing the shorter side to S and centre-cropping)"
)
EXAMPLE_IMAGE = "data:image/png;base64,iVBORw0KGgo..."
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


class RequestModel(BaseModel):
    """A request body (or part of one) that refuses unknown fields with a 422 naming the field meant."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = list(cls.model_fields)
        unknown = [str(key) for key in data if key not in cls.model_fields]
        if unknown:
            hints = []
            for name in unknown:
                meant = suggestion(name, known)
                hints.append(f"unknown field {name!r}" + (f" (did you mean {meant!r}?)" if meant else ""))
            raise PydanticCustomError(
                "unknown_field", "{hints}; the fields are {known}", {"hints": "; ".join(hints), "known": ", ".join(known)}
            )
        return data


class CertificationParams(RequestModel):
    """How to certify. Unset fields take the deployment's defaults (see GET /v1/models)."""

    radius: float | list[float] | None = Field(
        None,
        description=f"one l2 radius or a list of them (default {list(DEFAULT_RADII)}); " + NORM_NOTE,
        examples=[list(DEFAULT_RADII)],
    )
    sigma: float | None = Field(
        None,
        description="noise level (l2 norm of the Gaussian noise per pixel value); must be one of the deployment's "
        "allowed sigmas (GET /v1/models; default: the deployment's default sigma)",
        examples=[0.25],
    )
    n0: int | None = Field(
        None, ge=1, description="selection samples (fix the smoothed direction); default: the deployment's", examples=[100]
    )
    n: int | None = Field(
        None,
        ge=2,
        description="estimation samples (bound the score); a budget with stop_at_fcsb or radius_tolerance; default: "
        "the deployment's",
        examples=[1000],
    )
    alpha: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="failure probability of the certificate (per certificate: re-rolling the seed and keeping the "
        "best of several certificates weakens it); default: the deployment's",
        examples=[0.001],
    )
    bound: Literal["betting", "empirical-bernstein", "hoeffding"] = Field(
        "betting",
        description="confidence bound on the score: 'betting' (Waudby-Smith & Ramdas 2023; follows the variance, "
        "anytime-valid, so sampling may stop early) or the fixed-n 'empirical-bernstein' / 'hoeffding'",
        examples=["betting"],
    )
    granularity: Literal["global", "token"] = Field(
        "global",
        description="'global': one certificate for the whole feature (all tokens flattened, normalised once); "
        "'token': every visual token normalised and certified on its own, for all tokens at once (the headline "
        "numbers are the worst token's), which is what a per-token projector reads",
        examples=["global"],
    )
    per_token: bool = Field(
        False, description="with granularity 'token': also return every token's values", examples=[False]
    )
    stop_at_fcsb: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="stop sampling as soon as the certified FCSB is at least this at every radius, or once it is "
        "clear it cannot get there; n is then a budget (needs bound 'betting')",
        examples=[0.8],
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="noise seed; a random one is chosen and returned if unset", examples=[7]
    )
    stream: bool = Field(
        False, description="answer with a server-sent event stream: progress events, then the result", examples=[False]
    )

    @field_validator("radius")
    @classmethod
    def _radii_non_negative(cls, value: float | list[float] | None) -> float | list[float] | None:
        radii = [value] if isinstance(value, (int, float)) else (value or [])
        if value is not None and not radii:
            raise ValueError("give at least one radius")
        for radius in radii:
            if not radius >= 0 or radius == float("inf"):
                raise ValueError(f"radius must be a finite non-negative l2 norm, got {radius}")
        return value

    @model_validator(mode="after")
    def _per_token_needs_tokens(self) -> CertificationParams:
        if self.per_token and self.granularity != "token":
            raise ValueError("per_token needs granularity 'token' (a global certificate has no per-token values)")
        return self

    def radii(self) -> list[float]:
        if self.radius is None:
            return list(DEFAULT_RADII)
        return [float(self.radius)] if isinstance(self.radius, (int, float)) else [float(r) for r in self.radius]

    def to_task(self, policy: Policy, seed: int | None = None) -> CertifyTask:
        """The certification this asks for, checked against ``policy`` (a ``seed`` given overrides the request's)."""
        config = policy.config(self.sigma, self.n0, self.n, self.alpha, self.bound, self.granularity)
        radii = policy.radii(self.radii())
        with as_request_error():
            stop = StopRule.requested(config, radii, self.stop_at_fcsb, *self._stop_targets())
        return CertifyTask(config, radii, self.seed if seed is None else seed, stop)

    def _stop_targets(self) -> tuple[float | None, float | None]:
        """The target cosine and radius tolerance of a radius stop rule (only POST /certify has them)."""
        return None, None


assert set(BOUND_METHODS) == {"betting", "empirical-bernstein", "hoeffding"}  # keep the Literal above in step


class CertifyParams(CertificationParams):
    target_cos: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="also return the largest radius whose certified FCSB is at least this cosine (certified_radius)",
        examples=[0.5],
    )
    radius_tolerance: float | None = Field(
        None,
        gt=0,
        description="with target_cos: stop sampling once the certified radius is within this l2 distance of the "
        "largest radius more samples could certify (needs bound 'betting')",
        examples=[0.01],
    )

    def _stop_targets(self) -> tuple[float | None, float | None]:
        return self.target_cos, self.radius_tolerance


class CertifyRequest(CertifyParams):
    """POST /certify as JSON. Multipart uploads send the same fields as form fields plus an ``image`` file."""

    image: str = Field(..., min_length=1, description="base64 image or data:image/...;base64, URL", examples=[EXAMPLE_IMAGE])


class GenerationParams(RequestModel):
    """How to generate the answer."""

    max_tokens: int = Field(
        64, ge=1, description="largest number of new tokens (at most the deployment's max_tokens_limit)", examples=[64]
    )
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature; 0 = greedy decoding", examples=[0.0])
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens whose "
                         "probabilities add up to this", examples=[1.0])
    stop: list[str] | str | None = Field(
        None, description="stop strings: the answer ends before the first one it would contain", examples=[["\n\n"]]
    )

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def to_sampling(self, policy: Policy, seed: int | None) -> SamplingParams:
        """The sampling this asks for, checked against ``policy``."""
        return policy.sampling(self.max_tokens, self.temperature, self.top_p, seed, self.stop_list())


ANSWER_STATEMENT = (
    "With probability at least 1 - alpha over the noise: unless abstain, the smoothed model (the answer most "
    "likely under Gaussian noise of level sigma on the image, greedy, normalised: whitespace, case and final "
    "punctuation ignored) answers 'answer' for every image x' within l2 distance radius of x (Cohen et al. 2019)"
)


class AnswerCertification(RequestModel):
    """Certify the answer itself (CERTIFY on the whole model): n0 + n greedy answers from noisy copies vote."""

    n0: int = Field(32, ge=1, description="selection votes: the most frequent answer among them is certified", examples=[32])
    n: int = Field(
        256, ge=2, description="estimation votes (a budget when radius is set): each is one generation", examples=[256]
    )
    alpha: float = Field(0.001, gt=0, lt=1, description="failure probability of the answer certificate", examples=[0.001])
    radius: float | None = Field(
        None,
        gt=0,
        description="target l2 radius: stop voting once the answer is certified to it, or once it cannot be "
        "(anytime-valid betting bound instead of Clopper-Pearson)",
        examples=[0.25],
    )
    inner: int = Field(
        1,
        ge=1,
        le=16,
        description="noisy copies averaged per vote; the certified radius is divided by sqrt(inner) (method.md)",
        examples=[1],
    )


class AnswerParams(RequestModel):
    certify_answer: AnswerCertification | None = Field(
        None,
        description="certify the answer itself: true for the defaults, or an object (n0, n, alpha, radius, inner); "
        "in a multipart form, 'true' or that object as JSON text",
        examples=[{"n": 256, "radius": 0.25}],
    )

    @field_validator("certify_answer", mode="before")
    @classmethod
    def _answer_options(cls, value: object) -> object:
        if isinstance(value, str):  # a multipart form field
            text = value.strip()
            if text.startswith("{"):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"certify_answer is not valid JSON: {error}") from None
            value = {"true": True, "1": True, "false": False, "0": False}.get(text.lower(), value)
        if value is True:
            return AnswerCertification()
        if value is False:
            return None
        return value

    def to_answer_config(self, policy: Policy, sigma: float) -> AnswerConfig | None:
        """The certified answer's parameters (at the certificate's ``sigma``), or None when not asked for."""
        options = self.certify_answer
        if options is None:
            return None
        return policy.answer_config(sigma, options.n0, options.n, options.alpha, options.inner, options.radius)


class AnsweringParams(GenerationParams, AnswerParams):
    """The fields of an answer (POST /generate, a chat completion): how to sample, whether to certify it."""

    def to_answer_task(self, policy: Policy, prompt: str, certify: CertifyTask) -> AnswerTask:
        """The answer to ``prompt`` this asks for, after the certification ``certify``."""
        return AnswerTask(
            certify, prompt, self.to_sampling(policy, certify.seed), self.to_answer_config(policy, certify.config.sigma)
        )


class GenerateParams(CertificationParams, AnsweringParams):
    prompt: str = Field(
        ..., min_length=1, description="the question about the image (at most max_prompt_chars)", examples=["What is this?"]
    )

    def to_answer(self, policy: Policy, max_prompt_chars: int) -> AnswerTask:
        """The certified answer this asks for, checked against ``policy`` and the prompt limit."""
        if len(self.prompt) > max_prompt_chars:
            raise PolicyError(f"the prompt has {len(self.prompt)} characters; the limit is {max_prompt_chars}")
        return self.to_answer_task(policy, self.prompt, self.to_task(policy))


class GenerateRequest(GenerateParams):
    """POST /generate as JSON. Multipart uploads send the same fields as form fields plus an ``image`` file."""

    image: str = Field(..., min_length=1, description="base64 image or data:image/...;base64, URL", examples=[EXAMPLE_IMAGE])


class RadiusBound(BaseModel):
    radius: float
    certified_fcsb: float | None = Field(
        description="with probability >= 1 - alpha, cos(F(x), F(x')) >= this for all ||x' - x|| <= radius, F the "
        "smoothed encoder (the direct bound FCSB(score_lower, sigma, radius)); null = nothing certified here"
    )
    served_fcsb: float | None = Field(
        description="with the same probability, cos(features handed to the language model, F(x')) >= this for the "
        "same x'; null = nothing certified here"
    )
    estimated_fcsb: float = Field(description="the paper's FCSB at the estimated score: an estimate, not a certificate")


class TokenBound(BaseModel):
    token: int = Field(description="the token's index in the encoder's output")
    score_estimate: float
    score_lower: float = Field(description="lower confidence bound on this token's score (its share of alpha)")
    served_angle: float
    certified_fcsb: list[float | None] = Field(description="this token's certified FCSB at each requested radius")


class CertifiedRadius(BaseModel):
    target_cos: float
    radius: float | None = Field(
        description="largest radius whose certified_fcsb is at least target_cos (0 when score_lower equals it); "
        "null when not even radius 0 is certified"
    )


class Timings(BaseModel):
    queue_ms: float = 0.0
    certify_ms: float = 0.0
    generate_ms: float = 0.0
    answer_ms: float = Field(0.0, description="certifying the answer (its votes), when asked")
    total_ms: float = 0.0

    @classmethod
    def of(cls, certified: Certified, answered: Answered | None = None) -> Timings:
        """The milliseconds of a certification, or of an answer and its certification."""
        return cls(
            queue_ms=certified.queue_seconds * 1e3,
            certify_ms=certified.compute_seconds * 1e3,
            generate_ms=0.0 if answered is None else answered.generate_seconds * 1e3,
            answer_ms=0.0 if answered is None else answered.answer_seconds * 1e3,
            total_ms=(certified if answered is None else answered).total_seconds * 1e3,
        )


class CertificateOut(BaseModel):
    """A complete certificate: every number can be reproduced from the fields of this object and the image."""

    encoder: str
    booster: str
    input_size: int
    encoder_dtype: str = Field(
        "float32", description="the precision the encoder computed in: the certificate is for the encoder as computed in it"
    )
    norm: str = NORM_NOTE
    statement: str = Field(STATEMENT, description="what the certificate states, and about which vectors")
    granularity: Literal["global", "token"] = Field(
        "global", description="'token': F, F_hat and the bounds are per token, and the numbers below the worst token's"
    )
    worst_token: int | None = Field(None, description="granularity 'token': the token with the lowest certified score")
    tokens: list[TokenBound] | None = Field(None, description="granularity 'token' with per_token: every token's values")
    sigma: float
    n0: int
    n: int = Field(description="estimation samples used (fewer than n_budget when sampling stopped early)")
    n_budget: int = Field(description="estimation samples allowed (the request's n)")
    stopped_by: Literal["budget", "target_reached", "target_unreachable", "radius_converged"] = Field(
        description="why sampling ended: the budget was spent, or an early-stopping rule"
    )
    alpha: float = Field(description="failure probability of all the certificate's statements together")
    bound: str
    seed: int
    score_estimate: float = Field(description="estimate of the Gaussian robustness score S = ||F(x)||")
    score_lower: float = Field(description="(1 - alpha) lower confidence bound on <F(x), u> <= S, u fixed by the n0 samples")
    served_angle: float = Field(
        description="angle (radians) between u and the features handed to the language model (their mean over all samples)"
    )
    abstain: bool = Field(description=ABSTAIN)
    radii: list[RadiusBound]
    certified_radius: CertifiedRadius | None = Field(
        None, description="with target_cos: the largest radius certified at that cosine; null without target_cos"
    )
    cached: bool = Field(False, description="served from the certificate cache (same image, parameters and seed)")

    @classmethod
    def from_certificate(
        cls,
        cert: Certificate,
        encoder: str,
        booster: str,
        input_size: int,
        target_cos: float | None = None,
        per_token: bool = False,
        cached: bool = False,
        encoder_dtype: str = "float32",
    ) -> CertificateOut:
        """The certificate's one JSON shape, printed alike by the server and by ``fsmllm certify --json``."""
        cfg = cert.config
        summary = cert.to_dict(per_token=per_token)
        return cls(
            granularity=cfg.granularity,
            worst_token=cert.worst_token,
            tokens=summary.get("tokens"),
            encoder=encoder,
            booster=booster,
            input_size=input_size,
            encoder_dtype=encoder_dtype,
            sigma=cfg.sigma,
            n0=cfg.n0,
            n=cert.n,
            n_budget=cfg.n,
            stopped_by=cert.stopped_by,  # type: ignore[arg-type]
            alpha=cfg.alpha,
            bound=cfg.bound,
            seed=cert.seed,
            score_estimate=cert.score_estimate,
            score_lower=cert.score_lower,
            served_angle=cert.served_angle,
            abstain=cert.abstain,
            radii=summary["radii"],
            certified_radius=None
            if target_cos is None
            else CertifiedRadius(target_cos=target_cos, radius=cert.certified_radius(target_cos)),
            cached=cached,
        )

    @classmethod
    def of(cls, certified: Certified, target_cos: float | None = None, per_token: bool = False) -> CertificateOut:
        """The served certificate of ``certified``, with its provenance."""
        served_by = certified.provenance
        return cls.from_certificate(
            certified.certificate, served_by.encoder, served_by.booster, served_by.input_size, target_cos, per_token,
            certified.cached, served_by.encoder_dtype,
        )


class CertifyResponse(BaseModel):
    id: str
    certificate: CertificateOut
    timings: Timings

    @classmethod
    def of(cls, request_id: str, certified: Certified, target_cos: float | None, per_token: bool) -> CertifyResponse:
        return cls(id=request_id, certificate=CertificateOut.of(certified, target_cos, per_token), timings=Timings.of(certified))


class AnswerVote(BaseModel):
    answer: str = Field(description="the answer as first generated")
    normalised: str = Field(description="the form in which votes are compared")
    count: int = Field(description="estimation votes for it")


class AnswerCertificateOut(BaseModel):
    """The certified answer (method.md, "Certified answers"); it may differ from the streamed ``answer``, which
    the model generates once from the smoothed features."""

    statement: str = Field(ANSWER_STATEMENT, description="what the answer certificate states")
    answer: str = Field(description="the certified answer (the selection votes' most frequent one)")
    normalised: str
    p_lower: float = Field(description="(1 - alpha) lower confidence bound on the probability that a vote gives it")
    radius: float | None = Field(description="certified l2 radius sigma/sqrt(inner) * Phi^-1(p_lower); null: abstain")
    abstain: bool = Field(description="true when p_lower <= 1/2: no radius is certified")
    votes: list[AnswerVote] = Field(description="the most frequent answers among the estimation votes")
    agree: int = Field(description="estimation votes for the certified answer")
    n0: int
    n: int = Field(description="estimation votes used (fewer than n_budget when voting stopped early)")
    n_budget: int
    stopped_by: Literal["budget", "target_reached", "target_unreachable"]
    alpha: float
    sigma: float
    inner: int
    bound: Literal["clopper-pearson", "betting"]
    target_radius: float | None
    seed: int

    @classmethod
    def from_certificate(cls, certificate: AnswerCertificate) -> AnswerCertificateOut:
        """The JSON of a certified answer, the same from the server and from ``fsmllm generate --json``."""
        return cls.model_validate(certificate.to_dict())


class GenerateResponse(BaseModel):
    id: str
    model: str
    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    certificate: CertificateOut
    answer_certificate: AnswerCertificateOut | None = Field(
        None, description="with certify_answer: the certified answer and its radius"
    )
    timings: Timings

    @classmethod
    def of(cls, request_id: str, answered: Answered, per_token: bool) -> GenerateResponse:
        generation, voted = answered.generation, answered.answer_certificate
        return cls(
            id=request_id,
            model=answered.certified.provenance.model,
            answer=generation.text,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            certificate=CertificateOut.of(answered.certified, per_token=per_token),
            answer_certificate=None if voted is None else AnswerCertificateOut.from_certificate(voted),
            timings=Timings.of(answered.certified, answered),
        )


class ErrorBody(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- OpenAI-compatible chat ------------------------------------------------------------------------------


class ImageURL(BaseModel):
    url: str = Field(
        description="a data:image/...;base64, URL (remote URLs are not fetched)", examples=[EXAMPLE_IMAGE]
    )


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="a text part", examples=["text"])
    text: str = Field(description="the text: in the last user message, the question about the image", examples=["What is this?"])


class ImagePart(BaseModel):
    type: Literal["image_url"] = Field(description="an image part (exactly one per conversation)", examples=["image_url"])
    image_url: ImageURL = Field(description="the image, as a data URL", examples=[{"url": EXAMPLE_IMAGE}])


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="who speaks", examples=["user"])
    content: str | list[TextPart | ImagePart] = Field(
        description="the text, or a list of text and image_url parts",
        examples=[[{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}}]],
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
        examples=[[{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}}]}]],
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="seeds the noise and the sampling (overrides certification.seed)", examples=[7]
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
            raise RequestError(f"send exactly one image (an image_url content part); this conversation has {len(images)}")
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
            choices=[ChatChoice(message=ChatChoiceMessage(content=generation.text), finish_reason=generation.finish_reason)],
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
