"""Shared checks of the reward contract, used by every reward's tests."""

from __future__ import annotations

import torch


def make_images(batch: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth, varied test images (B, 3, size, size) in [0, 1]: gradients, stripes and a disc per image."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(batch):
        a, b, c = torch.rand(3, generator=g)
        r = (xs * a + ys * (1 - a)).clamp(0, 1)
        gch = 0.5 + 0.5 * torch.sin(2 * torch.pi * (3 + 5 * b) * xs)
        disc = (((xs - c) ** 2 + (ys - 0.5) ** 2) < 0.05).float()
        bch = (0.3 * disc + 0.7 * ys * b).clamp(0, 1)
        out.append(torch.stack([r, gch, bch]))
    return torch.stack(out)


def check_reward_contract(reward, images: torch.Tensor, prompts: list[str], **metadata) -> torch.Tensor:
    """Shape (B,), float32, finite, deterministic, chunked == unchunked, gradients reach pixels iff differentiable."""
    batch = images.shape[0]
    with torch.no_grad():
        scores = reward(images, prompts, **metadata)
        again = reward(images, prompts, **metadata)
    assert scores.shape == (batch,), scores.shape
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all(), scores
    assert torch.equal(scores, again), "reward is not deterministic"
    assert isinstance(reward.name, str) and reward.name

    saved = reward.batch_size
    try:
        reward.batch_size = 1
        with torch.no_grad():
            chunked = reward(images, prompts, **metadata)
        reward.batch_size = 3 if batch > 3 else 2
        with torch.no_grad():
            chunked3 = reward(images, prompts, **metadata)
    finally:
        reward.batch_size = saved
    torch.testing.assert_close(chunked, scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked3, scores, rtol=1e-5, atol=1e-5)

    pixels = images.clone().requires_grad_(True)
    out = reward(pixels, prompts, **metadata)
    if reward.differentiable:
        assert out.requires_grad, "a differentiable reward must keep the graph to the images"
        out.sum().backward()
        assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    else:
        assert not out.requires_grad, "a score-only reward must return a detached tensor"
    return scores


def finite_difference_check(
    reward, images: torch.Tensor, prompts: list[str], eps: float = 1e-2, n_dirs: int = 3, seed: int = 0
):
    """Directional derivatives from autograd agree with central differences (float64 not required: loose tolerance).

    ``eps`` 1e-2: with float32 scores of tens (PickScore's logit scale), smaller steps lose a small derivative in
    rounding; the exact check is the float64 one in each reward's tests."""
    g = torch.Generator().manual_seed(seed)
    x = images.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    for _ in range(n_dirs):
        d = torch.randn(images.shape, generator=g)
        d = d / d.norm()
        with torch.no_grad():
            plus = reward((images + eps * d), prompts).sum()
            minus = reward((images - eps * d), prompts).sum()
        numeric = (plus - minus) / (2 * eps)
        analytic = (x.grad * d).sum()
        assert torch.isclose(analytic, numeric, rtol=5e-2, atol=1e-4), (analytic.item(), numeric.item())
