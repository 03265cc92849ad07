"""POST /generate: the answer's request fields (shared with the chat completion), the certified answer, and
the response."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field, field_validator

from fsmllm.api.schemas.certificate import CertificateOut, CertificationParams, Issued, Timings
from fsmllm.api.schemas.common import EXAMPLE_IMAGE, RequestModel
from fsmllm.certify.answers import (
    AnswerBound,
    AnswerCertificate,
    AnswerConfig,
    AnswerStop,
    VotePhase,
    VoteProgress,
)
from fsmllm.engine.runtime import Policy
from fsmllm.engine.serving import Answered, AnswerTask, CertifyTask, Provenance
from fsmllm.errors import PolicyError
from fsmllm.lm.base import SamplingParams


class GenerationParams(RequestModel):
    """How to generate the answer."""

    max_tokens: int = Field(
        64, ge=1, description="largest number of new tokens (at most the deployment's max_tokens_limit)", examples=[64]
    )
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature; 0 = greedy decoding", examples=[0.0])
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="nucleus sampling: keep the smallest set of tokens whose probabilities add up to this",
        examples=[1.0],
    )
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

    n0: int = Field(
        32, ge=1, description="selection votes: the most frequent answer among them is certified", examples=[32]
    )
    n: int = Field(
        256, ge=2, description="estimation votes (a budget when radius is set): each is one generation", examples=[256]
    )
    alpha: float = Field(
        0.001, gt=0, lt=1, description="failure probability of the answer certificate", examples=[0.001]
    )
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
        ...,
        min_length=1,
        description="the question about the image (at most max_prompt_chars)",
        examples=["What is this?"],
    )

    def to_answer(self, policy: Policy, max_prompt_chars: int) -> AnswerTask:
        """The certified answer this asks for, checked against ``policy`` and the prompt limit."""
        if len(self.prompt) > max_prompt_chars:
            raise PolicyError(f"the prompt has {len(self.prompt)} characters; the limit is {max_prompt_chars}")
        return self.to_answer_task(policy, self.prompt, self.to_task(policy))


class GenerateRequest(GenerateParams):
    """POST /generate as JSON. Multipart uploads send the same fields as form fields plus an ``image`` file."""

    image: str = Field(
        ..., min_length=1, description="base64 image or data:image/...;base64, URL", examples=[EXAMPLE_IMAGE]
    )


class AnswerVote(BaseModel):
    answer: str = Field(description="the answer as first generated")
    normalised: str = Field(description="the form in which votes are compared")
    count: int = Field(description="estimation votes for it")


class AnswerCertificateOut(Issued):
    """The certified answer (method.md, "Certified answers"); it may differ from the streamed ``answer``, which
    the model generates once from the smoothed features. Issued (bound, signed, stored) on its own, naming the
    feature certificate of the same response and the encoder its votes read."""

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
    stopped_by: AnswerStop
    alpha: float
    sigma: float
    inner: int
    bound: AnswerBound
    target_radius: float | None
    seed: int
    # what the votes read (issued answer certificates; the language model is named by the weights)
    feature_certificate_id: str | None = Field(None, description="the feature certificate issued with it")
    encoder: str | None = None
    booster: str | None = None
    input_size: int | None = Field(None, description="the side of the pixels the encoder read")
    encoder_dtype: str | None = None
    lm_dtype: str | None = Field(
        None, description="the precision the language model computed the votes in (the certificate is for it so)"
    )

    @classmethod
    def from_certificate(
        cls, certificate: AnswerCertificate, provenance: Provenance | None = None, lm_dtype: str | None = None
    ) -> AnswerCertificateOut:
        """The JSON of a certified answer, the same from the server and from ``fsmllm generate --json``; with the
        ``provenance`` of the votes (the encoder and the language model's precision) when it is to be issued;
        ``fsmllm generate``, which issues nothing, names the language model's precision alone (``lm_dtype``)."""
        served_by = (
            ({} if lm_dtype is None else {"lm_dtype": lm_dtype})
            if provenance is None
            else {
                "encoder": provenance.encoder,
                "booster": provenance.booster,
                "input_size": provenance.input_size,
                "encoder_dtype": provenance.encoder_dtype,
                "lm_dtype": provenance.lm_dtype,
            }
        )
        cfg = certificate.config
        return cls(
            answer=certificate.answer,
            normalised=certificate.normalised,
            p_lower=certificate.p_lower,
            radius=certificate.radius,
            abstain=certificate.abstain,
            votes=[AnswerVote(answer=text, normalised=key, count=count) for text, key, count in certificate.votes],
            agree=certificate.agree,
            n0=cfg.n0,
            n=certificate.n,
            n_budget=cfg.n,
            stopped_by=certificate.stopped_by,
            alpha=cfg.alpha,
            sigma=cfg.sigma,
            inner=cfg.inner,
            bound=cfg.bound,
            target_radius=cfg.radius,
            seed=certificate.seed,
            **served_by,
        )


class VotesEvent(BaseModel):
    """A ``votes`` event of a streamed certified answer: the votes so far, after each chunk of votes. The chosen
    answer's fields come once the selection votes are in, ``p_lower`` and ``radius`` only with a target radius
    (at a fixed n no interim bound is valid), ``stopped_by`` once the voting has ended."""

    done: int = Field(description="votes counted (selection and estimation)")
    total: int = Field(description="n0 + n: the votes allowed")
    phase: VotePhase
    answer: str | None = Field(None, description="the answer chosen by the selection votes (as first generated)")
    agree: int | None = Field(None, description="estimation votes for it so far")
    estimated: int | None = Field(None, description="estimation votes counted")
    p_lower: float | None = Field(None, description="the lower confidence bound valid so far (anytime-valid)")
    radius: float | None = Field(None, description="the radius it certifies; null: abstain")
    stopped_by: AnswerStop | None = None

    @classmethod
    def render(cls, progress: VoteProgress) -> dict[str, Any]:
        """The event's JSON: only the fields that apply in the voting's state."""
        fields: dict[str, Any] = {"done": progress.done, "total": progress.total, "phase": progress.phase}
        if progress.answer is not None:
            fields |= {"answer": progress.answer, "agree": progress.agree, "estimated": progress.estimated}
        if progress.p_lower is not None:
            fields |= {"p_lower": progress.p_lower, "radius": progress.radius}
        if progress.stopped_by is not None:
            fields["stopped_by"] = progress.stopped_by
        return cls(**fields).model_dump(exclude_unset=True)


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
