"""Inputs for checking a converted model: seeded random batches and real Fashion-MNIST test images."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fashion_mnist_batch", "random_batch"]


def random_batch(batch: int, input_size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A standard-normal float32 batch (normalised inputs are roughly that); ``input_size`` is (C, H, W), (C, L)
    for a 1-D model or (C, D, H, W) for a 3-D one."""
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))


def fashion_mnist_batch(
    count: int, input_size: tuple[int, int, int], mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> torch.Tensor | None:
    """The first ``count`` Fashion-MNIST test images as ``ndeconv train`` feeds them (zero-padded to 32x32,
    scaled to [0, 1]), resized to ``input_size`` and normalised with the model's ``mean``/``std`` if given.

    None when the model does not take one channel or the data is not installed (Debian's dataset-fashion-mnist).
    """
    from ndeconv.datasets import load_split
    from ndeconv.errors import UsageError

    channels, height, width = input_size
    if channels != 1:
        return None
    try:
        source = load_split("fashion_mnist", "test")
    except UsageError:
        return None
    images = source.batch(torch.arange(min(count, len(source)))).float() / 255.0
    if images.shape[-2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    if mean and std and len(mean) == len(std) == 1:
        images = (images - mean[0]) / std[0]
    return images
