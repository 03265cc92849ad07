"""Training a noise-conditioned booster (``fsmllm train-booster``): encoder, projector and language model frozen.

Two phases in one resumable loop (method.md, "The Gaussian Smoothness Booster"):

1. ``pixel_steps`` denoising steps: the purifier alone learns P_σ(x + δ) ≈ x (mean squared error), no encoder
   pass, so it is cheap;
2. ``steps`` feature steps through the frozen encoder. For images x_b, their noise levels σ_b (drawn from
   ``sigmas``) and K noise draws δ_bk ~ N(0, σ_b² I), let u_bk be the unit boosted feature u(M_σ(f(P_σ(x_b +
   δ_bk)))) and t_bkj its unit token j; c_b = u(f(x_b)) and c_bj are the *base* encoder's clean feature and tokens.
   The objective is a weighted sum of

   * clean agreement 1 − mean_k ⟨u_bk, c_b⟩, and per token 1 − mean_{k,j} ⟨t_bkj, c_bj⟩: the noisy boosted
     features stay the clean ones a frozen projector was trained on (this alone also bounds ⟨F_B(x), f(x)⟩, the
     clean agreement reported by ``fsmllm evaluate``);
   * smoothness 1 − mean_{k≠l} ⟨u_bk, u_bl⟩ (an unbiased estimate of 1 − S_B(x)², the Gaussian robustness score
     the FCSB grows with), and its per-token mean;
   * contrast: the cross-entropy of picking c_b among the batch's clean features {c_b'} from the smoothed feature
     s_b = u(mean_k u_bk), logits ⟨s_b, c_b'⟩/τ (InfoNCE): different images keep apart after smoothing;
   * pixels: the purifier's squared error, as in phase 1;
   * utility (optional, off by default): the frozen language model's cross-entropy of the right answer from s_b,
     for the labelled (Fashion-MNIST) images of the batch.

Images: random crops of any folders of photos (``images``, :mod:`fsmllm.booster.photos`; the evaluation photos
are refused; ``jitter`` varies their colours) and, with ``fashion_share`` > 0, Fashion-MNIST *train* images.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fsmllm.booster.boosted import booster_dir, read_booster
from fsmllm.booster.conditioned import ConditionedBooster, ConditionedBoosterConfig
from fsmllm.booster.modules import STEM
from fsmllm.booster.photos import random_crop, read_photos
from fsmllm.encoders import load_encoder
from fsmllm.lm.data import fashion_train_set
from fsmllm.lm.projector import unit_feature_tokens
from fsmllm.lm.training import answer_loss, warmup_cosine_factor
from fsmllm.lm.vlm import ProjectedVLM
from fsmllm.weights import save_module

CHECKPOINT = "checkpoint.pt"
#: Debian packages of free natural photos that a booster for the embedded model is trained on (docs/booster-card.md)
WALLPAPER_FOLDERS = ("/usr/share/backgrounds", "/usr/share/wallpapers")


@dataclass(frozen=True)
class BoosterTrainConfig:
    """Everything that determines a trained booster (with the seed, the run is reproducible on one device)."""

    encoder: str = "dinov2-s"
    image_size: int = 112
    sigmas: tuple[float, ...] = (0.25, 0.5)
    images: tuple[str, ...] = WALLPAPER_FOLDERS
    jitter: float = 0.0
    fashion_share: float = 0.2
    fashion_images: int = 5000
    model: str = "none"
    pixel_steps: int = 1000
    steps: int = 2000
    batch_size: int = 8
    copies: int = 4
    lr: float = 1e-3
    feature_lr: float = 3e-4
    weight_clean: float = 1.0
    weight_token_clean: float = 1.0
    weight_smooth: float = 0.25
    weight_token_smooth: float = 0.25
    weight_contrast: float = 0.1
    temperature: float = 0.1
    weight_pixel: float = 1.0
    weight_utility: float = 0.0
    width: int = 48
    mapper_hidden: int = 768
    heads: int = 6
    train_dtype: str = "bfloat16"
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"
    init_from: str = "none"

    #: the help of each field's ``fsmllm train-booster`` flag
    FLAG_HELP: ClassVar[dict[str, str]] = {
        "encoder": "frozen vision encoder the booster wraps (a registered name, or hf:PATH for a local checkpoint)",
        "image_size": "encoder input size in pixels",
        "sigmas": "noise levels to train for (one booster serves them all; certificates hold at any sigma)",
        "images": "folders of training photos, searched recursively (the evaluation photos are refused)",
        "jitter": "colour jitter of the photo crops: brightness, contrast and saturation each scaled by "
        "exp(U(-j, j)) (0: none; more distinct images from a few photos)",
        "fashion_share": "share of each batch from Fashion-MNIST train images (0: none; else apt-get install "
        "dataset-fashion-mnist)",
        "fashion_images": "Fashion-MNIST train images in the pool that share draws from",
        "model": "model whose frozen projector and language model give the utility term ('none': no utility term)",
        "pixel_steps": "first phase: denoising steps of the purifier alone (no encoder pass)",
        "steps": "second phase: steps through the frozen encoder (the feature objective)",
        "batch_size": "images per step",
        "copies": "noise draws per image (at least 2: the smoothness term compares pairs)",
        "lr": "peak learning rate of the denoising phase",
        "feature_lr": "peak learning rate of the feature phase",
        "weight_clean": "weight of the clean agreement of the whole feature",
        "weight_token_clean": "weight of the clean agreement of each token",
        "weight_smooth": "weight of the smoothness of the whole feature (raises the Gaussian robustness score)",
        "weight_token_smooth": "weight of the smoothness of each token",
        "weight_contrast": "weight of the contrastive term (different images' smoothed features apart)",
        "temperature": "temperature of the contrastive term",
        "weight_pixel": "weight of the purifier's squared error in the feature phase",
        "weight_utility": "weight of the language model's answer loss on labelled images (needs --model)",
        "width": "channels of the purifier's first level (half resolution; then 2x, 4x)",
        "mapper_hidden": "hidden width of the token mapper",
        "heads": "attention heads of the token mapper",
        "train_dtype": "precision of the training passes (autocast; the weights stay float32): bfloat16 or float32",
        "checkpoint_every": "steps between checkpoints (a restart resumes from the last)",
        "seed": "seed of the data, the noise and the initial weights",
        "device": "torch device to train on: cpu, cuda, ...",
        "init_from": "a trained v2 booster (shipped name or folder) to start from instead of the identity, e.g. to "
        "train a shipped one longer with --pixel-steps 0; its architecture must match ('none': the identity)",
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "images", tuple(str(p) for p in self.images))
        if self.copies < 2:
            raise ValueError("copies must be at least 2 (the smoothness term compares pairs of noisy features)")
        if not self.sigmas or not all(s > 0 for s in self.sigmas):
            raise ValueError(f"sigmas must be positive, got {list(self.sigmas)}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if not 0 <= self.fashion_share <= 1:
            raise ValueError(f"fashion_share must be in [0, 1], got {self.fashion_share}")
        if self.fashion_share < 1 and not self.images:
            raise ValueError("give --images DIR (folders of photos), or --fashion-share 1 for Fashion-MNIST alone")
        if self.train_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"train_dtype must be bfloat16 or float32, got {self.train_dtype!r}")
        if self.weight_utility and self.model == "none":
            raise ValueError("weight_utility needs --model (the frozen language model that scores the answers)")


@dataclass
class TrainingState:
    """What a checkpoint restores besides the weights: the step, the random streams, the history and the runs."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)


