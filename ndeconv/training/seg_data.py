"""Segmentation data for ``ndeconv train-seg``: Cityscapes- and VOC-layout folders, the authors' (torchvision's
reference) transforms and the confusion-matrix metrics.

- Cityscapes: ``leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png`` with
  ``gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png``; the 34 labelIds map to the 19 trainIds of the
  Cityscapes benchmark, every other id to 255 (ignored).
- VOC: ``JPEGImages/<name>.jpg``, ``SegmentationClass/<name>.png`` (palette images: the pixel value is the class,
  255 the ignored border) and ``ImageSets/Segmentation/{train,val}.txt``.

Labels at or above the run's number of classes (a smaller ``--num-classes`` than the dataset's) become 255 too.
Training transforms: RandomResize(0.5 * base, 2 * base) on the shorter side, horizontal flip (p 0.5), RandomCrop
(padded with 0 in the image and 255 in the mask where smaller), ImageNet normalisation; evaluation resizes the
shorter side to ``base``. Each sample's randomness comes from its own generator seeded by (seed, epoch, index),
so a run's batches are the same whatever the workers and wherever it resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from ..errors import UsageError

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_TRAIN_IDS",
    "IGNORE_INDEX",
    "SEG_DATASETS",
    "VOC_CLASSES",
    "ConfusionMatrix",
    "SegSample",
    "SegmentationFolder",
    "cityscapes_label_map",
    "find_pairs",
]

IGNORE_INDEX = 255
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
# The benchmark's labelId -> trainId (cityscapesScripts' labels.py); every id not listed is 255.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
SEG_DATASETS: dict[str, tuple[str, ...]] = {"cityscapes": CITYSCAPES_CLASSES, "voc": VOC_CLASSES}


def cityscapes_label_map() -> np.ndarray:
    """A 256-entry lookup table: labelId -> trainId (255 for the ids the benchmark ignores)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


@dataclass(frozen=True)
class SegSample:
    image: Path
    mask: Path


def _layout(dataset: str) -> str:
    if dataset == "cityscapes":
        return ("leftImg8bit/{train,val}/<city>/*_leftImg8bit.png with gtFine/{train,val}/<city>/"
                "*_gtFine_labelIds.png")
    return "JPEGImages/*.jpg, SegmentationClass/*.png and ImageSets/Segmentation/{train,val}.txt"


def find_pairs(dataset: str, root: str | Path, split: str) -> list[SegSample]:
    """The (image, mask) files of a split, sorted; a missing folder or file is one UsageError naming the layout."""
    if dataset not in SEG_DATASETS:
        raise UsageError(f"--dataset {dataset!r}: choose one of {', '.join(SEG_DATASETS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data-dir {root}: no such folder; it should hold the {dataset} layout ({_layout(dataset)})")
    if dataset == "cityscapes":
        images_dir, masks_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise UsageError(f"--data-dir {root}: no {folder.relative_to(root)} folder; a Cityscapes folder holds "
                                 f"{_layout(dataset)}")
        pairs = []
        for image in sorted(images_dir.glob("*/*_leftImg8bit.png")):
            stem = image.name.removesuffix("_leftImg8bit.png")
            mask = masks_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if not mask.is_file():
                raise UsageError(f"--data-dir {root}: {image.relative_to(root)} has no label file "
                                 f"{mask.relative_to(root)}; add it or remove the image")
            pairs.append(SegSample(image, mask))
    else:
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        for needed in (root / "JPEGImages", root / "SegmentationClass", listing):
            if not needed.exists():
                raise UsageError(f"--data-dir {root}: no {needed.relative_to(root)}; a VOC folder holds "
                                 f"{_layout(dataset)}")
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        pairs = []
        for name in names:
            image, mask = root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png"
            for needed in (image, mask):
                if not needed.is_file():
                    raise UsageError(f"--data-dir {root}: {listing.relative_to(root)} lists {name!r} but "
                                     f"{needed.relative_to(root)} is missing; add it or remove the line")
            pairs.append(SegSample(image, mask))
    if not pairs:
        raise UsageError(f"--data-dir {root}: the {split} split has no images; a {dataset} folder holds "
                         f"{_layout(dataset)}")
    return pairs


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's random transform: fixed by the run's seed, the epoch and the index."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


