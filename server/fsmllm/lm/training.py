"""Training the demo model's projector (``fsmllm train-projector``): encoder and language model frozen.

The language model must answer from *smoothed* features, so the projector is trained on both kinds of input it
will see (method.md, "Objects"): the clean feature u(x) = normalise(flat(f(x))) and a smoothed feature, the mean
of u(x + δ_j) over ``copies`` Gaussian draws δ_j ~ N(0, σ² I), both in the encoder's token layout [T, W]. The
frozen encoder's features are computed once and cached, so the training loop only runs the projector and the
language model: next-token cross-entropy on the answer "A photo of {phrase}." (and the end-of-turn token),
given the chat prompt with the projected visual tokens spliced in (:func:`fsmllm.lm.prompt.build_prompt_embeds`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, cast

import numpy as np
import torch
from tqdm import tqdm

from fsmllm.certify import per_token_features
from fsmllm.encoders import VisionEncoder, load_encoder
from fsmllm.encoders._common import cache_dir
from fsmllm.lm.base import SamplingParams
from fsmllm.lm.data import (
    FASHION_MNIST_PHRASES,
    QUESTION,
    SAMPLE_PHOTO_PHRASES,
    SYSTEM,
    grey_to_pixels,
    load_fashion_mnist,
    training_set,
)
from fsmllm.lm.llm_loader import ensure_converted
from fsmllm.lm.projector import Projector, ProjectorConfig, unit_feature_tokens
from fsmllm.lm.prompt import chat_prompt
from fsmllm.lm.transformers_backend import TransformersBackend
from fsmllm.lm.vlm import ProjectedVLM


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained projector (with the seed, the run is reproducible)."""

    encoder: str = "dinov2-s"
    image_size: int = 112
    train_images: int = 2000
    photo_copies: int = 40
    sigma: float = 0.25
    copies: int = 4
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    smoothed_share: float = 0.5

    #: the help of each field's ``fsmllm train-projector`` flag
    FLAG_HELP: ClassVar[dict[str, str]] = {
        "encoder": "frozen vision encoder whose features the projector reads",
        "image_size": "encoder input size in pixels",
        "train_images": "Fashion-MNIST training images (needs apt-get install dataset-fashion-mnist)",
        "photo_copies": "copies of each bundled training photo (crops) added to the images",
        "sigma": "noise level of the smoothed features the projector also learns from",
        "copies": "noise draws averaged into each smoothed feature",
        "steps": "optimiser steps",
        "batch_size": "images per step",
        "lr": "peak learning rate (warm-up, then cosine decay)",
        "seed": "seed of the data order, the noise and the initial weights",
        "smoothed_share": "share of the examples read as smoothed features, the rest clean (0: clean only, as a "
        "LLaVA projector is trained: fsmllm-demo-clean, the frozen model a plug-in booster serves)",
    }

    def __post_init__(self) -> None:
        if not 0 <= self.smoothed_share <= 1:
            raise ValueError(f"smoothed_share must be in [0, 1], got {self.smoothed_share}")