class BatchSource:
    """Training batches: photo crops and Fashion-MNIST images, their σ and noise, from two seeded streams."""

    def __init__(self, config: BoosterTrainConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.photos = read_photos(config.images) if config.fashion_share < 1 else []
        self.fashion = torch.empty(0)
        self.answers: list[str] = []
        if config.fashion_share > 0:
            self.fashion, self.answers = fashion_train_set(config.image_size, config.fashion_images, self.rng)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str | None]]:
        """(clean pixels [B, 3, S, S], σ [B], noise [K, B, 3, S, S] of unit variance, answers or None)."""
        config = self.config
        pixels: list[torch.Tensor] = []
        answers: list[str | None] = []
        for _ in range(config.batch_size):
            if self.rng.random() < config.fashion_share:
                k = int(self.rng.integers(len(self.fashion)))
                pixels.append(self.fashion[k])
                answers.append(self.answers[k])
            else:
                photo = self.photos[int(self.rng.integers(len(self.photos)))]
                pixels.append(random_crop(photo, config.image_size, self.rng, jitter=config.jitter))
                answers.append(None)
        x = torch.stack(pixels)
        pick = torch.randint(len(config.sigmas), (config.batch_size,), generator=self.generator)
        sigma = torch.tensor(config.sigmas)[pick]
        noise = torch.randn((config.copies, *x.shape), generator=self.generator)
        return x, sigma, noise, answers

    def state(self) -> dict[str, object]:
        return {"rng": self.rng.bit_generator.state, "generator": self.generator.get_state()}

    def restore(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])


