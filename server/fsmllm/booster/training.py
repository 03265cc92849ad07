"""Training a booster (``fsmllm train-booster``): encoder, projector and language model frozen.

For a batch of images x_b and K noise draws δ_bk ~ N(0, σ² I), let u_bk = u(M(f(P(x_b + δ_bk)))) be the unit
boosted features (:mod:`fsmllm.booster.modules`) and c_b = u(f(x_b)) the *base* encoder's clean feature. The
objective is the sum of three weighted terms (method.md, "The Gaussian Smoothness Booster", (a) and (b)):

* smoothness: 1 − mean_{j≠k} <u_bj, u_bk>. The mean pairwise cosine is an unbiased estimate of ||F_B(x)||² =
  S_B(x)², the squared Gaussian robustness score of the boosted encoder, so this term raises S and with it the
  FCSB (method.md, "The bound");
* clean agreement: 1 − mean_k <u_bk, c_b>: noisy boosted features stay close to the features the projector
  of the language model was trained on (and the trivial S = 1 solution, a constant feature, is excluded);
* utility: the language model's cross-entropy of the target answer given the smoothed boosted feature
  mean_k u_bk, through the frozen projector and LM of ``model``. The target is the right answer ("A photo of
  {phrase}.") for labelled images and, with ``pseudo_labels``, the frozen model's own greedy answer from the base
  encoder's clean feature for unlabelled ones (self-distillation: the booster should not change what the model
  says about an image, labelled or not).

Images: Fashion-MNIST *train* images (labelled) and random crops of scikit-image photos that are *not* among
the evaluation photos (unlabelled), so that every evaluation image stays held out.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fsmllm.booster.boosted import BoostedEncoder
from fsmllm.booster.modules import Booster, BoosterConfig
from fsmllm.encoders import VisionEncoder, load_encoder
from fsmllm.lm.data import QUESTION, augmented_photo, fashion_train_set
from fsmllm.lm.projector import unit_feature_tokens
from fsmllm.lm.training import answer_loss, warmup_cosine
from fsmllm.lm.vlm import ProjectedVLM

#: scikit-image photos used (as random crops) to train boosters; disjoint from fsmllm.images.SAMPLE_IMAGES.
TRAINING_PHOTOS = (
    "camera", "coins", "moon", "page", "immunohistochemistry", "retina", "brick", "grass", "gravel", "text",
    "clock", "colorwheel", "horse", "logo", "cell",
)
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class BoosterTrainConfig:
    """Everything that determines a trained booster (with the seed, the run is reproducible).

    The defaults are the small CPU configuration (about 15 minutes on 2 cores for DINOv2-S at 112 px); the
    GPU configuration in docs/booster-card.md raises ``steps``, ``batch_size`` and ``fashion_images`` and sets
    ``device="cuda"``. Noise is drawn on the CPU from the seeded generator, so a run is reproducible per device.
    """

    encoder: str = "dinov2-s"
    image_size: int = 112
    sigma: float = 0.25
    model: str = "fsmllm-demo"
    fashion_images: int = 2000
    photo_crops: int = 20
    steps: int = 200
    batch_size: int = 8
    copies: int = 4
    lr: float = 1e-3
    weight_smooth: float = 0.25
    weight_clean: float = 1.0
    weight_utility: float = 0.1
    pseudo_labels: bool = False
    width: int = 32
    mapper_hidden: int = 384
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"

    #: the help of each field's ``fsmllm train-booster`` flag
    FLAG_HELP: ClassVar[dict[str, str]] = {
        "encoder": "frozen vision encoder the booster wraps",
        "image_size": "encoder input size in pixels",
        "sigma": "noise level the booster is trained for (its certificates hold at any sigma)",
        "model": "model whose frozen projector and language model give the utility term ('none': no utility term)",
        "fashion_images": "labelled Fashion-MNIST training images (needs apt-get install dataset-fashion-mnist)",
        "photo_crops": "random crops of each non-evaluation photo (unlabelled)",
        "steps": "optimiser steps",
        "batch_size": "images per step",
        "copies": "noise draws per image (at least 2: the smoothness term compares pairs)",
        "lr": "peak learning rate",
        "weight_smooth": "weight of the smoothness term (raises the Gaussian robustness score)",
        "weight_clean": "weight of the clean-agreement term (noisy boosted features near the clean base feature)",
        "weight_utility": "weight of the language model's answer loss",
        "pseudo_labels": "unlabelled crops get the frozen model's own answer as target (self-distillation)",
        "width": "channels of the purifier",
        "mapper_hidden": "hidden width of the smoothness mapper",
        "checkpoint_every": "steps between checkpoints (a restart resumes from the last)",
        "seed": "seed of the data, the noise and the initial weights",
        "device": "torch device to train on: cpu, cuda, ...",
    }

    def __post_init__(self) -> None:
        if self.copies < 2:
            raise ValueError("copies must be at least 2 (the smoothness term compares pairs of noisy features)")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")


def booster_training_set(config: BoosterTrainConfig) -> tuple[torch.Tensor, list[str | None]]:
    """Pixels [N, 3, S, S]: labelled Fashion-MNIST train images (none when ``fashion_images`` is 0), then
    unlabelled crops of :data:`TRAINING_PHOTOS` (answer None)."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(config.seed)
    pixels: list[torch.Tensor] = []
    answers: list[str | None] = []
    if config.fashion_images:
        fashion, labelled = fashion_train_set(config.image_size, config.fashion_images, rng)
        pixels.append(fashion)
        answers.extend(labelled)
    for name in TRAINING_PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        pixels.append(torch.stack([augmented_photo(photo, config.image_size, rng) for _ in range(config.photo_crops)]))
        answers.extend([None] * config.photo_crops)
    return torch.cat(pixels), answers


