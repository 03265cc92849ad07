"""fsmllm-demo-clean, the frozen reference model: the demo's parts with a projector trained on clean features
only (``train-projector --smoothed-share 0``), as a real LLaVA's is. It reads clean features as well as the
demo does; what it makes of smoothed ones is what a booster is judged by (docs/booster-card.md)."""

from __future__ import annotations

import json

import pytest

from fsmllm.lm.data import FASHION_MNIST_DIR
from fsmllm.lm.models import MODELS, load_model, shipped_model_dir
from fsmllm.lm.training import evaluate_projector

pytestmark = pytest.mark.slow


def test_the_reference_model_was_trained_on_clean_features_only() -> None:
    training = json.loads((shipped_model_dir("fsmllm-demo-clean") / "training.json").read_text())
    demo = json.loads((shipped_model_dir("fsmllm-demo") / "training.json").read_text())
    assert training["config"]["smoothed_share"] == 0.0
    # otherwise the demo's recipe: the same data, steps and seed
    same = {key: value for key, value in training["config"].items() if key != "smoothed_share"}
    assert same == {key: demo["config"][key] for key in same}
    assert (MODELS["fsmllm-demo-clean"].encoder, MODELS["fsmllm-demo-clean"].image_size) == ("dinov2-s", 112)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_the_reference_model_names_held_out_images_from_their_clean_features() -> None:
    result = evaluate_projector(load_model("fsmllm-demo-clean"), images=10, sigma=0.25, copies=1)
    assert result["accuracy_clean"] >= 0.4, result["accuracy_clean"]  # measured: 200 images (model card); chance 10 %
    photos = result["photos"]
    assert all(photo["clean"] for photo in photos.values())
    assert "cat" in photos["chelsea"]["clean"].lower() and "coffee" in photos["coffee"]["clean"].lower()