def pairwise_agreement(units: torch.Tensor) -> torch.Tensor:
    """mean_{k≠l} ⟨v_k, v_l⟩ over the K copies (axis 0) of unit vectors [K, ..., D] -> [...]: from
    ‖Σ_k v_k‖² = K + Σ_{k≠l} ⟨v_k, v_l⟩, an unbiased estimate of ‖E v‖² (method.md, the score S²)."""
    copies = units.shape[0]
    total = units.sum(0)
    return ((total * total).sum(-1) - copies) / (copies * (copies - 1))


def feature_losses(
    boosted: torch.Tensor, clean: torch.Tensor, copies: int, temperature: float
) -> dict[str, torch.Tensor]:
    """The feature terms of the objective (module docstring) and the smoothed tokens.

    ``boosted``: raw boosted tokens [K·B, T, W] (copy-major); ``clean``: the base encoder's raw clean tokens
    [B, T, W]. Returns ``clean``, ``token_clean``, ``smooth``, ``token_smooth``, ``contrast`` (losses) and
    ``smoothed`` (the mean unit feature [B, T, W], what the language model would read)."""
    batch = clean.shape[0]
    units = unit_feature_tokens(boosted).flatten(-2).reshape(copies, batch, -1)
    clean_units = unit_feature_tokens(clean).flatten(-2)
    tokens = F.normalize(boosted.float(), dim=-1).reshape(copies, batch, *boosted.shape[1:])
    clean_tokens = F.normalize(clean.float(), dim=-1)
    smoothed = F.normalize(units.mean(0), dim=-1)
    logits = smoothed @ clean_units.T / temperature
    return {
        "clean": 1 - (units * clean_units).sum(-1).mean(),
        "token_clean": 1 - (tokens * clean_tokens).sum(-1).mean(),
        "smooth": 1 - pairwise_agreement(units).mean(),
        "token_smooth": 1 - pairwise_agreement(tokens).mean(),
        "contrast": F.cross_entropy(logits, torch.arange(batch, device=logits.device)),
        "smoothed": units.mean(0).reshape(clean.shape),
    }


def learning_rate(config: BoosterTrainConfig) -> Callable[[int], float]:
    """The factor on ``lr`` at each step: a warm-up (a tenth of the phase) and cosine decay in each phase, the
    feature phase scaled to ``feature_lr``."""

    def factor(step: int) -> float:
        if step < config.pixel_steps:
            return warmup_cosine_factor(step, config.pixel_steps)
        return warmup_cosine_factor(step - config.pixel_steps, config.steps) * config.feature_lr / config.lr

    return factor


