"""``fsmllm verify --recompute``: re-run a certificate's sampling here, with its seed, on the weights it names.

Two checks, each with its own exit status (:class:`fsmllm_client.verify.Failure`):

* ``weights`` (11): the encoder's and the booster's weight files found here have the names and SHA-256 the
  certificate lists (the projector and the language model play no part in the feature certificate). A weight file
  that is not here at all fails the same way. The encoder is found by the certificate's name, or where
  ``--encoder`` says (a vision tower's or LLaVA checkpoint's folder: the certificate names only its last part).
* ``recompute`` (10): the encoder (in the certificate's ``encoder_dtype``, behind its booster) certifies the image's
  pixels again with the certificate's σ, n0, n budget, α, bound, seed, radii, granularity and stop rule
  (:class:`~fsmllm.certify.smoothing.SmoothedEncoder`: the noise comes from the seed alone, in fixed blocks,
  whatever the batch size), and every statistic is compared: the sample count and why sampling stopped, abstain and
  the worst token exactly; the score's estimate and lower bound, the served angle, the certified, served and
  estimated FCSB at every radius, the certified radius, every token's values and, when recorded, every c_i within
  the tolerance.

The recomputation runs on the certificate's device type (``cpu``, ``cuda``...), where the same seed, weights, dtype
and code give the same floats: the tolerance is 0 (bit for bit) unless ``--tolerance`` sets one (another torch
version may round differently). On another device type it is not run: the noise is drawn by the device's own
generator (docs/method.md, "Reduced precision and compilation", last point), so the same seed gives other samples
there, and comparing them would say nothing about the certificate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fsmllm.certify import Certificate, SmoothedEncoder, SmoothingConfig, StopRule
from fsmllm.evidence.binding import booster_files, encoder_files, weight_entry
from fsmllm_client.verify import Check, Failure, decode_samples

#: the components a feature certificate depends on (the answer's language model does not move its numbers)
COMPONENTS = ("encoder", "booster")
#: the recomputed certificate as served JSON, presented as the certificate it recomputes is (its names, target
#: cosine, per-token values): the API schema's rendering, handed in by the caller (the core makes no JSON)
Render = Callable[[Certificate, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Setting:
    """Where to recompute: the torch device (None: the certificate's, or cpu where that is not here), noisy images
    per batch, and the largest absolute difference allowed (None: 0)."""

    device: str | None = None
    batch_size: int = 64
    tolerance: float | None = None
    #: where the encoder is here (a vision tower's or LLaVA checkpoint's folder); None: the certificate's name
    encoder: str | None = None

    def encoder_of(self, certificate: dict[str, Any]) -> str:
        return self.encoder or str(certificate["encoder"])


def device_here(certificate: dict[str, Any], asked: str | None) -> str:
    """The device to recompute on: the one asked, else the certificate's when this machine has it, else cpu."""
    if asked is not None:
        return asked
    certified = str(certificate.get("device") or "cpu")
    kind = torch.device(certified).type
    available = kind == "cpu" or (kind == "cuda" and torch.cuda.is_available())
    available = available or (kind == "mps" and torch.backends.mps.is_available())
    return certified if available else "cpu"


def check_weights(certificate: dict[str, Any], setting: Setting) -> Check:
    """The encoder's and booster's weight files here against the certificate's names and SHA-256."""
    certified = certificate.get("weights") or {}
    problems = []
    for component in COMPONENTS:
        try:
            files = encoder_files(setting.encoder_of(certificate)) if component == "encoder" else None
            files = booster_files(certificate["booster"]) if files is None else files
            here = [weight_entry(path) for path in files]
        except (OSError, ValueError) as error:
            problems.append(f"{component}: its weights are not here ({error})")
            continue
        expected = [dict(entry) for entry in certified.get(component, [])]
        if here != expected:
            problems.append(f"{component}: here {_files(here)}, the certificate names {_files(expected)}")
    if problems:
        return Check("weights", False, "; ".join(problems), Failure.WEIGHTS)
    count = sum(len(certified.get(component, [])) for component in COMPONENTS)
    return Check(
        "weights",
        True,
        f"{count} weight file{'' if count == 1 else 's'} of the encoder and booster, SHA-256 as certified"
        if count
        else "the encoder and booster have no weight files (seeded)",
    )


def _files(entries: list[dict[str, str]]) -> str:
    return "[" + ", ".join(f"{entry['name']} {entry['sha256'][:12]}…" for entry in entries) + "]" if entries else "none"


def rerun(certificate: dict[str, Any], pixels: torch.Tensor, setting: Setting, render: Render) -> dict[str, Any]:
    """The certificate's statistics computed again here (the served JSON's fields), and the c_i [n, T]."""
    from fsmllm.booster import load_booster
    from fsmllm.encoders import load_encoder
    from fsmllm.encoders.precision import set_precision

    device = device_here(certificate, setting.device)
    encoder = load_encoder(setting.encoder_of(certificate), image_size=certificate["input_size"], device=device)
    encoder = set_precision(encoder, certificate.get("encoder_dtype", "float32"))
    encoder = load_booster(certificate["booster"], encoder, sigma=certificate["sigma"])
    config = SmoothingConfig(
        certificate["sigma"],
        certificate["n0"],
        certificate["n_budget"],
        certificate["alpha"],
        certificate["bound"],
        certificate["granularity"],
    )
    stop = certificate.get("stop")
    rule = None if stop is None else StopRule(stop["fcsb"], tuple(stop["radii"]), stop["target_cos"], stop["tolerance"])
    radii = [entry["radius"] for entry in certificate["radii"]]
    smoother = SmoothedEncoder(encoder, batch_size=setting.batch_size, device=device)
    cert = smoother.certify(pixels, config, radii, seed=int(certificate["seed"]), stop=rule)
    out = render(cert, certificate)
    out["c_i"] = None if cert.samples is None else np.asarray(cert.samples, dtype=np.float64)
    return out


#: statistics compared exactly (counts, labels) and within the tolerance (floats; None must stay None)
EXACT = ("n", "n_budget", "stopped_by", "abstain", "worst_token")
NUMBERS = ("score_estimate", "score_lower", "served_angle")


def differences(certificate: dict[str, Any], again: dict[str, Any], tolerance: float) -> tuple[list[str], float]:
    """What differs between the certificate and its recomputation beyond ``tolerance`` (named, with both values),
    and the largest absolute difference of any float compared."""
    found: list[str] = []
    largest = 0.0

    def number(name: str, certified: Any, recomputed: Any) -> None:
        nonlocal largest
        if certified is None or recomputed is None:
            if certified is not recomputed:
                found.append(f"{name}: recomputed {recomputed!r}, certified {certified!r}")
            return
        gap = abs(float(recomputed) - float(certified))
        largest = max(largest, gap) if not math.isnan(gap) else math.inf
        if not gap <= tolerance:
            found.append(f"{name}: recomputed {recomputed!r}, certified {certified!r}")

    for name in EXACT:
        if certificate.get(name) != again.get(name):
            found.append(f"{name}: recomputed {again.get(name)!r}, certified {certificate.get(name)!r}")
    for name in NUMBERS:
        number(name, certificate.get(name), again.get(name))
    certified_radii, recomputed_radii = certificate.get("radii") or [], again.get("radii") or []
    if len(certified_radii) != len(recomputed_radii):
        found.append(f"radii: {len(recomputed_radii)} recomputed, {len(certified_radii)} certified")
    for certified, recomputed in zip(certified_radii, recomputed_radii, strict=False):
        for field in ("certified_fcsb", "served_fcsb", "estimated_fcsb"):
            number(f"{field} at radius {certified['radius']:g}", certified.get(field), recomputed.get(field))
    if certificate.get("certified_radius") is not None:
        number(
            "certified_radius",
            certificate["certified_radius"].get("radius"),
            (again.get("certified_radius") or {}).get("radius"),
        )
    for certified, recomputed in zip(certificate.get("tokens") or [], again.get("tokens") or [], strict=False):
        for field in ("score_estimate", "score_lower", "served_angle"):
            number(f"token {certified['token']} {field}", certified.get(field), recomputed.get(field))
    record = certificate.get("samples")
    if record is not None and again.get("c_i") is not None:
        _, values = decode_samples(record)
        recorded = np.asarray(values, dtype=np.float64).reshape(record["shape"])
        c_i = again["c_i"].reshape(recorded.shape) if again["c_i"].size == recorded.size else None
        if c_i is None:
            found.append(f"samples: {again['c_i'].shape[0]} recomputed, {recorded.shape[0]} recorded")
        else:
            gap = float(np.max(np.abs(c_i - recorded))) if c_i.size else 0.0
            largest = max(largest, gap)
            if not gap <= tolerance:
                worst = int(np.argmax(np.abs(c_i - recorded).max(axis=-1) if c_i.ndim > 1 else np.abs(c_i - recorded)))
                found.append(f"c_i: differ by up to {gap:.3g} (first at sample {worst})")
    return found, largest


def check_recompute(certificate: dict[str, Any], pixels: torch.Tensor, setting: Setting, render: Render) -> Check:
    """Re-run the sampling and compare (see the module's docstring for what and how closely); ``render`` makes the
    recomputed certificate's JSON."""
    device = device_here(certificate, setting.device)
    certified = torch.device(str(certificate.get("device") or "cpu")).type
    if torch.device(device).type != certified:
        return Check(
            "recompute",
            None,
            f"not on {device}: the certificate's noise was drawn by {certified}'s generator, which draws other numbers "
            f"for the same seed; recompute it on a {certified} device (--device {certified})",
        )
    tolerance = 0.0 if setting.tolerance is None else setting.tolerance
    where = f"on {device}, {certificate.get('encoder_dtype', 'float32')}, seed {certificate['seed']}"
    again = rerun(certificate, pixels, setting, render)
    found, largest = differences(certificate, again, tolerance)
    if found:
        shown = "; ".join(found[:4]) + (f"; and {len(found) - 4} more" if len(found) > 4 else "")
        return Check("recompute", False, f"{where}: {shown}", Failure.RECOMPUTE)
    exact = "bit for bit" if largest == 0 else f"largest difference {largest:.3g}, tolerance {tolerance:g}"
    return Check("recompute", True, f"{where}: n {again['n']}, score_lower {again['score_lower']!r}, {exact}")
