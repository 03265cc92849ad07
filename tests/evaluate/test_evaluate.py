"""The evaluation pipeline on a tiny encoder: attacks bite, certificates hold, reports are complete."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F

from fsmllm.booster.training import BoosterTrainConfig, train_booster

from fsmllm.attacks import feature_space_attack, smoothed_feature, unit_features, worst_token_cosine
from fsmllm.encoders import load_encoder
from fsmllm.evaluate import (
    AttackRow, AttackSettings, CurvePoint, EvaluateConfig, attack_image, certified_curves, curve_figure, held_out_images, markdown_attacks, markdown_curves, run,
    summarise, target_phrase,
)
from fsmllm.lm.data import FASHION_MNIST_DIR, SAMPLE_PHOTO_PHRASES, answer_for
from fsmllm.lm.models import load_model
from fsmllm.lm.training import answer_loss
from tests.booster.photo_folder import training_photo_folder


def test_pgd_beats_random_noise_and_smoothed_attacks_respect_the_certificate() -> None:
    encoder = load_encoder("tiny-cnn", image_size=16)
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    radii = [0.1, 2.0]
    rows = attack_image(
        0, x, {"none": None, "FS": encoder}, encoder, 0.25, radii, AttackSettings(steps=10, samples=16, observe=1024),
        n0=100, n=1000, alpha=0.001, seed=0,
    )
    with torch.inference_mode():
        clean = unit_features(encoder, x[None])[0]
        noise = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
        random_cos = float(F.cosine_similarity(clean, unit_features(encoder, (x + 2.0 * noise / noise.norm())[None])[0], dim=0))
    attacked = next(r for r in rows if r.defence == "none" and r.radius == 2.0)
    assert attacked.observed_cos < random_cos  # the attack finds worse directions than chance
    smoothed = [r for r in rows if r.defence == "FS"]
    assert any(r.certified_fcsb is not None for r in smoothed)
    assert not any(r.below_certificate for r in smoothed)
    summaries = summarise(rows)
    assert [(s.defence, s.goal, s.radius) for s in summaries] == [
        ("none", "feature", 0.1), ("none", "feature", 2.0), ("FS", "feature", 0.1), ("FS", "feature", 2.0)
    ]


def test_the_per_token_attack_never_falls_below_the_token_level_certificate() -> None:
    """The token goal on a ViT with several tokens: the attack lowers the worst token's cosine more than a random
    perturbation of the same size, and never below the worst token's certified FCSB."""
    encoder = load_encoder("tiny-vit", image_size=16)
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    radii = [0.05, 0.1]
    rows = attack_image(
        0, x, {"none": None, "FS": encoder}, encoder, 0.25, radii, AttackSettings(steps=8, samples=16, observe=1024),
        n0=100, n=1000, alpha=0.001, seed=0, goals=("token",),
    )
    assert [(r.defence, r.goal, r.radius) for r in rows] == [("FS", "token", 0.05), ("FS", "token", 0.1)]
    assert all(r.certified_fcsb is not None for r in rows) and not any(r.below_certificate for r in rows)
    assert all(r.observed_cos >= r.certified_fcsb for r in rows)
    clean = smoothed_feature(encoder, x, 0.25, 1024, seed=1, per_token=True)
    noise = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(4))
    moved = smoothed_feature(encoder, (x + 0.1 * noise / noise.norm()).clamp(0, 1), 0.25, 1024, seed=2, per_token=True)
    assert rows[1].observed_cos < float(worst_token_cosine(clean, moved))


def test_the_targeted_answer_attack_lowers_the_target_loss_and_the_certificate_still_holds() -> None:
    model = load_model("tiny-test")
    encoder = load_encoder("tiny-cnn", image_size=16)
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    target = [answer_for(target_phrase("a pullover"))]
    assert target == ["A photo of a dress."]

    def loss(image: torch.Tensor) -> float:
        with torch.no_grad():
            feature = unit_features(encoder, image[None])[0].reshape(1, encoder.num_tokens, encoder.token_dim)
            return float(answer_loss(model, feature, target))

    adversarial = feature_space_attack(
        encoder, x, 2.0, lambda f: answer_loss(model, f.reshape(1, encoder.num_tokens, encoder.token_dim), target),
        steps=15,
    )
    noise = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert float((adversarial - x).norm()) <= 2.0 + 1e-4
    # the tiny random LM barely reads the image (loss ≈ log V); the attack must still move it the right way
    assert loss(adversarial) < min(loss(x), loss((x + 2.0 * noise / noise.norm()).clamp(0, 1)))

    rows = attack_image(
        0, x, {"none": None, "FS": encoder}, encoder, 0.25, [0.1, 1.0], AttackSettings(steps=5, samples=8, observe=512),
        n0=100, n=1000, alpha=0.001, seed=0, model=model, answer="a pullover", goals=("feature", "answer"),
    )
    answer_rows = [r for r in rows if r.goal == "answer"]
    assert len(answer_rows) == 4 and all(r.target == "a dress" and r.names_target is not None for r in answer_rows)
    assert not any(r.below_certificate for r in rows)
    summaries = summarise(rows)
    assert {(s.defence, s.goal) for s in summaries} == {(d, g) for d in ("none", "FS") for g in ("feature", "answer")}
    assert all((s.targeted_successes is None) == (s.goal == "feature") for s in summaries)
    assert all(s.answered_right is not None and s.attack_successes <= s.answered_right for s in summaries)
    with pytest.raises(ValueError, match="needs a language model"):
        attack_image(0, x, {"none": None}, encoder, 0.25, [0.1], AttackSettings(steps=1), 50, 100, 0.01, 0, goals=("answer",))