def train_booster(
    config: BoosterTrainConfig, out: str | Path, progress: bool = True, stop_at: int | None = None
) -> dict[str, object]:
    """Train a noise-conditioned booster for ``config.encoder``; save it (``booster.json``,
    ``booster.safetensors``, ``training.json``) into ``out``. A ``checkpoint.pt`` written there every
    ``checkpoint_every`` steps is resumed from if present (same config), and removed at the end.

    ``stop_at``: stop after that step (counting both phases), leaving only the checkpoint (runs split over several
    sessions); returns ``{"stopped_at": step, "checkpoint": path}``. Resuming gives the same booster as one
    uninterrupted run."""
    out = Path(out)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    device = torch.device(config.device)
    encoder = load_encoder(config.encoder, image_size=config.image_size, device=device).eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    booster = ConditionedBooster(
        ConditionedBoosterConfig(
            config.encoder,
            encoder.image_size,
            encoder.num_tokens,
            encoder.token_dim,
            config.sigmas,
            config.width,
            config.mapper_hidden,
            config.heads,
        )
    ).to(device)
    if config.init_from != "none":
        _start_from(booster, config.init_from)
    model = _frozen_model(config, device)
    source = BatchSource(config)
    optimiser = torch.optim.AdamW(booster.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, learning_rate(config))
    state = _resume(out / CHECKPOINT, config, booster, optimiser, schedule, source)
    total = config.pixel_steps + config.steps
    end = total if stop_at is None else min(stop_at, total)
    bar = tqdm(range(state.step, end), desc="train-booster", disable=not progress)
    for step in bar:
        x, sigma, noise, answers = source.next()
        x, sigma, noise = x.to(device), sigma.to(device), noise.to(device)
        noisy = (x[None] + sigma[None, :, None, None, None] * noise).flatten(0, 1)
        sigmas = sigma.repeat(config.copies)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train_dtype == "bfloat16"):
            purified = booster.purifier(noisy, sigmas)
            terms = {"pixel": F.mse_loss(purified.float(), x.repeat(config.copies, 1, 1, 1))}
            loss = terms["pixel"]
            if step >= config.pixel_steps:
                with torch.no_grad():
                    clean = encoder(x).float()
                boosted = booster.mapper(encoder(purified).float(), sigmas).float()
                features = feature_losses(boosted, clean, config.copies, config.temperature)
                smoothed = features.pop("smoothed")
                terms |= features
                if model is not None:
                    terms["utility"] = _utility(model, smoothed, answers)
                loss = sum(getattr(config, f"weight_{name}") * value for name, value in terms.items())
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(booster.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        state.history.append({"step": step, **{name: float(value.detach()) for name, value in terms.items()}})
        bar.set_postfix({k: f"{v:.4f}" for k, v in state.history[-1].items() if k != "step"})
        state.step = step + 1
        if (state.step % config.checkpoint_every == 0 or state.step == end) and state.step < total:
            _checkpoint(out / CHECKPOINT, config, booster, optimiser, schedule, source, state, started)
    if end < total:
        return {"stopped_at": end, "checkpoint": str(out / CHECKPOINT)}
    booster.eval()
    save_module(booster, booster.config.to_json(), out, STEM)  # float32, on the CPU
    (out / CHECKPOINT).unlink(missing_ok=True)
    summary = _summary(config, booster, state, started)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _start_from(booster: ConditionedBooster, name_or_path: str) -> None:
    """Copy the weights of a trained v2 booster of the same architecture into ``booster``."""
    trained = read_booster(booster_dir(name_or_path))
    if not isinstance(trained, ConditionedBooster) or trained.config != booster.config:
        mine = booster.config.to_json()
        theirs = trained.config.to_json() if isinstance(trained, ConditionedBooster) else {"kind": "gsb-v1"}
        differ = sorted(k for k in mine if mine.get(k) != theirs.get(k))
        raise ValueError(f"--init-from {name_or_path}: its architecture differs from this run's in {differ}")
    booster.load_state_dict(trained.state_dict())


def _utility(model: ProjectedVLM, smoothed: torch.Tensor, answers: list[str | None]) -> torch.Tensor:
    """The LM's cross-entropy of the target answers given the smoothed features (rows with an answer only)."""
    rows = [i for i, a in enumerate(answers) if a is not None]
    if not rows:
        return smoothed.new_zeros(())
    return answer_loss(model, smoothed[rows], [a for a in answers if a is not None])


def _frozen_model(config: BoosterTrainConfig, device: torch.device) -> ProjectedVLM | None:
    """The language model of the utility term (None when its weight is 0)."""
    if config.weight_utility == 0:
        return None
    from fsmllm.lm.models import load_model, model_spec

    spec = model_spec(config.model)
    if (spec.encoder, spec.image_size) != (config.encoder, config.image_size):
        raise ValueError(
            f"model {config.model} reads {spec.encoder} at {spec.image_size} px, not {config.encoder} at "
            f"{config.image_size} px; pass --weight-utility 0 (no utility term) or the matching encoder"
        )
    model = load_model(config.model, device=device)
    from fsmllm.lm.transformers_backend import TransformersBackend

    if not isinstance(model.backend, TransformersBackend):
        raise ValueError("the utility term needs the transformers backend (its gradients reach the visual tokens)")
    model.projector.requires_grad_(False)
    model.backend.model.requires_grad_(False)
    return model


def _this_run(state: TrainingState, started: float) -> dict[str, Any]:
    """This process's run: its command, the steps it trained (from where the runs before it ended), its time."""
    return {
        "command": " ".join(sys.argv),
        "from_step": int(state.runs[-1]["to_step"]) if state.runs else 0,
        "to_step": state.step,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _summary(
    config: BoosterTrainConfig, booster: ConditionedBooster, state: TrainingState, started: float
) -> dict[str, object]:
    runs = [*state.runs, _this_run(state, started)]
    phases = {
        "pixel": [h for h in state.history if h["step"] < config.pixel_steps],
        "feature": [h for h in state.history if h["step"] >= config.pixel_steps],
    }
    return {
        "config": asdict(config),
        "parameters": sum(p.numel() for p in booster.parameters()),
        "runs": runs,
        "seconds": round(sum(float(r["seconds"]) for r in runs), 1),
        **{
            f"{phase}_{edge}": {k: float(np.mean([h[k] for h in part])) for k in part[0] if k != "step"}
            for phase, rows in phases.items()
            if rows
            for edge, part in (("first_20", rows[:20]), ("last_20", rows[-20:]))
        },
    }


def _checkpoint(
    path: Path,
    config: BoosterTrainConfig,
    booster: ConditionedBooster,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    source: BatchSource,
    state: TrainingState,
    started: float,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {
        "config": asdict(config),
        "step": state.step,
        "booster": booster.state_dict(),
        "optimiser": optimiser.state_dict(),
        "schedule": schedule.state_dict(),
        "source": source.state(),
        "history": state.history,
        "runs": [*state.runs, _this_run(state, started)],
    }
    torch.save(saved, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _resume(
    path: Path,
    config: BoosterTrainConfig,
    booster: ConditionedBooster,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    source: BatchSource,
) -> TrainingState:
    """Restore a checkpoint of the same config; a fresh state without one."""
    if not path.is_file():
        return TrainingState()
    saved = torch.load(path, weights_only=False, map_location="cpu")
    if saved["config"] != asdict(config):
        raise ValueError(f"{path} was written by another configuration; delete it or train into another folder")
    booster.load_state_dict(saved["booster"])
    optimiser.load_state_dict(saved["optimiser"])
    schedule.load_state_dict(saved["schedule"])
    source.restore(saved["source"])
    return TrainingState(step=int(saved["step"]), history=saved["history"], runs=saved["runs"])
