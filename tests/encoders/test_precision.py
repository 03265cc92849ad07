"""The encoder's precision and compilation on the certified path (``--dtype``, ``--compile``; docs/method.md,
"Reduced precision"): what is cast, where the noise is drawn, and what stays reproducible."""

from __future__ import annotations

import pytest
import torch

from fsmllm.booster import load_booster
from fsmllm.certify import SmoothedEncoder, SmoothingConfig, SmoothingRun
from fsmllm.encoders import load_encoder
from fsmllm.encoders._common import PixelNormalize
from fsmllm.encoders.precision import PRECISIONS, compiled, set_precision, torch_dtype
from fsmllm.images import load_image, to_pixels

#: how far a bfloat16 / float16 certificate's score bound may move with batch packing (docs/method.md)
PACKING_TOLERANCE = {"float32": 1e-6, "bfloat16": 1e-4, "float16": 1e-4}


def cat(size: int) -> torch.Tensor:
    return to_pixels(load_image("sample:chelsea"), size)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_weights_and_tokens_take_the_dtype_while_normalisation_stays_float32(precision: str) -> None:
    encoder = set_precision(load_encoder("tiny-vit"), precision)
    dtype = torch_dtype(precision)
    assert {p.dtype for p in encoder.parameters()} == {dtype}
    normalize = encoder.normalize
    assert isinstance(normalize, PixelNormalize)
    assert normalize.mean.dtype == normalize.std.dtype == torch.float32  # the statistics are not rounded
    pixels = cat(encoder.image_size)[None]
    assert normalize(pixels).dtype == dtype
    tokens = encoder(pixels)
    assert tokens.dtype == dtype and tokens.shape == (1, encoder.num_tokens, encoder.token_dim)
    reference = load_encoder("tiny-vit")(pixels)
    tolerance = {"float32": 0.0, "bfloat16": 0.05, "float16": 0.01}[precision]
    torch.testing.assert_close(tokens.float(), reference, atol=tolerance, rtol=tolerance)


def test_an_unknown_dtype_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        set_precision(load_encoder("tiny-cnn"), "float8")


def test_the_noise_is_float32_whatever_the_encoder_dtype() -> None:
    """The encoder in bfloat16 receives exactly the float32 x + δ the float32 encoder receives (same seed)."""
    seen: dict[str, list[torch.Tensor]] = {}
    for precision in ("float32", "bfloat16"):
        encoder = set_precision(load_encoder("tiny-cnn"), precision)
        inputs = seen.setdefault(precision, [])
        record = lambda x, e=encoder, inputs=inputs: (inputs.append(x.clone()), e(x))[1]  # noqa: E731
        SmoothedEncoder(record, batch_size=16).certify(cat(32), SmoothingConfig(0.25, n0=16, n=32), [0.1], seed=3)
    assert all(x.dtype == torch.float32 for x in seen["bfloat16"])
    torch.testing.assert_close(torch.cat(seen["bfloat16"]), torch.cat(seen["float32"]), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_pixels_are_refused_since_the_noise_would_be_16_bit(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="16-bit noise is not the stated Gaussian"):
        SmoothingRun(cat(32).to(dtype), SmoothingConfig(sigma=0.25), seed=0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batch_packing_moves_a_certificate_at_most_the_stated_tolerance(precision: str) -> None:
    """Same seed, batches of 64, 7 and 1: float32 agrees to rounding (the contract), 16-bit within the tolerance
    docs/method.md states."""
    encoder = set_precision(load_encoder("tiny-vit"), precision)
    certificates = [
        SmoothedEncoder(encoder, batch_size=size).certify(cat(32), SmoothingConfig(0.25, 32, 160), [0.05, 0.1], seed=5)
        for size in (64, 7, 1)
    ]
    first = certificates[0]
    assert first.score_lower > 0
    for other in certificates[1:]:
        assert other.n == first.n
        assert other.score_lower == pytest.approx(first.score_lower, abs=PACKING_TOLERANCE[precision])
        assert other.certified_fcsb == pytest.approx(first.certified_fcsb, abs=PACKING_TOLERANCE[precision])


def test_a_booster_in_front_of_a_bfloat16_encoder_reads_float32_tokens() -> None:
    encoder = set_precision(load_encoder("dinov2-s", image_size=112), "bfloat16")
    boosted = load_booster("gsb-dinov2-s-0.25", encoder)
    features = boosted(cat(112)[None])
    assert features.dtype == torch.float32 and torch.isfinite(features).all()


def test_a_compiled_encoder_stands_in_for_the_encoder() -> None:
    """The dynamo path with every batch size the smoothing code produces (the eager backend: no code generation
    here; `fsmllm certify --compile` runs the real inductor in tests/cli/test_cli.py)."""
    encoder = load_encoder("tiny-vit")
    fast = compiled(encoder, backend="eager")
    assert (fast.name, fast.image_size, fast.num_tokens, fast.token_dim) == ("tiny-vit", 32, 17, 16)
    plain = SmoothedEncoder(encoder, batch_size=24).certify(cat(32), SmoothingConfig(0.25, n0=20, n=70), [0.1], seed=1)
    again = SmoothedEncoder(fast, batch_size=24).certify(cat(32), SmoothingConfig(0.25, n0=20, n=70), [0.1], seed=1)
    assert again.score_lower == pytest.approx(plain.score_lower, abs=1e-6)
    torch.testing.assert_close(again.smoothed_feature, plain.smoothed_feature, atol=1e-6, rtol=0)