@torch.inference_mode()
def encode_features(
    encoder: VisionEncoder,
    pixels: torch.Tensor,
    sigma: float,
    copies: int,
    seed: int,
    batch_size: int = 32,
    granularity: str = "global",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean unit features u(x) and smoothed ones mean_j u(x + σ δ_j), both [N, T, W] (float32, CPU); with
    ``granularity="token"`` the smoothed ones are the per-token smoothed features the server serves then
    (:func:`~fsmllm.certify.per_token_features`), from the same noise. ``copies`` 0: clean ones only (the
    smoothed ones are then an empty tensor)."""
    generator = torch.Generator().manual_seed(seed)
    clean, smoothed = [], []
    for start in tqdm(range(0, len(pixels), batch_size), desc="encoding", unit="batch", leave=False):
        x = pixels[start : start + batch_size]
        clean.append(unit_feature_tokens(encoder(x)))
        if copies == 0:
            continue
        noise = torch.randn((copies, *x.shape), generator=generator)
        noisy = (x[None] + sigma * noise).flatten(0, 1)
        raw = encoder(noisy)
        units = unit_feature_tokens(raw).reshape(copies, len(x), *clean[-1].shape[1:])
        if granularity == "token":
            rows = torch.nn.functional.normalize(raw.float(), dim=-1).reshape(units.shape)
            smoothed.append(per_token_features(units.mean(0), rows.mean(0)))
        else:
            smoothed.append(units.mean(0))
    return torch.cat(clean), torch.cat(smoothed) if smoothed else torch.empty(0)


def cached_features(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The training set's clean and smoothed features and answers, computed once per data configuration (no
    smoothed ones when none are read: ``smoothed_share`` 0)."""
    key = {k: v for k, v in asdict(config).items() if k not in ("steps", "batch_size", "lr", "smoothed_share")}
    if config.smoothed_share == 0:
        key |= {"copies": 0, "sigma": 0.0}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"projector-features-{digest}.pt"
    if path.is_file():
        saved = torch.load(path)
        return saved["clean"], saved["smoothed"], saved["answers"]
    pixels, answers = training_set(config.image_size, config.train_images, config.photo_copies, config.seed)
    encoder = load_encoder(config.encoder, image_size=config.image_size).eval()
    copies = config.copies if config.smoothed_share > 0 else 0
    clean, smoothed = encode_features(encoder, pixels, config.sigma, copies, config.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"clean": clean, "smoothed": smoothed, "answers": answers}, path)
    return clean, smoothed, answers


def warmup_cosine_factor(step: int, steps: int) -> float:
    """The learning-rate factor at ``step`` of ``steps``: linear warm-up over the first tenth, then cosine decay."""
    warmup = max(1, steps // 10)
    return float(min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps)))


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first tenth of ``steps``, then cosine decay to zero."""
    return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: warmup_cosine_factor(step, steps))


def answer_batch(
    backend: TransformersBackend,
    layout_ids: tuple[Sequence[int], Sequence[int]],
    image_embeds: torch.Tensor,
    answers: Sequence[list[int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs_embeds [B, L, H], attention mask [B, L], labels [B, L] (-100 except answer tokens)."""
    prefix, suffix = layout_ids
    sequences, labels = [], []
    for embeds, answer in zip(image_embeds, answers):
        ids_after = torch.tensor([*suffix, *answer])
        prefix_embeds = backend.embed_tokens(torch.tensor(prefix))
        sequences.append(torch.cat([prefix_embeds, embeds, backend.embed_tokens(ids_after)]))
        label = torch.full((sequences[-1].shape[0],), -100)
        label[-len(answer) :] = torch.tensor(answer)
        labels.append(label)
    length = max(s.shape[0] for s in sequences)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    padded_labels = torch.full((len(sequences), length), -100)
    for i, (sequence, label) in enumerate(zip(sequences, labels)):
        mask[i, : len(sequence)] = 1
        padded_labels[i, : len(label)] = label
    return padded, mask.to(padded.device), padded_labels.to(padded.device)


