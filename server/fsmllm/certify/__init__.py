"""The certification core: pure functions on tensors, no server imports (method.md).

* :mod:`~fsmllm.certify.bounds` — FCSB, its inverse, confidence bounds;
* :mod:`~fsmllm.certify.config` — what one certification asks for (σ, n0, n, α, bound, granularity, stop rule);
* :mod:`~fsmllm.certify.smoothing` — the Monte Carlo estimator (:class:`SmoothingRun`) and :class:`SmoothedEncoder`;
* :mod:`~fsmllm.certify.certificate` — the certificate it gives (certified and served FCSB per radius);
* :mod:`~fsmllm.certify.sampling` — the seeded noise and the executors that batch many runs' samples;
* :mod:`~fsmllm.certify.classify` — prediction-wise certification of a cosine classifier;
* :mod:`~fsmllm.certify.answers` — certified answers (CERTIFY on the whole model's answer).
"""

from fsmllm.certify.bounds import (
    ANYTIME_METHODS,
    BOUND_METHODS,
    BoundMethod,
    betting_lower_bound,
    certified_radius,
    fcsb,
    lower_bound,
    mean_lower_bound,
    mean_upper_bound,
    prediction_radius,
    upper_bound,
)
from fsmllm.certify.certificate import Certificate, InterimCertificate, TokenBounds, per_token_features
from fsmllm.certify.classify import CosineClassifier, PredictionCertificate
from fsmllm.certify.config import (
    DEFAULT_RADII,
    GRANULARITIES,
    NOISE_BLOCK,
    Encode,
    Granularity,
    SmoothingConfig,
    StopReason,
    StopRule,
    check_radii,
    new_seed,
)
from fsmllm.certify.sampling import Batcher, SampleRun, deliver, run_batched, run_shared
from fsmllm.certify.smoothing import SmoothedEncoder, SmoothingRun

__all__ = [
    "ANYTIME_METHODS",
    "BOUND_METHODS",
    "Batcher",
    "DEFAULT_RADII",
    "GRANULARITIES",
    "NOISE_BLOCK",
    "BoundMethod",
    "Certificate",
    "Encode",
    "Granularity",
    "CosineClassifier",
    "InterimCertificate",
    "PredictionCertificate",
    "SampleRun",
    "SmoothedEncoder",
    "SmoothingConfig",
    "SmoothingRun",
    "StopReason",
    "StopRule",
    "TokenBounds",
    "betting_lower_bound",
    "certified_radius",
    "check_radii",
    "deliver",
    "fcsb",
    "lower_bound",
    "mean_lower_bound",
    "mean_upper_bound",
    "new_seed",
    "per_token_features",
    "prediction_radius",
    "run_batched",
    "run_shared",
    "upper_bound",
]