def booster_losses(
    boosted: VisionEncoder, clean: torch.Tensor, noisy: torch.Tensor, copies: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(smoothness loss, clean-agreement loss, smoothed tokens [B, T, W]) for K = ``copies`` noisy views.

    ``clean``: the base encoder's unit features [B, D]; ``noisy``: [K·B, 3, S, S], copy-major.
    """
    tokens = unit_feature_tokens(boosted(noisy))
    units = tokens.flatten(-2).reshape(copies, clean.shape[0], -1)
    total = units.sum(0)
    pairwise = ((total * total).sum(-1) - copies) / (copies * (copies - 1))
    smooth = 1 - pairwise.mean()
    agree = 1 - (units * clean[None]).sum(-1).mean()
    return smooth, agree, (total / copies).reshape(clean.shape[0], *tokens.shape[1:])


def _utility(model: ProjectedVLM, smoothed: torch.Tensor, answers: list[str | None]) -> torch.Tensor:
    """The LM's cross-entropy of the target answers given the smoothed features (rows with an answer only)."""
    rows = [i for i, a in enumerate(answers) if a is not None]
    if not rows:
        return smoothed.new_zeros(())
    return answer_loss(model, smoothed[rows], [answers[i] for i in rows])


def train_booster(
    config: BoosterTrainConfig, out: str | Path, progress: bool = True, stop_at: int | None = None
) -> dict[str, object]:
    """Train a booster for ``config.encoder`` at ``config.sigma``; save it (``booster.json``,
    ``booster.safetensors``, ``training.json``) into ``out``. A ``checkpoint.pt`` written there every
    ``checkpoint_every`` steps is resumed from if present (same config), and removed at the end.

    ``stop_at``: stop after that many steps, leaving only the checkpoint (for runs split over several
    sessions); returns ``{"stopped_at": step, "checkpoint": path}``. Resuming gives the same booster as one
    uninterrupted run."""
    out = Path(out)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    device = torch.device(config.device)
    encoder = load_encoder(config.encoder, image_size=config.image_size, device=device).eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    booster = Booster(
        BoosterConfig(
            config.encoder, encoder.image_size, encoder.num_tokens, encoder.token_dim, config.sigma,
            config.width, config.mapper_hidden,
        )
    )
    booster.to(device)
    boosted = BoostedEncoder(encoder, booster, out.name)
    model = _frozen_model(config, device)
    pixels, answers = booster_training_set(config)
    if model is not None and config.pseudo_labels:
        answers = pseudo_labelled(model, encoder, pixels, answers, progress)
    optimiser = torch.optim.AdamW(booster.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = warmup_cosine(optimiser, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    start = _resume(out / CHECKPOINT, config, booster, optimiser, schedule, generator, history)
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    bar = tqdm(range(start, end), desc=f"train-booster σ={config.sigma}", disable=not progress)
    for step in bar:
        index = torch.randint(len(pixels), (config.batch_size,), generator=generator)
        x = pixels[index]
        noise = torch.randn((config.copies, *x.shape), generator=generator).to(device)
        x = x.to(device)
        with torch.no_grad():
            clean = unit_feature_tokens(encoder(x)).flatten(-2)
        smooth, agree, smoothed = booster_losses(boosted, clean, (x[None] + config.sigma * noise).flatten(0, 1), config.copies)
        utility = _utility(model, smoothed, [answers[i] for i in index]) if model is not None else smooth.new_zeros(())
        loss = config.weight_smooth * smooth + config.weight_clean * agree + config.weight_utility * utility
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(booster.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        terms = {"smooth": smooth, "clean": agree, "utility": utility, "loss": loss}
        history.append({key: float(value.detach()) for key, value in terms.items()})
        bar.set_postfix({k: f"{np.mean([h[k] for h in history[-20:]]):.4f}" for k in ("smooth", "clean", "utility")})
        if ((step + 1) % config.checkpoint_every == 0 or step + 1 == end) and step + 1 < config.steps:
            _checkpoint(out / CHECKPOINT, config, step + 1, booster, optimiser, schedule, generator, history)
    if end < config.steps:
        return {"stopped_at": end, "checkpoint": str(out / CHECKPOINT)}
    booster.eval().save(out)  # saved as float32 on the CPU
    (out / CHECKPOINT).unlink(missing_ok=True)
    summary = {
        "config": asdict(config),
        "examples": len(pixels),
        "labelled_examples": sum(a is not None for a in answers),
        "parameters": sum(p.numel() for p in booster.parameters()),
        "first_20": {k: float(np.mean([h[k] for h in history[:20]])) for k in history[0]},
        "last_20": {k: float(np.mean([h[k] for h in history[-20:]])) for k in history[0]},
        "seconds": time.perf_counter() - started,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def pseudo_labelled(
    model: ProjectedVLM, encoder: VisionEncoder, pixels: torch.Tensor, answers: list[str | None], progress: bool
) -> list[str | None]:
    """``answers`` with each None replaced by the frozen model's greedy answer to the question from the base
    encoder's clean feature of that image (the utility term's self-distillation target)."""
    from fsmllm.lm.base import SamplingParams

    rows = [i for i, a in enumerate(answers) if a is None]
    labelled = list(answers)
    device = next(model.projector.parameters()).device
    for i in tqdm(rows, desc="pseudo-labels", disable=not progress):
        with torch.no_grad():
            feature = unit_feature_tokens(encoder(pixels[i : i + 1].to(device)))[0]
        labelled[i] = model.generate(feature, QUESTION, SamplingParams(max_tokens=16)).text.strip()
    return labelled


def _frozen_model(config: BoosterTrainConfig, device: torch.device) -> ProjectedVLM | None:
    """The language model of the utility term (None when its weight is 0 or ``model`` is "none")."""
    if config.weight_utility == 0 or config.model == "none":
        return None
    from fsmllm.lm.models import load_model, model_spec

    spec = model_spec(config.model)
    if (spec.encoder, spec.image_size) != (config.encoder, config.image_size):
        raise ValueError(
            f"model {config.model} reads {spec.encoder} at {spec.image_size} px, not {config.encoder} at "
            f"{config.image_size} px; pass --model none (no utility term) or the matching encoder"
        )
    model = load_model(config.model, device=device)
    for parameter in [*model.projector.parameters(), *model.backend.model.parameters()]:
        parameter.requires_grad_(False)
    return model


def _checkpoint(
    path: Path, config: BoosterTrainConfig, step: int, booster: Booster, optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR, generator: torch.Generator, history: list[dict[str, float]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "config": asdict(config), "step": step, "booster": booster.state_dict(), "optimiser": optimiser.state_dict(),
        "schedule": schedule.state_dict(), "generator": generator.get_state(), "history": history,
    }
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _resume(
    path: Path, config: BoosterTrainConfig, booster: Booster, optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR, generator: torch.Generator, history: list[dict[str, float]],
) -> int:
    """Restore a checkpoint of the same config; the step to continue from (0 without one)."""
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False, map_location="cpu")
    if state["config"] != asdict(config):
        raise ValueError(f"{path} was written by another configuration; delete it or train into another folder")
    booster.load_state_dict(state["booster"])
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    history.extend(state["history"])
    return int(state["step"])
