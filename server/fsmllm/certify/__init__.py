"""The certification core: pure functions on tensors, no server imports (method.md).

* :mod:`~fsmllm.certify.bounds` — FCSB, its inverse, confidence bounds;
* :mod:`~fsmllm.certify.smoothing` — the Monte Carlo smoothed encoder and its sound certificate;
* :mod:`~fsmllm.certify.classify` — prediction-wise certification of a cosine classifier.
"""

from fsmllm.certify.bounds import (
    BOUND_METHODS,
    BoundMethod,
    certified_radius,
    combined_cosine_bound,
    fcsb,
    mean_lower_bound,
    mean_upper_bound,
    prediction_radius,
)
from fsmllm.certify.classify import CosineClassifier, PredictionCertificate
from fsmllm.certify.smoothing import (
    NOISE_BLOCK,
    Certificate,
    SmoothedEncoder,
    SmoothingConfig,
    SmoothingRun,
    deliver,
    fill_batch,
    new_seed,
    run_batched,
)

__all__ = [
    "BOUND_METHODS",
    "NOISE_BLOCK",
    "BoundMethod",
    "Certificate",
    "CosineClassifier",
    "PredictionCertificate",
    "SmoothedEncoder",
    "SmoothingConfig",
    "SmoothingRun",
    "certified_radius",
    "combined_cosine_bound",
    "deliver",
    "fill_batch",
    "fcsb",
    "mean_lower_bound",
    "mean_upper_bound",
    "new_seed",
    "prediction_radius",
    "run_batched",
]
