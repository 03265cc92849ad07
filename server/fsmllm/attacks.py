"""White-box l2 attacks on (smoothed) encoders, used to test certificates and to evaluate robustness.

:func:`pgd_l2` is projected gradient descent in the l2 ball of radius ε around x intersected with the pixel
box [0, 1] (Madry et al. 2018), with normalised-gradient steps. :func:`feature_space_attack` applies it to
any objective of the feature the defence hands on: the base encoder's, or the smoothed encoder's estimated with
a fixed number of noise samples per step (expectation over transformation, Athalye et al. 2018).
:func:`feature_attack` is the untargeted goal (the cosine between clean and perturbed features),
:func:`token_attack` its per-token form (the worst token's cosine); the targeted-answer goal (a language model's
cross-entropy of a chosen answer) is in :mod:`fsmllm.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fsmllm.certify import Encode


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale ``delta`` back onto the l2 ball of radius ``eps`` (a single perturbation, any shape)."""
    norm = delta.norm()
    return delta if norm <= eps else delta * (eps / norm)


def pgd_l2(
    loss: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    seed: int = 0,
    restarts: int = 1,
) -> torch.Tensor:
    """Minimise ``loss(x')`` over ``||x' − x||₂ ≤ eps``, ``x' ∈ [0, 1]``; returns the best x' found.

    Starts from a random point of the ball; each step moves by ``step_size`` (default 2.5 ε / steps) along
    the normalised gradient, then projects on the ball and the box. ``restarts`` > 1 repeats this from fresh
    random starts and keeps the best point over all of them: a single start can stall in a poor local
    minimum (on DINOv2-S at ε = 1, one start in four stops at a cosine of 0.81 where the others reach −0.14).
    """
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be at least 1, got steps={steps}, restarts={restarts}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("the clean image x must have pixels in [0, 1] (the attack stays in that box)")
    if eps <= 0:
        return x.clone()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    generator = torch.Generator(device=x.device).manual_seed(seed)
    best, best_loss = x.clone(), float("inf")
    for _ in range(restarts):
        start = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = project_l2(start * eps / start.norm() * 0.5, eps)
        for _ in range(steps):
            delta = delta.detach().requires_grad_(True)
            value = loss((x + delta).clamp(0, 1))
            if float(value.detach()) < best_loss:
                best_loss, best = float(value.detach()), (x + delta).clamp(0, 1).detach()
            (grad,) = torch.autograd.grad(value, delta)
            with torch.no_grad():
                delta = delta - step_size * grad / grad.norm().clamp_min(1e-12)
                delta = project_l2((x + delta).clamp(0, 1) - x, eps)
        with torch.no_grad():
            final = (x + delta).clamp(0, 1)
            final_loss = float(loss(final))
        if final_loss < best_loss:
            best_loss, best = final_loss, final
    return best


def unit_features(encode: Encode, batch: torch.Tensor) -> torch.Tensor:
    """Flattened, L2-normalised features [B, D] (the certified feature space)."""
    return F.normalize(encode(batch).reshape(batch.shape[0], -1).float(), dim=1)


def feature_space_attack(
    encode: Encode,
    x: torch.Tensor,
    eps: float,
    objective: Callable[[torch.Tensor], torch.Tensor],
    sigma: float | None = None,
    samples: int = 8,
    steps: int = 20,
    seed: int = 0,
    restarts: int = 1,
) -> torch.Tensor:
    """PGD (:func:`pgd_l2`) minimising ``objective`` of the feature of x' the defence hands on.

    Without ``sigma`` that is the base encoder's unit feature u(f(x')); with it, the smoothed feature
    F(x') = E[u(f(x' + δ))], estimated at each step from ``samples`` fresh noisy copies (expectation over the
    noise). ``objective`` maps the flattened feature [D] to a scalar.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def loss(candidate: torch.Tensor) -> torch.Tensor:
        return objective(unit_features(encode, noisy_copies(candidate, sigma, samples, generator)).mean(0))

    return pgd_l2(loss, x, eps, steps=steps, seed=seed, restarts=restarts)


def noisy_copies(image: torch.Tensor, sigma: float | None, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` copies x + σδ [count, ...] (δ standard normal from ``generator``); just [x] without ``sigma``."""
    if sigma is None:
        return image[None]
    noise = torch.randn((count, *image.shape), generator=generator, device=image.device, dtype=image.dtype)
    return image[None] + sigma * noise


