"""The certification: its request fields (every endpoint has them) and the served certificate, the one JSON
shape of a :class:`~fsmllm.certify.Certificate`, with its timings; the interim certificate of a progress event;
the certified prediction of ``fsmllm certify --classify``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fsmllm.api.schemas.common import ABSTAIN, NORM_NOTE, STATEMENT, RequestModel
from fsmllm.certify import (
    DEFAULT_RADII,
    BoundMethod,
    Certificate,
    Granularity,
    InterimCertificate,
    PredictionCertificate,
    StopReason,
    StopRule,
)
from fsmllm.engine.runtime import Policy
from fsmllm.engine.serving import Answered, Certified, CertifyTask
from fsmllm.errors import as_request_error


def _given(*names: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON Schema: an object where each of ``names`` is present and matches ``schema`` (default: a number)."""
    return {"properties": {name: schema or {"type": "number"} for name in names}, "required": list(names)}


def certification_rules(schema: dict[str, Any]) -> None:
    """The rules between certification fields that the server checks, written into the model's JSON Schema, so
    that a request valid by the schema is one the server takes (schemathesis checks this): radii non-negative
    and at least one; per_token only with granularity 'token'; stopping early (stop_at_fcsb, radius_tolerance)
    only with bound 'betting'; radius_tolerance only with target_cos, and not with stop_at_fcsb. The limits of
    one deployment (its sigmas, n0 + n) are not here: GET /v1/models gives them."""
    properties = schema.get("properties", {})
    for choice in properties.get("radius", {}).get("anyOf", ()):
        if choice.get("type") == "number":
            choice["minimum"] = 0
        elif choice.get("type") == "array":
            choice["minItems"] = 1
            choice["items"] = {**choice["items"], "minimum": 0}
    betting = {"properties": {"bound": {"const": "betting"}}}
    rules: list[dict[str, Any]] = []
    if "per_token" in properties:
        token = {"properties": {"granularity": {"const": "token"}}, "required": ["granularity"]}
        rules.append({"if": _given("per_token", schema={"const": True}), "then": token})
    for stop in ("stop_at_fcsb", "radius_tolerance"):
        if stop in properties:
            rules.append({"if": _given(stop), "then": betting})
    if "radius_tolerance" in properties:
        rules.append({"if": _given("radius_tolerance"), "then": _given("target_cos")})
        rules.append({"not": _given("stop_at_fcsb", "radius_tolerance")})
    if rules:
        schema["allOf"] = rules


