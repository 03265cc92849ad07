"""The deployment's policy: what a request may ask for, the defaults it gets, and the message when it asks for
too much. Pure functions: each limit is checked at its boundary (allowed) and one past it (refused)."""

from __future__ import annotations

import pytest

from fsmllm.certify import SmoothingConfig
from fsmllm.engine.runtime import Policy
from fsmllm.errors import PolicyError
from fsmllm.lm.base import SamplingParams

POLICY = Policy(
    allowed_sigmas=(0.25, 0.5),
    default_sigma=0.25,
    default_n0=20,
    default_n=100,
    default_alpha=0.001,
    max_n=1000,
    max_radii=3,
    max_tokens=64,
)


def test_unset_parameters_take_the_deployments_defaults() -> None:
    assert POLICY.config(None, None, None, None, "betting") == SmoothingConfig(
        sigma=0.25, n0=20, n=100, alpha=0.001, bound="betting", granularity="global"
    )
    assert POLICY.config(0.5, 30, 200, 0.01, "hoeffding", "token") == SmoothingConfig(
        sigma=0.5, n0=30, n=200, alpha=0.01, bound="hoeffding", granularity="token"
    )


def test_only_the_offered_sigmas_up_to_rounding() -> None:
    assert POLICY.config(0.5 + 1e-12, None, None, None, "betting").sigma == pytest.approx(0.5)
    with pytest.raises(PolicyError, match=r"sigma 0.3 is not offered by this deployment; choose one of \[0.25, 0.5\]"):
        POLICY.config(0.3, None, None, None, "betting")


def test_the_sample_budget_counts_selection_and_estimation_samples() -> None:
    assert POLICY.config(None, 400, 600, None, "betting").n == 600  # n0 + n = max_n: allowed
    with pytest.raises(PolicyError, match="n0 \\+ n = 1001 samples exceeds this deployment's maximum of 1000"):
        POLICY.config(None, 401, 600, None, "betting")
    with pytest.raises(PolicyError, match="n0 \\+ n = 1001"):
        POLICY.config(None, None, 981, None, "betting")  # the default n0 counts too
    with pytest.raises(PolicyError, match="n0 \\+ n = 1001"):
        POLICY.config(None, 901, None, None, "betting")  # and the default n


def test_radii_up_to_the_limit() -> None:
    assert POLICY.radii([0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]
    with pytest.raises(PolicyError, match="4 radii requested; at most 3 per request"):
        POLICY.radii([0.1, 0.2, 0.3, 0.4])


def test_sampling_up_to_the_token_limit() -> None:
    assert POLICY.sampling(64, 0.7, 0.9, 5, ["\n", "."]) == SamplingParams(64, 0.7, 0.9, 5, ("\n", "."))
    with pytest.raises(PolicyError, match="^max_tokens 65 exceeds this deployment's limit of 64$"):
        POLICY.sampling(65, 0.0, 1.0, None, [])
