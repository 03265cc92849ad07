"""The whole evaluation (:func:`run`): certified curves per (σ, n, setting), then the attacked images per σ,
each written to the output folder as soon as it is done."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from fsmllm.encoders.base import VisionEncoder
from fsmllm.evaluate.compute import attack_image, certified_curves, curve_name, held_out_images
from fsmllm.evaluate.config import EvaluateConfig
from fsmllm.evaluate.persist import ResultsFolder


def run(config: EvaluateConfig, progress: Callable[[str], None] = print) -> dict[str, object]:
    """The evaluation ``config`` describes; writes ``results.json``, ``report.md`` and ``curves.png`` into
    ``config.out`` after every finished curve and attacked image (``"complete": false`` until the end), and
    returns the final results.

    With ``config.resume`` the curves and attacked images already in ``out/results.json`` (from a run with the
    same settings that stopped early, or one with fewer σ, n or boosters) are kept and only the rest computed.
    Curves come at every granularity of ``config.granularities``: the whole feature ("global") and/or the worst
    token ("token": settings named "... (token)")."""
    from fsmllm.encoders import load_encoder

    encoder = load_encoder(config.encoder).eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    pixels, answers = held_out_images(config.images, encoder.image_size, photos=config.photos, seed=config.seed)
    goals = config.attack_goals
    attacked_images = min(config.attack_images, len(pixels))
    settings = {
        "encoder": encoder.name,
        "image_size": encoder.image_size,
        "model": config.model,
        "images": len(pixels),
        "photos": config.photos,
        "attack": asdict(config.attack),
        "goals": list(goals),
        "n0": config.n0,
        "alpha": config.alpha,
        "seed": config.seed,
        "radii": [float(r) for r in config.radii],
    }
    results = ResultsFolder(Path(config.out), settings, config.resume)
    model = None
    if config.model:
        from fsmllm.lm.models import load_model

        model = load_model(config.model)

    def boosted(name: str, sigma: float) -> VisionEncoder:
        from fsmllm.booster import load_booster

        return load_booster(name.format(sigma=sigma), encoder, sigma=sigma)

    for sigma in config.sigmas:
        variants: dict[str, VisionEncoder | None] = {"none": None, "FS": encoder}
        variants.update({f"FS+{b.format(sigma=sigma)}": boosted(b, sigma) for b in config.boosters})
        for n in config.ns:
            for setting, variant in variants.items():
                missing = [g for g in config.granularities if not results.has_curve(curve_name(setting, g), sigma, n)]
                if variant is None or not missing:
                    continue
                names = ", ".join(curve_name(setting, g) for g in missing)
                progress(f"certified curve: {names}, σ={sigma}, n={n}, {len(pixels)} images")
                results.add_curve(
                    certified_curves(
                        setting,
                        variant,
                        pixels,
                        sigma,
                        config.n0,
                        n,
                        config.alpha,
                        config.radii,
                        seed=config.seed,
                        granularities=missing,
                    )
                )
        for i in range(attacked_images):
            if results.has_attacked(sigma, i):
                continue
            progress(f"attacks: σ={sigma}, image {i + 1}/{attacked_images}")
            rows = attack_image(
                i,
                pixels[i],
                variants,
                encoder,
                sigma,
                config.radii,
                config.attack,
                config.n0,
                max(config.ns),
                config.alpha,
                config.seed + i,
                model=model,
                answer=answers[i],
                goals=goals,
            )
            # the undefended encoder does not depend on σ: attacked once, with the first σ
            results.add_attacked([row for row in rows if sigma == config.sigmas[0] or row.defence != "none"])
    return results.finish()
