"""Batches for ``ndeconv train`` and ``ndeconv eval`` from the datasets of ``ndeconv.datasets``.

An image folder decodes its files per batch (in DataLoader workers with ``--num-workers``). Augmentation and
normalisation run batched on float
tensors (``Preprocess``), with a generator derived from (seed, epoch, step, rank): a resumed run sees the same
crops and flips as an uninterrupted one without any sampler or worker state to save.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..datasets import DatasetSpec, ImageSource, TensorSource
from ..errors import UsageError

__all__ = ["Preprocess", "batch_loader", "default_crop_padding", "epoch_batches", "eval_batches"]


class Preprocess:
    """uint8 batch -> normalised float batch, with the reference's RandomCrop(padding) + horizontal flip in
    training. Random choices come from a generator seeded by (seed, epoch, step, rank)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 0):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_padding = crop_padding

    @staticmethod
    def seed(seed: int, epoch: int, step: int, rank: int, stream: str = "") -> int:
        """The seed of one batch's random choices; ``stream`` names another use of the same batch (``decode``:
        an image folder's RandomResizedCrop) so that it draws apart from this one's crops and flips."""
        digest = hashlib.sha256(f"{seed}:{epoch}:{step}:{rank}{stream}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    @staticmethod
    def generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed(Preprocess.seed(seed, epoch, step, rank))

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if generator is not None and self.crop_padding > 0:
            x = self._crop_flip(x, self.crop_padding, generator)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @staticmethod
    def _crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        padded = F.pad(x, (pad, pad, pad, pad))  # zero fill in pixel space, as torchvision's RandomCrop
        rows = (offsets[:, 0, None] + torch.arange(h)).view(n, 1, h, 1)
        cols = offsets[:, 1, None] + torch.arange(w)
        cols = torch.where(flips[:, None], cols.flip(1), cols).view(n, 1, 1, w)
        batch = torch.arange(n).view(n, 1, 1, 1)
        chans = torch.arange(x.shape[1]).view(1, -1, 1, 1)
        return padded[batch, chans, rows, cols]


def default_crop_padding(spec: DatasetSpec, img_size: int) -> int:
    if spec.crop_padding >= 0:
        return spec.crop_padding
    return max(int(torch.tensor(float(img_size)).log2()) - 1, 0)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """This rank's shuffled batches of one epoch (DistributedSampler's order; one rank is the plain shuffle)."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    return list(order.split(batch_size))


def eval_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """This rank's share of the test set, in order and without the padding a DistributedSampler adds (each image
    is counted exactly once when the ranks' sums are added)."""
    return list(torch.arange(rank, n, world).split(batch_size))


class _Batches(Dataset):
    def __init__(self, source: ImageSource, batches: list[torch.Tensor], seeds: Sequence[int] | None):
        self.source, self.batches, self.seeds = source, batches, seeds

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | str, torch.Tensor | None]:
        idx = self.batches[i]
        try:
            return self.source.batch(idx, None if self.seeds is None else self.seeds[i]), self.source.labels[idx]
        except UsageError as err:
            # DataLoader re-raises a worker's exception with the worker's traceback in its text; carry the one-line
            # message back as data and raise it in the main process instead.
            return str(err), None


def batch_loader(
    source: ImageSource, batches: list[torch.Tensor], num_workers: int = 0, seeds: Sequence[int] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels) for the given index batches, in order; workers only fetch and decode.
    ``seeds`` (one per batch) seed the augmentation a source applies as it decodes (``ImageSource.batch``)."""
    if num_workers <= 0 or isinstance(source, TensorSource):
        for i, idx in enumerate(batches):
            yield source.batch(idx, None if seeds is None else seeds[i]), source.labels[idx]
        return
    for images, labels in DataLoader(_Batches(source, batches, seeds), batch_size=None, num_workers=num_workers,
                                     persistent_workers=False):
        if labels is None:
            raise UsageError(images)
        yield images, labels