class SegmentationFolder(Dataset):
    """(normalised float image CxHxW, int64 mask HxW) pairs of one split, transformed as the authors' train.py
    does for ``train`` (``training=True``) or evaluation. ``epoch`` is set by the loop before each epoch."""

    def __init__(self, dataset: str, root: str | Path, split: str, num_classes: int, base_size: int,
                 crop_size: int, training: bool, seed: int = 0, limit: int | None = None):
        self.dataset, self.split = dataset, split
        self.samples = find_pairs(dataset, root, split)[:limit]
        self.num_classes, self.base_size, self.crop_size = num_classes, base_size, crop_size
        self.training, self.seed, self.epoch = training, seed, 0
        table = cityscapes_label_map() if dataset == "cityscapes" else np.arange(256, dtype=np.uint8)
        table = table.copy()
        table[(table >= num_classes) & (table != IGNORE_INDEX)] = IGNORE_INDEX
        self.table = table

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image (uint8 3xHxW) and its mask of class indices (uint8 1xHxW, 255 ignored), untransformed."""
        from PIL import Image

        sample = self.samples[index]
        try:
            with Image.open(sample.image) as img:
                image = np.asarray(img.convert("RGB"))
            with Image.open(sample.mask) as msk:
                if msk.mode not in ("P", "L", "I", "I;16"):
                    raise UsageError(f"{sample.mask}: a {msk.mode} image; the labels must be one class index per "
                                     "pixel (a palette or grayscale PNG)")
                mask = np.asarray(msk)
        except OSError as err:
            raise UsageError(f"cannot read {sample.image.name} / {sample.mask.name}: {err}") from err
        if mask.shape != image.shape[:2]:
            raise UsageError(f"{sample.mask}: {mask.shape[1]}x{mask.shape[0]} labels for a "
                             f"{image.shape[1]}x{image.shape[0]} image; they must be the same size")
        mask = self.table[np.clip(mask, 0, 255).astype(np.uint8)]
        return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask.copy())[None]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read(index)
        if self.training:
            image, mask = train_transform(image, mask, self.base_size, self.crop_size,
                                          sample_generator(self.seed, self.epoch, index))
        else:
            image, mask = _resize(image, mask, self.base_size)
        return normalize(image), mask[0].long()


def _resize(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shorter side to ``size`` (bilinear image, nearest mask), as the reference's RandomResize."""
    return (TF.resize(image, [size], interpolation=InterpolationMode.BILINEAR, antialias=True),
            TF.resize(mask, [size], interpolation=InterpolationMode.NEAREST))


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """A uniform integer in [low, high] (both included, as Python's random.randint)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def train_transform(image: torch.Tensor, mask: torch.Tensor, base_size: int, crop_size: int,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResize(0.5 base, 2 base), RandomHorizontalFlip(0.5), RandomCrop(crop) padded 0 / 255."""
    image, mask = _resize(image, mask, _randint(int(0.5 * base_size), int(2.0 * base_size), g))
    if float(torch.rand((), generator=g)) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    h, w = image.shape[-2:]
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    if pad_h or pad_w:  # right and bottom, as the reference's pad_if_smaller
        image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
        mask = TF.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
        h, w = image.shape[-2:]
    top, left = _randint(0, h - crop_size, g), _randint(0, w - crop_size, g)
    return (image[:, top:top + crop_size, left:left + crop_size],
            mask[:, top:top + crop_size, left:left + crop_size])


def normalize(image: torch.Tensor) -> torch.Tensor:
    return TF.normalize(image.float() / 255.0, list(MEAN), list(STD))


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a batch, padding smaller samples (right and bottom) with 0 in the images and 255 in the masks."""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], h, w)
    masks = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.long)
    for i, (img, msk) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        masks[i, : msk.shape[-2], : msk.shape[-1]] = msk
    return images, masks


class ConfusionMatrix:
    """Pixel counts ``mat[target, prediction]`` over the pixels whose target is a class (255 is skipped), and what
    torchvision's reference ``ConfusionMatrix.compute`` reports from it: global pixel accuracy, per-class accuracy
    and IoU, and their mean. A class absent from both the targets and the predictions has no IoU (0/0): None
    here (torchvision's NaN), and the mean IoU is over the classes that have one."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        n = self.num_classes
        target, prediction = target.flatten().to(torch.int64), prediction.flatten().to(torch.int64)
        keep = (target >= 0) & (target < n)
        counts = torch.bincount(n * target[keep] + prediction[keep], minlength=n * n)
        self.mat += counts.reshape(n, n).cpu()

    def compute(self) -> dict[str, object]:
        h = self.mat.double()
        diag, rows, cols = torch.diag(h), h.sum(1), h.sum(0)
        total = h.sum()
        union = rows + cols - diag
        iou = [None if u == 0 else float(d / u) * 100 for d, u in zip(diag, union, strict=True)]
        acc = [None if r == 0 else float(d / r) * 100 for d, r in zip(diag, rows, strict=True)]
        present = [v for v in iou if v is not None]
        return {
            "pixel_acc": float(diag.sum() / total) * 100 if total > 0 else None,
            "miou": sum(present) / len(present) if present else None,
            "iou": iou,
            "class_acc": acc,
        }