def test_attack_success_is_counted_over_images_answered_right_with_an_exact_interval() -> None:
    def row(image: int, right: bool, wrong_after: bool, target: bool) -> AttackRow:
        return AttackRow(image, "FS", 1.0, 0.9, None, False, "a", "b", right, right and not wrong_after, "answer",
                         "a dress", target, sigma=0.25)

    rows = [row(0, True, True, True), row(1, True, True, False), row(2, True, False, False), row(3, True, False, False),
            row(4, True, False, False), row(5, True, False, False), row(6, False, True, True)]
    (summary,) = summarise(rows)
    assert (summary.images, summary.answered_right, summary.attack_successes, summary.targeted_successes) == (7, 6, 2, 1)
    # Clopper-Pearson 95 % for 2 of 6 is [0.043, 0.777]; for 1 of 6 [0.004, 0.641]
    assert "| 2/6 = 33% [4%, 78%] | 1/6 = 17% [0%, 64%] |" in markdown_attacks([summary])
    (none_right,) = summarise([row(0, False, True, True)])
    assert "none right before the attack" in markdown_attacks([none_right])


def test_certified_curve_falls_with_the_radius() -> None:
    encoder = load_encoder("tiny-cnn", image_size=16)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    points = certified_curves("FS", encoder, images, 0.5, 50, 1000, 0.001, [0.0, 0.1, 0.3])
    means = [p.mean for p in points]
    assert means[0] > 0 and means == sorted(means, reverse=True)
    assert all(p.q10 <= p.median <= p.q90 for p in points)


def test_token_curves_report_the_worst_token_and_the_paper_score() -> None:
    encoder = load_encoder("tiny-vit", image_size=16)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    both = certified_curves("FS", encoder, images, 0.5, 50, 500, 0.001, [0.0, 0.1], granularities=("global", "token"))
    whole, tokens = both[:2], both[2:]
    assert [p.setting for p in both] == ["FS", "FS", "FS (token)", "FS (token)"]
    # both come from the same samples, encoded once, and each is what its granularity gives alone
    assert tokens == certified_curves("FS", encoder, images, 0.5, 50, 500, 0.001, [0.0, 0.1], granularities=("token",))
    assert whole == certified_curves("FS", encoder, images, 0.5, 50, 500, 0.001, [0.0, 0.1])
    # at radius 0 the certificate is the score bound: the worst token's is never above the global one's by more
    # than the share of α it gives up, and here (tokens of a random ViT) it is below
    assert tokens[0].mean <= whole[0].mean
    assert tokens[0].mean_score_lower == pytest.approx(tokens[0].mean)
    assert all(0 < p.mean_paper_score <= 1 for p in whole + tokens)
    assert "paper's Ŝ" in markdown_curves(whole + tokens)


def test_the_plot_has_a_panel_per_n_and_sigma_a_colour_per_setting_and_dashes_for_the_worst_token() -> None:
    def point(setting: str, sigma: float, n: int, radius: float) -> CurvePoint:
        mean = 0.9 - radius
        return CurvePoint(setting, sigma, n, radius, mean, mean - 0.05, mean, mean + 0.05, 1.0, 0.97)

    settings = ("FS", "FS (token)", "FS+booster", "FS+booster (token)")
    points = [point(s, sigma, n, r) for s in settings for sigma in (0.25, 0.5) for n in (100, 1000) for r in (0.1, 0.5)
              if (sigma, n) != (0.5, 100)]
    figure = curve_figure(points, "title")
    panels = {axes.get_title(): axes for axes in figure.axes}
    assert sorted(panels) == ["σ = 0.25, n = 100", "σ = 0.25, n = 1000", "σ = 0.5, n = 100 (not run)",
                              "σ = 0.5, n = 1000"]
    lines = {line.get_label(): line for line in panels["σ = 0.5, n = 1000"].get_lines()}
    assert sorted(lines) == sorted(settings)
    assert [lines[s].get_linestyle() for s in settings] == ["-", "--", "-", "--"]
    assert lines["FS"].get_color() == lines["FS (token)"].get_color() != lines["FS+booster"].get_color()
    assert list(lines["FS+booster"].get_ydata()) == pytest.approx([0.8, 0.4])
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["FS", "FS+booster", "whole feature", "worst token"]
    assert not panels["σ = 0.5, n = 100 (not run)"].get_lines()
    plt.close(figure)