class CertificationParams(RequestModel):
    """How to certify. Unset fields take the deployment's defaults (see GET /v1/models)."""

    model_config = ConfigDict(json_schema_extra=certification_rules)

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
        None,
        ge=1,
        description="selection samples (fix the smoothed direction); default: the deployment's",
        examples=[100],
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
    bound: BoundMethod = Field(
        "betting",
        description="confidence bound on the score: 'betting' (Waudby-Smith & Ramdas 2023; follows the variance, "
        "anytime-valid, so sampling may stop early) or the fixed-n 'empirical-bernstein' / 'hoeffding'",
        examples=["betting"],
    )
    granularity: Granularity = Field(
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
        None, ge=0, le=2**63 - 1, description="noise seed; a random one is chosen and returned if unset", examples=[7]
    )
    stream: bool = Field(
        False, description="answer with a server-sent event stream: progress events, then the result", examples=[False]
    )
    record_samples: bool = Field(
        False,
        description="put the per-sample values the bound is computed from into the certificate (samples: the c_i as "
        "little-endian float32, base64, 4 bytes each per token: they are computed in float32, so this is exact), so "
        "that a verifier recomputes every number: fsmllm verify",
        examples=[False],
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


class CertifiedAt(BaseModel):
    radius: float
    certified_fcsb: float | None = Field(
        description="with probability >= 1 - alpha, cos(F(x), F(x')) >= this for all ||x' - x|| <= radius, F the "
        "smoothed encoder (the direct bound FCSB(score_lower, sigma, radius)); null = nothing certified here"
    )


class InterimCertificateOut(BaseModel):
    """A progress event's ``certificate``: the certificate valid so far under an anytime-valid bound."""

    n: int = Field(description="estimation samples it is computed from (the last checkpoint passed)")
    score_lower: float = Field(description="the best lower confidence bound on the score over the checkpoints")
    radii: list[CertifiedAt]

    @classmethod
    def of(cls, interim: InterimCertificate) -> InterimCertificateOut:
        return cls(
            n=interim.n,
            score_lower=interim.score_lower,
            radii=[
                CertifiedAt(radius=radius, certified_fcsb=certified)
                for radius, certified in zip(interim.radii, interim.certified_fcsb)
            ],
        )


class RadiusBound(CertifiedAt):
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


class StopOut(BaseModel):
    fcsb: float | None = Field(None, description="stop_at_fcsb: stop once the certified FCSB reaches this")
    radii: list[float] = Field(default_factory=list, description="at these radii")
    target_cos: float | None = Field(None, description="radius_tolerance: the target cosine")
    tolerance: float | None = Field(None, description="radius_tolerance: the l2 tolerance")


class ImageBinding(BaseModel):
    sha256: str = Field(description="SHA-256 of the image's bytes as received")
    pixels_sha256: str = Field(description="SHA-256 of the pixels the encoder read (layout in 'pixels')")
    pixels: str = Field(description="the layout of the hashed pixels")


class WeightFile(BaseModel):
    name: str
    sha256: str


class SamplesRecord(BaseModel):
    encoding: Literal["float32-le-base64", "float64-le-base64"] = Field(
        "float64-le-base64",
        description="float32 when every value is one (the c_i are computed in float32: exact, 4 bytes a value), "
        "else float64",
    )
    shape: list[int] = Field(description="[n, T]: n estimation samples, T tokens (1 for global); [n] for votes")
    sha256: str = Field(description="SHA-256 of the decoded bytes")
    data: str = Field(description="base64 of the little-endian values in that encoding, row-major")


class Issued(BaseModel):
    """The binding and the signature every issued certificate carries, feature or answer (docs/certificates.md)."""

    id: str | None = Field(None, description="the certificate's id: GET /v1/certificates/{id}")
    issued_at: str | None = Field(None, description="when it was issued (ISO 8601, UTC)")
    model: str | None = Field(None, description="the served model")
    completion_id: str | None = Field(None, description="the chat completion it was issued with, if any")
    image: ImageBinding | None = None
    weights: dict[str, list[WeightFile]] | None = Field(
        None, description="every weight file in play by component (encoder, booster, projector, language_model)"
    )
    software: dict[str, str] | None = Field(None, description="versions of fsmllm, torch, transformers, python")
    device: str | None = Field(None, description="the device the encoder ran on")
    samples: SamplesRecord | None = Field(
        None, description="with record_samples: the values the bound is from (the c_i, or an answer's ±1 votes)"
    )
    signature: str | None = Field(
        None,
        description="JWS (RFC 7515, compact, detached payload), Ed25519, over the RFC 8785 canonical JSON of this "
        "object without 'signature'; keys: GET /v1/certificates/keys",
    )


class CertificateOut(Issued):
    """A complete certificate: every number can be reproduced from the fields of this object and the image."""

    encoder: str
    booster: str
    input_size: int
    encoder_dtype: str = Field(
        "float32",
        description="the precision the encoder computed in: the certificate is for the encoder as computed in it",
    )
    norm: str = NORM_NOTE
    statement: str = Field(STATEMENT, description="what the certificate states, and about which vectors")
    granularity: Granularity = Field(
        "global", description="'token': F, F_hat and the bounds are per token, and the numbers below the worst token's"
    )
    worst_token: int | None = Field(None, description="granularity 'token': the token with the lowest certified score")
    tokens: list[TokenBound] | None = Field(
        None, description="granularity 'token' with per_token: every token's values"
    )
    sigma: float
    n0: int
    n: int = Field(description="estimation samples used (fewer than n_budget when sampling stopped early)")
    n_budget: int = Field(description="estimation samples allowed (the request's n)")
    stopped_by: StopReason = Field(description="why sampling ended: the budget was spent, or an early-stopping rule")
    alpha: float = Field(description="failure probability of all the certificate's statements together")
    bound: BoundMethod = Field(description="the confidence bound on the score (the request's bound)")
    seed: int
    score_estimate: float = Field(description="estimate of the Gaussian robustness score S = ||F(x)||")
    score_lower: float = Field(
        description="(1 - alpha) lower confidence bound on <F(x), u> <= S, u fixed by the n0 samples"
    )
    served_angle: float = Field(
        description="angle (radians) between u and the features handed to the language model "
        "(their mean over all samples)"
    )
    abstain: bool = Field(description=ABSTAIN)
    radii: list[RadiusBound]
    certified_radius: CertifiedRadius | None = Field(
        None, description="with target_cos: the largest radius certified at that cosine; null without target_cos"
    )
    cached: bool = Field(False, description="served from the certificate cache (same image, parameters and seed)")
    stop: StopOut | None = Field(None, description="the early-stopping rule sampling ran under; null: none")

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
        tokens = None
        if per_token and cert.tokens is not None:
            tokens = [
                TokenBound(token=t, score_estimate=e, score_lower=p, served_angle=a, certified_fcsb=c)
                for t, (e, p, a, c) in enumerate(
                    zip(
                        cert.tokens.score_estimate,
                        cert.tokens.score_lower,
                        cert.tokens.served_angle,
                        cert.token_certified_fcsb(),
                    )
                )
            ]
        return cls(
            granularity=cfg.granularity,
            worst_token=cert.worst_token,
            tokens=tokens,
            encoder=encoder,
            booster=booster,
            input_size=input_size,
            encoder_dtype=encoder_dtype,
            sigma=cfg.sigma,
            n0=cfg.n0,
            n=cert.n,
            n_budget=cfg.n,
            stopped_by=cert.stopped_by,
            alpha=cfg.alpha,
            bound=cfg.bound,
            seed=cert.seed,
            score_estimate=cert.score_estimate,
            score_lower=cert.score_lower,
            served_angle=cert.served_angle,
            abstain=cert.abstain,
            radii=[
                RadiusBound(radius=r, certified_fcsb=c, served_fcsb=v, estimated_fcsb=e)
                for r, c, v, e in zip(cert.radii, cert.certified_fcsb, cert.served_fcsb, cert.estimated_fcsb)
            ],
            certified_radius=None
            if target_cos is None
            else CertifiedRadius(target_cos=target_cos, radius=cert.certified_radius(target_cos)),
            cached=cached,
            stop=None if cert.stop is None else StopOut(**asdict(cert.stop)),
        )

    @classmethod
    def of(cls, certified: Certified, target_cos: float | None = None, per_token: bool = False) -> CertificateOut:
        """The served certificate of ``certified``, with its provenance."""
        served_by = certified.provenance
        return cls.from_certificate(
            certified.certificate,
            served_by.encoder,
            served_by.booster,
            served_by.input_size,
            target_cos,
            per_token,
            certified.cached,
            served_by.encoder_dtype,
        )


class PredictionOut(BaseModel):
    """The cosine classifier's certified prediction (``fsmllm certify --classify --json``; the server does not
    serve one): unless ``radius`` is null, the smoothed classifier answers ``label`` within that l2 radius."""

    label_index: int
    label: str
    top_lower: float = Field(description="lower confidence bound on <F(x), w_label>, w the label's unit embedding")
    runner_up_index: int
    runner_up_upper: float = Field(description="upper confidence bound on the runner-up's <F(x), w>")
    radius: float | None = Field(description="the certified l2 radius; null: abstain")
    alpha: float = Field(description="failure probability of the prediction's statement (half the certificate's)")

    @classmethod
    def of(cls, prediction: PredictionCertificate) -> PredictionOut:
        return cls(**asdict(prediction))
