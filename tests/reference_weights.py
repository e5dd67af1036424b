"""Seeded weights for a state_dict layout, the same wherever they are made: ``scripts/reference_logits.py`` fills the
authors' models with them before recording their outputs, and the tests fill the authors'-format checkpoints they
convert with the same values, so the big ImageNet and segmentation models need no weights in the repository.

Each tensor comes from a generator seeded by its key (sha256), so the values do not depend on the order of the
keys. The values are a plausible trained state: He-scaled weights, biases and norm affine near their usual values,
whitening matrices near the identity, positive variances."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["sampled_indices", "seeded_input", "seeded_state_dict", "seeded_tensor"]


def _generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))


def seeded_tensor(key: str, shape: Sequence[int]) -> torch.Tensor:
    """The value of state_dict entry ``key``: float64 holding float32 values (a model built in float32 stores them
    exactly, so a conversion into one loses nothing); ``num_batches_tracked`` an int64 10."""
    value = _seeded_value(key, shape)
    return value if not value.is_floating_point() else value.float().double()


def _seeded_value(key: str, shape: Sequence[int]) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    shape = tuple(int(s) for s in shape)
    if name == "num_batches_tracked":
        return torch.tensor(10, dtype=torch.long)
    g = _generator(key)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    if name == "running_deconv":  # (d, d) or (groups, d, d): near the identity
        eye = torch.eye(shape[-1], dtype=torch.float64).expand(shape)
        return eye + 0.05 * noise
    if name == "running_var":
        return 1.0 + 0.2 * noise.abs()
    if name.startswith("running_mean"):
        return 0.1 * noise
    if name == "weight" and len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return noise * math.sqrt(2.0 / fan_in)
    if name == "weight":  # a norm's scale
        return 1.0 + 0.1 * noise
    return 0.1 * noise  # biases, norm shifts


def seeded_state_dict(shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    return {key: seeded_tensor(key, shape) for key, shape in shapes.items()}


def seeded_input(name: str, shape: Sequence[int]) -> torch.Tensor:
    """A seeded float64 image batch with neighbouring pixels correlated (blurred noise), as real images are."""
    x = torch.rand(tuple(shape), generator=_generator(f"input:{name}"), dtype=torch.float64)
    kernel = torch.ones(shape[1], 1, 3, 3, dtype=torch.float64) / 9
    return torch.nn.functional.conv2d(x, kernel, padding=1, groups=shape[1]) * 2 - 1


def sampled_indices(name: str, numel: int, count: int = 2048) -> torch.Tensor:
    """Seeded flat positions of a large output (a segmentation map) at which its values are recorded."""
    return torch.randint(0, numel, (count,), generator=_generator(f"sample:{name}"))