def answer_loss(
    model: ProjectedVLM, visual_tokens: torch.Tensor, answers: Sequence[str], question: str = QUESTION
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``answers`` (each followed by end-of-sequence) given the visual tokens
    [B, T, W] of B images and ``question``, through ``model``'s projector and language model, differentiable in
    the visual tokens (the booster's utility term; the targeted-answer attack)."""
    tokenizer = model.backend.tokenizer
    layout = model.layout(question)
    ids = [list(tokenizer(a, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id] for a in answers]
    backend = cast(TransformersBackend, model.backend)  # the loss needs the transformers model's logits
    embeds, mask, labels = answer_batch(
        backend, (layout.prefix_ids, layout.suffix_ids), model.projector(visual_tokens), ids
    )
    return backend.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def train_projector(config: TrainConfig, out: str | Path, progress: bool = True) -> dict[str, object]:
    """Train the projector; save it (``projector.json``, ``projector.safetensors``, ``training.json``) to ``out``."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    clean, smoothed, answers = cached_features(config)
    backend = TransformersBackend.from_pretrained(ensure_converted())
    tokenizer = backend.tokenizer
    layout = chat_prompt(tokenizer, QUESTION, clean.shape[1], system=SYSTEM)
    answer_ids = [list(tokenizer(a, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id] for a in answers]
    projector = Projector(ProjectorConfig(clean.shape[1], clean.shape[2], backend.hidden_size))
    optimiser = torch.optim.AdamW(projector.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = warmup_cosine(optimiser, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="train-projector", disable=not progress)
    for _ in bar:
        index = torch.randint(len(answers), (config.batch_size,), generator=generator)
        if config.smoothed_share > 0:
            use_smoothed = torch.rand(config.batch_size, generator=generator) < config.smoothed_share
            features = torch.where(use_smoothed[:, None, None], smoothed[index], clean[index])
        else:
            features = clean[index]
        embeds, mask, labels = answer_batch(
            backend, (layout.prefix_ids, layout.suffix_ids), projector(features), [answer_ids[i] for i in index]
        )
        loss = backend.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    projector.eval()
    directory = projector.save(out)
    summary = {
        "config": asdict(config),
        "examples": len(answers),
        "loss_first_20": float(np.mean(losses[:20])),
        "loss_last_20": float(np.mean(losses[-20:])),
        "seconds": time.perf_counter() - started,
    }
    (directory / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def label_accuracy(
    model: ProjectedVLM, features: torch.Tensor, phrases: Sequence[str], max_tokens: int = 16
) -> tuple[float, list[str]]:
    """Fraction of greedy answers to "What is this?" that name the right phrase, and the answers."""
    texts = [model.generate(f, QUESTION, SamplingParams(max_tokens=max_tokens)).text for f in features]
    return float(np.mean([names(text, phrase) for text, phrase in zip(texts, phrases)])), texts


def names(answer: str, phrase: str) -> bool:
    """Whether a generated answer names the phrase (case-insensitive substring: "A photo of a cat." names "a cat")."""
    return phrase.lower() in answer.lower()


def evaluate_projector(
    model: ProjectedVLM,
    images: int = 100,
    sigma: float = 0.25,
    copies: int = 64,
    seed: int = 1,
    encoder: VisionEncoder | None = None,
    granularity: str = "global",
) -> dict[str, object]:
    """Held-out accuracy of the generated label, from clean features and from smoothed ones (``copies`` draws),
    on Fashion-MNIST *test* images and the bundled photos (whole, uncropped). ``encoder`` defaults to the
    demo's DINOv2-S at 112 px; pass a boosted one to measure a booster's effect on the answers."""
    from fsmllm.images import load_image, to_pixels

    test_images, test_labels = load_fashion_mnist("test")
    chosen = np.random.default_rng(seed).choice(len(test_images), size=images, replace=False)
    encoder = encoder if encoder is not None else load_encoder("dinov2-s", image_size=112).eval()
    pixels = grey_to_pixels(test_images[chosen], encoder.image_size)
    phrases = [FASHION_MNIST_PHRASES[int(k)] for k in test_labels[chosen]]
    clean, smoothed = encode_features(encoder, pixels, sigma, copies, seed, granularity=granularity)
    photo_pixels = torch.stack(
        [to_pixels(load_image(f"sample:{name}"), encoder.image_size) for name in SAMPLE_PHOTO_PHRASES]
    )
    photo_clean, photo_smoothed = encode_features(encoder, photo_pixels, sigma, copies, seed, granularity=granularity)
    clean_accuracy, _ = label_accuracy(model, clean, phrases)
    smoothed_accuracy, smoothed_answers = label_accuracy(model, smoothed, phrases)
    photo_phrases = list(SAMPLE_PHOTO_PHRASES.values())
    _, photo_clean_answers = label_accuracy(model, photo_clean, photo_phrases)
    _, photo_smoothed_answers = label_accuracy(model, photo_smoothed, photo_phrases)
    return {
        "fashion_mnist_test_images": images,
        "sigma": sigma,
        "granularity": granularity,
        "smoothing_copies": copies,
        "accuracy_clean": clean_accuracy,
        "accuracy_smoothed": smoothed_accuracy,
        "chance": 1 / len(FASHION_MNIST_PHRASES),
        "hits_smoothed": [names(text, phrase) for text, phrase in zip(smoothed_answers, phrases)],
        "photos": {
            name: {"clean": a, "smoothed": b, "smoothed_right": names(b, phrase)}
            for (name, phrase), a, b in zip(SAMPLE_PHOTO_PHRASES.items(), photo_clean_answers, photo_smoothed_answers)
        },
    }