def feature_attack(
    encode: Encode,
    x: torch.Tensor,
    eps: float,
    sigma: float | None = None,
    samples: int = 8,
    steps: int = 20,
    seed: int = 0,
    restarts: int = 1,
) -> torch.Tensor:
    """Untargeted feature-distortion attack: push the (smoothed) feature of x' away from that of x.

    Without ``sigma`` the base encoder is attacked. With it, each step estimates the smoothed feature of x'
    from ``samples`` fresh noisy copies (expectation over the noise) and minimises its cosine with the
    smoothed feature of x, estimated once from ``4 * samples`` copies. ``restarts``: see :func:`pgd_l2`.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed + 1)
    with torch.no_grad():
        clean = unit_features(encode, noisy_copies(x, sigma, 4 * samples, generator)).mean(0)
    return feature_space_attack(
        encode,
        x,
        eps,
        lambda feature: F.cosine_similarity(feature, clean, dim=0),
        sigma,
        samples,
        steps,
        seed,
        restarts,
    )


def token_features(encode: Encode, batch: torch.Tensor) -> torch.Tensor:
    """Each token L2-normalised on its own, [B, T, W] (the feature space of token-level certificates); a single
    vector [B, D] is one token."""
    features = encode(batch).float()
    return F.normalize(features.reshape(batch.shape[0], features.shape[1] if features.ndim == 3 else 1, -1), dim=2)


def worst_token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """min over tokens t of cos(a_t, b_t), for per-token features [T, W]."""
    return F.cosine_similarity(a, b, dim=-1).min()


def token_attack(
    encode: Encode,
    x: torch.Tensor,
    eps: float,
    sigma: float,
    samples: int = 8,
    steps: int = 20,
    seed: int = 0,
    restarts: int = 1,
) -> torch.Tensor:
    """Per-token goal: PGD minimising the *worst token's* cosine between the smoothed per-token features of x'
    and of x, min_t cos(F_t(x'), F_t(x)), each estimated with fresh noisy copies (expectation over the noise);
    what a token-level certificate bounds. The minimum's subgradient follows the currently worst token."""
    generator = torch.Generator(device=x.device).manual_seed(seed + 1)
    with torch.no_grad():
        clean = token_features(encode, noisy_copies(x, sigma, 4 * samples, generator)).mean(0)

    def loss(candidate: torch.Tensor) -> torch.Tensor:
        return worst_token_cosine(
            token_features(encode, noisy_copies(candidate, sigma, samples, generator)).mean(0), clean
        )

    return pgd_l2(loss, x, eps, steps=steps, seed=seed, restarts=restarts)


def smoothed_feature(
    encode: Encode, x: torch.Tensor, sigma: float, n: int, seed: int = 0, batch_size: int = 64, per_token: bool = False
) -> torch.Tensor:
    """Monte Carlo estimate of ``F(x) = E[f̃(x + δ)]`` [D] from ``n`` samples (for observing attacks); with
    ``per_token`` each token's ``F_t(x)`` [T, W] (every token normalised on its own)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    features = token_features if per_token else unit_features
    total = torch.zeros((), device=x.device)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            noise = torch.randn((count, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
            total = total + features(encode, x[None] + sigma * noise).sum(0)
    return total / n


def vote_attack(
    encode: Encode,
    x: torch.Tensor,
    eps: float,
    objective: Callable[[torch.Tensor], torch.Tensor],
    sigma: float,
    samples: int = 8,
    steps: int = 20,
    seed: int = 0,
) -> torch.Tensor:
    """PGD (:func:`pgd_l2`) against a *smoothed classifier* (the votes of a certified answer): each step draws
    ``samples`` fresh noisy copies of x' and minimises ``objective`` of their unit features [samples, D] (each
    vote reads one copy: e.g. the mean cross-entropy of a wrong answer over the votes), the expectation over the
    noise of the per-vote loss rather than a loss of the mean feature."""
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def loss(candidate: torch.Tensor) -> torch.Tensor:
        return objective(unit_features(encode, noisy_copies(candidate, sigma, samples, generator)))

    return pgd_l2(loss, x, eps, steps=steps, seed=seed)
