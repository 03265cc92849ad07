"""Ground truth shared by the real-encoder tests: the bundled photos, what they show, ImageNet statistics."""

from __future__ import annotations

import torch

#: ImageNet statistics, as documented for DINOv2 (docs/offline-models.md: "input 224 px, ImageNet mean/std").
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
#: The domestic-cat classes of ImageNet-1k (indices 281-285): what sample:chelsea shows.
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
#: What sample:coffee shows.
COFFEE_CLASSES = {"espresso", "cup", "coffee mug"}


def photo(name: str, size: int) -> torch.Tensor:
    """A bundled photo as the certified input [3, size, size] in [0, 1] (``fsmllm.images`` preprocessing)."""
    from fsmllm.images import load_image, to_pixels

    return to_pixels(load_image(f"sample:{name}"), size)