@pytest.fixture(scope="module")
def tiny_booster(tmp_path_factory):
    booster = tmp_path_factory.mktemp("booster")
    photos = training_photo_folder(tmp_path_factory.mktemp("photos"))
    train_booster(
        BoosterTrainConfig(encoder="tiny-cnn", image_size=32, images=(str(photos),), fashion_share=0.0, pixel_steps=1,
                           steps=2, width=8, mapper_hidden=8, heads=1, train_dtype="float32"), booster, progress=False,
    )
    return booster


def tiny_run(out, booster, sigmas=(0.25,), resume=False, progress=lambda _: None, alpha=0.01, radii=(0.1,),
             attack_images=1, granularities=("global",)):
    config = EvaluateConfig(
        encoder="tiny-cnn", boosters=(str(booster),), sigmas=tuple(sigmas), ns=(200,), radii=tuple(radii), images=2,
        attack_images=attack_images, attack_steps=2, n0=50, alpha=alpha, model=None, out=str(out), resume=resume,
        photos=1, granularities=granularities,
    )
    return run(config, progress=progress)


def test_a_negative_radius_is_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"non-negative l2 norms, got \[-0.1\]"):
        tiny_run(tmp_path, "no-such-booster", radii=(0.1, -0.1))
    assert not tmp_path.joinpath("results.json").exists()


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_resume_computes_only_the_missing_granularity(tmp_path, tiny_booster) -> None:
    tiny_run(tmp_path, tiny_booster, attack_images=0)
    lines: list[str] = []
    resumed = tiny_run(tmp_path, tiny_booster, attack_images=0, resume=True, progress=lines.append,
                       granularities=("global", "token"))
    assert lines == ["certified curve: FS (token), σ=0.25, n=200, 3 images",
                     f"certified curve: FS+{tiny_booster} (token), σ=0.25, n=200, 3 images"]
    together = tiny_run(tmp_path / "together", tiny_booster, attack_images=0, granularities=("global", "token"))
    key = lambda curve: (curve["setting"], curve["radius"])  # noqa: E731
    assert sorted(resumed["curves"], key=key) == sorted(together["curves"], key=key)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_run_writes_the_report(tmp_path, tiny_booster) -> None:
    results = tiny_run(tmp_path, tiny_booster, sigmas=(0.25, 0.5))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["curves"] == results["curves"] and len(saved["curves"]) == 4 and saved["complete"]
    for curve in saved["curves"]:  # 2 Fashion-MNIST images + 1 photo, each kept
        assert len(curve["per_image"]) == 3 and curve["mean"] == pytest.approx(sum(curve["per_image"]) / 3)
    assert {curve["setting"] for curve in saved["curves"]} == {"FS", f"FS+{tiny_booster}"}
    # each σ's smoothed defences are summarised apart; the undefended encoder once
    assert sorted((a["defence"], a["sigma"] or 0) for a in saved["attacks"] if a["defence"] in ("FS", "none")) == [
        ("FS", 0.25), ("FS", 0.5), ("none", 0)
    ]
    assert all(a["images"] == 1 for a in saved["attacks"])
    assert (tmp_path / "curves.png").stat().st_size > 5000
    report = (tmp_path / "report.md").read_text()
    assert "White-box PGD" in report and "Unfinished" not in report


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_a_stopped_run_leaves_its_results_and_resume_finishes_it(tmp_path, tiny_booster) -> None:
    whole = tiny_run(tmp_path / "whole", tiny_booster)

    class Stop(Exception):
        pass

    def stop_at_the_attacks(line: str) -> None:
        if line.startswith("attacks"):
            raise Stop

    with pytest.raises(Stop):
        tiny_run(tmp_path / "part", tiny_booster, progress=stop_at_the_attacks)
    partial = json.loads((tmp_path / "part" / "results.json").read_text())
    assert not partial["complete"] and partial["curves"] == whole["curves"] and partial["attack_rows"] == []
    assert "Unfinished" in (tmp_path / "part" / "report.md").read_text()

    lines: list[str] = []
    resumed = tiny_run(tmp_path / "part", tiny_booster, resume=True, progress=lines.append)
    assert lines == ["attacks: σ=0.25, image 1/1"]  # the curves were kept, not computed again
    assert resumed == whole  # seeded: the same numbers as the run that never stopped
    with pytest.raises(ValueError, match="alpha differ"):
        tiny_run(tmp_path / "part", tiny_booster, resume=True, alpha=0.05)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_held_out_images_take_the_first_photos_asked_for() -> None:
    every, answers = held_out_images(2, 16)
    assert every.shape == (8, 3, 16, 16) and answers[2:] == list(SAMPLE_PHOTO_PHRASES.values())
    some, some_answers = held_out_images(2, 16, photos=1)
    assert torch.equal(some, every[:3]) and some_answers == answers[:3]
    assert held_out_images(2, 16, photos=0)[0].shape[0] == 2
