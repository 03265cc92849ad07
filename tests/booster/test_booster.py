"""The noise-conditioned Gaussian Smoothness Booster (v2): module contract, losses against brute force, training
raises the clean agreement and the score, checkpoints resume exactly, the contrast term keeps images apart, the
boosted certificate survives PGD, and the CLI reports the booster. The training folders of photos are tested in
test_photos.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsmllm.attacks import feature_attack, smoothed_feature
from fsmllm.booster import BoostedEncoder, available_boosters, load_booster
from fsmllm.booster.conditioned import ConditionedBooster, ConditionedBoosterConfig
from fsmllm.booster.modules import STEM
from fsmllm.booster.training import BoosterTrainConfig, feature_losses, pairwise_agreement, train_booster
from fsmllm.certify import SmoothedEncoder, SmoothingConfig
from fsmllm.certify.meaning import clean_agreement
from fsmllm.cli import main
from fsmllm.encoders import load_encoder
from fsmllm.images import load_image, to_pixels
from fsmllm.weights import save_module
from tests.booster.photo_folder import training_photo_folder

SIZE = 32


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return training_photo_folder(tmp_path_factory.mktemp("photos"))


def tiny_config(photos: Path, **overrides: object) -> BoosterTrainConfig:
    """A CPU-seconds configuration: tiny-vit at 32 px, photo crops only, no language model."""
    values: dict[str, object] = dict(
        encoder="tiny-vit", image_size=SIZE, sigmas=(0.25, 0.5), images=(str(photos),), fashion_share=0.0,
        pixel_steps=40, steps=60, batch_size=8, copies=4, lr=3e-3, feature_lr=3e-3, width=8, mapper_hidden=32,
        heads=2, checkpoint_every=20, train_dtype="float32",
    )
    return BoosterTrainConfig(**(values | overrides))


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return load_encoder("tiny-vit", image_size=SIZE).requires_grad_(False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Path:
    out = tmp_path_factory.mktemp("booster") / "gsb-tiny"
    train_booster(tiny_config(photos), out, progress=False)
    return out


def cat(size: int = SIZE) -> torch.Tensor:
    return to_pixels(load_image("sample:chelsea"), size)


def coffee(size: int = SIZE) -> torch.Tensor:
    return to_pixels(load_image("sample:coffee"), size)


def fresh_booster(encoder: torch.nn.Module, perturb: float = 0.0) -> ConditionedBooster:
    config = ConditionedBoosterConfig(
        encoder.name, encoder.image_size, encoder.num_tokens, encoder.token_dim, (0.25, 0.5), 8, 32, 2
    )
    booster = ConditionedBooster(config)
    if perturb:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for parameter in booster.parameters():
                parameter.add_(perturb * torch.randn(parameter.shape, generator=generator))
    return booster.eval()


@pytest.mark.parametrize("sigma", [0.25, 0.5, 0.37])
def test_an_untrained_booster_is_the_identity_at_every_sigma(encoder: torch.nn.Module, sigma: float) -> None:
    x = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    boosted = BoostedEncoder(encoder, fresh_booster(encoder), "fresh", sigma=sigma)
    assert torch.equal(boosted(x), encoder(x))
    assert (boosted.name, boosted.booster_name, boosted.feature_dim) == (encoder.name, "fresh", encoder.feature_dim)


def test_the_noise_level_conditions_the_output(encoder: torch.nn.Module) -> None:
    """Once trained away from the identity, the same noisy pixels map to different features at another σ."""
    booster = fresh_booster(encoder, perturb=0.05)
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    at = {s: BoostedEncoder(encoder, booster, "b", sigma=s)(x) for s in (0.25, 0.5)}
    assert not torch.allclose(at[0.25], at[0.5], atol=1e-3)
    assert not torch.allclose(booster.purifier(x, torch.full((3,), 0.25)), booster.purifier(x, torch.full((3,), 0.5)))
    assert torch.equal(at[0.25], BoostedEncoder(encoder, booster, "b", sigma=0.25)(x))  # one function per σ


def test_save_load_round_trip_and_mismatch_errors(encoder: torch.nn.Module, tmp_path: Path) -> None:
    booster = fresh_booster(encoder, perturb=0.05)
    save_module(booster, booster.config.to_json(), tmp_path / "b", STEM)
    loaded = load_booster(str(tmp_path / "b"), encoder, sigma=0.25)
    x = torch.rand(3, 3, SIZE, SIZE)
    expected = BoostedEncoder(encoder, booster, "b", sigma=0.25)(x)
    torch.testing.assert_close(loaded(x), expected)
    assert not torch.allclose(expected, encoder(x), atol=1e-3)  # the perturbation did change the function
    with pytest.raises(ValueError, match="noise-conditioned: give the sigma it serves"):
        load_booster(str(tmp_path / "b"), encoder)
    with pytest.raises(ValueError, match="trained for tiny-vit at 32 px, not tiny-cnn"):
        load_booster(str(tmp_path / "b"), load_encoder("tiny-cnn", image_size=SIZE), sigma=0.25)
    with pytest.raises(ValueError, match="at 32 px, not tiny-vit at 16 px"):
        load_booster(str(tmp_path / "b"), load_encoder("tiny-vit", image_size=16), sigma=0.25)


def test_a_sigma_outside_the_trained_range_is_served_with_a_warning(
    encoder: torch.nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    booster = fresh_booster(encoder)
    save_module(booster, booster.config.to_json(), tmp_path / "b", STEM)
    with caplog.at_level(logging.WARNING, logger="fsmllm.booster.boosted"):
        load_booster(str(tmp_path / "b"), encoder, sigma=0.4)
        assert not caplog.records
        load_booster(str(tmp_path / "b"), encoder, sigma=1.0)
    assert "was trained at sigma 0.25/0.5, not 1: certificates stay valid" in caplog.text


def test_load_booster_by_name(encoder: torch.nn.Module) -> None:
    assert load_booster("none", encoder) is encoder
    with pytest.raises(FileNotFoundError, match="no booster 'no-such-booster'"):
        load_booster("no-such-booster", encoder)


def test_feature_losses_match_brute_force() -> None:
    copies, batch, tokens, width = 3, 4, 2, 5
    generator = torch.Generator().manual_seed(3)
    boosted = torch.randn(copies * batch, tokens, width, generator=generator)
    clean = torch.randn(batch, tokens, width, generator=generator)
    terms = feature_losses(boosted, clean, copies, temperature=0.2)
    units = F.normalize(boosted.flatten(1), dim=-1).reshape(copies, batch, -1)
    clean_units = F.normalize(clean.flatten(1), dim=-1)
    tok = F.normalize(boosted, dim=-1).reshape(copies, batch, tokens, width)
    clean_tok = F.normalize(clean, dim=-1)
    pairs = [float(units[j, b] @ units[k, b]) for b in range(batch) for j in range(copies) for k in range(copies) if j != k]
    token_pairs = [
        float(tok[j, b, t] @ tok[k, b, t])
        for b in range(batch) for t in range(tokens) for j in range(copies) for k in range(copies) if j != k
    ]
    agree = [float(units[k, b] @ clean_units[b]) for b in range(batch) for k in range(copies)]
    token_agree = [float(tok[k, b, t] @ clean_tok[b, t]) for b in range(batch) for k in range(copies) for t in range(tokens)]
    smoothed = F.normalize(units.mean(0), dim=-1)
    nce = [
        -float(torch.log_softmax(torch.stack([smoothed[b] @ clean_units[c] / 0.2 for c in range(batch)]), 0)[b])
        for b in range(batch)
    ]
    expected = {
        "smooth": 1 - sum(pairs) / len(pairs), "token_smooth": 1 - sum(token_pairs) / len(token_pairs),
        "clean": 1 - sum(agree) / len(agree), "token_clean": 1 - sum(token_agree) / len(token_agree),
        "contrast": sum(nce) / batch,
    }
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, abs=1e-5), name
    torch.testing.assert_close(terms["smoothed"].flatten(1), units.mean(0))
    unit = F.normalize(torch.randn(6, 2, 3, generator=generator), dim=-1)
    assert torch.allclose(pairwise_agreement(unit), torch.tensor(
        [sum(float(unit[j, b] @ unit[k, b]) for j in range(6) for k in range(6) if j != k) / 30 for b in range(2)]
    ), atol=1e-6)


def _agreement_and_score(boosted: torch.nn.Module, encoder: torch.nn.Module, x: torch.Tensor, sigma: float) -> tuple[float, float]:
    """(⟨F(x), f(x)⟩ with f the base encoder's clean unit feature, ‖F(x)‖) from 2000 noisy copies."""
    smoothed = smoothed_feature(boosted, x, sigma, n=2000, seed=1, batch_size=1000)
    clean = F.normalize(encoder(x[None]).flatten(), dim=0)
    return float(smoothed @ clean), float(smoothed.norm())


def test_training_raises_clean_agreement_and_score_on_held_out_photos(encoder: torch.nn.Module, trained: Path) -> None:
    """The cat and the coffee are not among the training photos: at both σ the smoothed boosted feature must be
    nearer the clean feature than without the booster, with a higher score. (That the photos stay apart is the
    contrast term's test: on this random tiny encoder, agreement pulls the two photos' features together.)"""
    summary = json.loads((trained / "training.json").read_text())
    assert summary["feature_last_20"]["clean"] < summary["feature_first_20"]["clean"]
    assert summary["pixel_last_20"]["pixel"] < summary["pixel_first_20"]["pixel"]
    for sigma in (0.25, 0.5):
        boosted = load_booster(str(trained), encoder, sigma=sigma)
        for x in (cat(), coffee()):
            base, better = _agreement_and_score(encoder, encoder, x, sigma), _agreement_and_score(boosted, encoder, x, sigma)
            assert better[0] > base[0] + 0.02 and better[1] > base[1], (sigma, base, better)


def test_the_contrast_term_keeps_two_images_apart(encoder: torch.nn.Module, photos: Path, tmp_path: Path) -> None:
    """Trained on the contrast term alone, the booster lowers the cosine between two held-out photos' smoothed
    features (the identity booster, i.e. no training, is the reference)."""
    alone = dict(weight_clean=0.0, weight_token_clean=0.0, weight_smooth=0.0, weight_token_smooth=0.0, weight_pixel=0.0)
    train_booster(tiny_config(photos, pixel_steps=0, steps=40, weight_contrast=1.0, **alone), tmp_path / "c", progress=False)
    boosted = load_booster(str(tmp_path / "c"), encoder, sigma=0.5)
    before = [smoothed_feature(encoder, x, 0.5, n=1000, seed=1, batch_size=1000) for x in (cat(), coffee())]
    after = [smoothed_feature(boosted, x, 0.5, n=1000, seed=1, batch_size=1000) for x in (cat(), coffee())]
    assert float(F.cosine_similarity(*after, dim=0)) < float(F.cosine_similarity(*before, dim=0)) - 0.05


def test_resuming_a_checkpoint_gives_the_same_booster(tmp_path: Path, encoder: torch.nn.Module, photos: Path) -> None:
    config = tiny_config(photos, pixel_steps=4, steps=8, checkpoint_every=5)
    train_booster(config, tmp_path / "whole", progress=False)
    stopped = train_booster(config, tmp_path / "split", progress=False, stop_at=7)  # past the phase boundary
    assert stopped["stopped_at"] == 7 and (tmp_path / "split" / "checkpoint.pt").is_file()
    assert not (tmp_path / "split" / "booster.json").exists()
    summary = train_booster(config, tmp_path / "split", progress=False)
    assert not (tmp_path / "split" / "checkpoint.pt").exists()
    assert [(r["from_step"], r["to_step"]) for r in summary["runs"]] == [(0, 7), (7, 12)]
    x = torch.rand(4, 3, SIZE, SIZE)
    whole, split = (load_booster(str(tmp_path / d), encoder, sigma=0.5) for d in ("whole", "split"))
    assert torch.equal(whole(x), split(x))
    train_booster(tiny_config(photos, steps=12, lr=1e-2), tmp_path / "other", stop_at=3, progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        train_booster(tiny_config(photos, steps=12, lr=2e-2), tmp_path / "other", progress=False)


def test_init_from_starts_at_the_trained_booster(tmp_path: Path, encoder: torch.nn.Module, trained: Path, photos: Path) -> None:
    """--init-from continues a trained booster: with the learning rate at 0 the result is that booster (the identity
    start would differ); a booster of another architecture is refused, naming what differs."""
    train_booster(tiny_config(photos, pixel_steps=0, steps=2, feature_lr=0.0, init_from=str(trained)), tmp_path / "w", progress=False)
    x = torch.rand(4, 3, SIZE, SIZE)
    source, warm = (load_booster(str(d), encoder, sigma=0.5) for d in (trained, tmp_path / "w"))
    assert torch.equal(source(x), warm(x)) and not torch.equal(source(x), encoder(x))
    with pytest.raises(ValueError, match=r"architecture differs from this run's in \['mapper_hidden'\]"):
        train_booster(tiny_config(photos, mapper_hidden=16, init_from=str(trained)), tmp_path / "x", progress=False)


def test_the_config_refuses_what_cannot_train(photos: Path) -> None:
    with pytest.raises(ValueError, match="copies must be at least 2"):
        tiny_config(photos, copies=1)
    with pytest.raises(ValueError, match="give --images DIR"):
        tiny_config(photos, images=())
    with pytest.raises(ValueError, match=r"sigmas must be positive, got \[0.25, 0.0\]"):
        tiny_config(photos, sigmas=(0.25, 0))
    with pytest.raises(ValueError, match="weight_utility needs --model"):
        tiny_config(photos, weight_utility=0.1)
    with pytest.raises(ValueError, match=r"jitter must be in \[0, 1\], got 1.5"):
        tiny_config(photos, jitter=1.5)


def test_pgd_cannot_push_the_boosted_cosine_below_the_certificate(encoder: torch.nn.Module, trained: Path) -> None:
    """The booster is part of the base function, so its certificate must survive white-box PGD through it."""
    x, sigma, radii = cat(), 0.25, [0.1, 0.25]
    boosted = load_booster(str(trained), encoder, sigma=sigma)
    cert = SmoothedEncoder(boosted, batch_size=500).certify(x, SmoothingConfig(sigma, n0=100, n=2000), radii, seed=0)
    clean = smoothed_feature(boosted, x, sigma, n=4000, seed=1, batch_size=1000)
    for eps, certified in zip(radii, cert.certified_fcsb):
        attacked = feature_attack(boosted, x, eps, sigma=sigma, samples=32, steps=20, seed=2)
        observed = F.cosine_similarity(clean, smoothed_feature(boosted, attacked, sigma, 4000, 3, 1000), dim=0)
        assert certified is None or float(observed) >= certified - 0.01, (eps, float(observed), certified)
    assert cert.certified_fcsb[0] is not None


def test_cli_certify_with_a_booster(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["certify", "sample:chelsea", "--encoder", "tiny-vit", "--image-size", str(SIZE), "--json",
              "--no-progress", "--seed", "4", "--n", "500", "--sigma", "0.5"]
    assert main([*common, "--booster", str(trained)]) == 0
    boosted = json.loads(capsys.readouterr().out)
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (boosted["booster"], boosted["encoder"], plain["booster"]) == (str(trained), "tiny-vit", "none")
    assert boosted["score_estimate"] > plain["score_estimate"]
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", "sample:chelsea", "--encoder", "tiny-cnn", "--booster", str(trained), "--no-progress"])
    assert exit_info.value.code == 2
    assert "trained for tiny-vit" in capsys.readouterr().err


def test_cli_train_booster_takes_several_folders_and_sigmas(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train-booster", "--encoder", "tiny-cnn", "--image-size", "32", "--images", str(photos), str(photos / "more"),
            "--sigmas", "0.3", "0.6", "--fashion-share", "0", "--pixel-steps", "1", "--steps", "2", "--width", "8",
            "--mapper-hidden", "8", "--heads", "1", "--train-dtype", "float32", "--no-progress", "--out", str(tmp_path / "b")]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["sigmas"] == [0.3, 0.6] and summary["config"]["images"] == [str(photos), str(photos / "more")]
    assert json.loads((tmp_path / "b" / "booster.json").read_text())["sigmas"] == [0.3, 0.6]


@pytest.mark.slow
def test_the_shipped_booster_serves_both_sigmas() -> None:
    """Evaluation photos, never training images: at both σ the worst clean agreement of astronaut, coffee and
    rocket rises well above the encoder's own (docs/booster-card.md, 32 copies: 0.223 -> 0.842 at σ 0.25,
    -0.044 -> 0.706 at σ 0.5; the margin of 0.3 is far beyond 64 copies' Monte Carlo noise)."""
    assert "gsb-dinov2-s" in available_boosters()
    dinov2 = load_encoder("dinov2-s", image_size=112).requires_grad_(False)
    photos = [to_pixels(load_image(f"sample:{name}"), 112) for name in ("astronaut", "coffee", "rocket")]
    with torch.no_grad():
        clean = [dinov2(x[None])[0] for x in photos]
        for sigma in (0.25, 0.5):
            boosted = load_booster("gsb-dinov2-s", dinov2, sigma=sigma)
            worst = {
                name: min(
                    clean_agreement(smoothed_feature(e, x, sigma, n=64, seed=1, batch_size=64), c)
                    for x, c in zip(photos, clean)
                )
                for name, e in (("base", dinov2), ("boosted", boosted))
            }
            assert worst["boosted"] > worst["base"] + 0.3, (sigma, worst)
