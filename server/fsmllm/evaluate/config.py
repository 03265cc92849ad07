"""What an evaluation runs: :class:`EvaluateConfig`, whose fields are also the flags of ``fsmllm evaluate``."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from fsmllm.certify import DEFAULT_RADII, GRANULARITIES, Granularity, SmoothingConfig, check_radii

#: the attack goals (module docstring of :mod:`fsmllm.evaluate`)
GOALS = ("feature", "answer", "token")


@dataclass(frozen=True)
class AttackSettings:
    """PGD: ``steps`` steps, ``samples`` noisy copies per step for smoothed targets; ``observe`` samples to
    re-estimate smoothed features afterwards."""

    steps: int = 10
    samples: int = 8
    observe: int = 256


def _flag(help: str, flag: str | None = None, **argparse_options: Any) -> Any:
    """A field's flag: its help, its name when it is not the field's (``--sigma`` for ``sigmas``), and the
    rest of ``add_argument``'s options (``type``, ``nargs``, ``choices``)."""
    return {"help": help, "flag": flag, "options": argparse_options}


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything that determines an evaluation (with ``seed``, it is reproducible), in the order of the flags."""

    encoder: str = field(default="dinov2-s", metadata=_flag("encoder to evaluate (see --list-encoders)"))
    boosters: tuple[str, ...] = field(
        default=(), metadata=_flag("boosters to compare; {sigma} is replaced by σ", "--booster", nargs="*")
    )
    sigmas: tuple[float, ...] = field(
        default=(0.25, 0.5), metadata=_flag("noise levels σ to evaluate", "--sigma", type=float, nargs="+")
    )
    ns: tuple[int, ...] = field(
        default=(100, 1000), metadata=_flag("estimation samples of the certified curves", "--n", type=int, nargs="+")
    )
    n0: int = field(default=SmoothingConfig.n0, metadata=_flag("selection samples", type=int))
    alpha: float = field(
        default=SmoothingConfig.alpha, metadata=_flag("failure probability of each certificate", type=float)
    )
    radii: tuple[float, ...] = field(
        default=DEFAULT_RADII, metadata=_flag("l2 radii ε of the curves", "--radius", type=float, nargs="+")
    )
    images: int = field(default=16, metadata=_flag("held-out Fashion-MNIST test images (+ bundled photos)", type=int))
    photos: int | None = field(
        default=None, metadata=_flag("bundled photos added to the images (default: all 6)", type=int)
    )
    attack_images: int = field(default=8, metadata=_flag("images attacked with PGD", type=int))
    attack_steps: int = field(default=AttackSettings.steps, metadata=_flag("PGD steps per attack", type=int))
    attack_samples: int = field(
        default=AttackSettings.samples,
        metadata=_flag("noise samples per PGD step against the smoothed encoder", type=int),
    )
    model: str | None = field(
        default=None, metadata=_flag("also compare generated answers (e.g. fsmllm-demo; default: no answers)")
    )
    goals: tuple[str, ...] | None = field(
        default=None,
        metadata=_flag(
            "untargeted feature distortion, targeted wrong answer, and/or the worst token's cosine (token, vs the "
            "token-level certificate) (default: feature and answer with --model, else feature)",
            "--attack-goals",
            nargs="+",
            choices=GOALS,
        ),
    )
    granularities: tuple[Granularity, ...] = field(
        default=("global",),
        metadata=_flag(
            "certified curves for the whole feature and/or the worst token (settings named '... (token)'); both "
            "come from the same noisy samples, encoded once",
            "--granularity",
            nargs="+",
            choices=GRANULARITIES,
        ),
    )
    seed: int = field(default=0, metadata=_flag("seed of the image choice, the noise and the attacks", type=int))
    out: str = field(default="eval-out", metadata=_flag("output folder"))
    resume: bool = field(
        default=False,
        metadata=_flag(
            "keep what OUT/results.json already holds (a run with the same settings that stopped early) and compute "
            "the rest",
            action="store_true",
        ),
    )

    def __post_init__(self) -> None:
        check_radii(self.radii)

    @property
    def attack(self) -> AttackSettings:
        return AttackSettings(steps=self.attack_steps, samples=self.attack_samples)

    @property
    def attack_goals(self) -> tuple[str, ...]:
        """The goals asked for, or by default the feature goal, and the answer goal too with a model."""
        return tuple(self.goals or (("feature", "answer") if self.model else ("feature",)))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """A flag per field: ``--attack-images`` for ``attack_images``, or the name its metadata gives."""
        for item in fields(cls):
            meta = item.metadata
            flag = meta["flag"] or f"--{item.name.replace('_', '-')}"
            default = item.default if item.default is not MISSING else None
            options = dict(meta["options"])
            if flag.lstrip("-").replace("-", "_") != item.name:
                options["dest"] = item.name
                if "choices" not in options:
                    options["metavar"] = flag.lstrip("-").replace("-", "_").upper()
            parser.add_argument(
                flag, default=list(default) if isinstance(default, tuple) else default, help=meta["help"], **options
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvaluateConfig:
        """The config of parsed flags (lists become tuples)."""
        values = {item.name: getattr(args, item.name) for item in fields(cls)}
        converted: dict[str, Any] = {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
        return cls(**converted)
