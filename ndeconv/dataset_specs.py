"""The datasets ndeconv knows, as constants: labels, normalisation, where Debian installs them, and how the
authors' ``main.py`` reads each one. No torch here, so option parsing (``ndeconv train --help``) and the zoo's cards
read them without loading it; ``ndeconv.datasets`` re-exports every name with the readers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

__all__ = [
    "CIFAR10_LABELS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "IDX_IMAGE_SIZE",
    "IMAGENET_CROP_PCT",
    "DatasetSpec",
    "eval_crop_pct",
    "get_spec",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# The normalisation of the authors' main.py for CIFAR-10 (their transforms, not the often-quoted 0.247/0.243/0.261).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DatasetSpec:
    """How the reference (authors' ``main.py``) reads, augments and normalises one dataset."""

    name: str
    kind: str  # "idx", "cifar" or "imagefolder"
    num_classes: int | None  # None: the number of class folders
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0  # RandomCrop(size, padding) + RandomHorizontalFlip when > 0
    default_dir: str | None = None
    install_hint: str = ""
    label_names: tuple[str, ...] | None = None


DATASETS: dict[str, DatasetSpec] = {
    # The reference trains Fashion-MNIST on ToTensor() alone: no normalisation, no augmentation.
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "idx", 10, 1, (0.0,), (1.0,), default_dir=FASHION_MNIST_DIR,
        install_hint="install it with `apt-get install dataset-fashion-mnist`", label_names=FASHION_MNIST_LABELS,
    ),
    "mnist": DatasetSpec(
        "mnist", "idx", 10, 1, (0.1307,), (0.3081,), label_names=tuple(str(i) for i in range(10)),
    ),
    "cifar10": DatasetSpec(
        "cifar10", "cifar", 10, 3, CIFAR10_MEAN, CIFAR10_STD, crop_padding=4,
        label_names=CIFAR10_LABELS,
    ),
    "cifar100": DatasetSpec(
        "cifar100", "cifar", 100, 3, (0.5071, 0.4865, 0.4409), (0.2009, 0.1984, 0.2023), crop_padding=4,
    ),
    # The reference's downsampled-ImageNet settings: ImageNet statistics, crop padding log2(size) - 1.
    "imagefolder": DatasetSpec(
        "imagefolder", "imagefolder", None, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_padding=-1,
    ),
}


IDX_IMAGE_SIZE = 28  # MNIST's and Fashion-MNIST's images
# main_imagenet.py's evaluation: Resize(256) + CenterCrop(224), timm's crop_pct 0.875.
IMAGENET_CROP_PCT = 224 / 256


def eval_crop_pct(spec: DatasetSpec, img_size: int, imagenet_topology: bool = False) -> float:
    """timm's crop_pct for a run's pretrained_cfg: its eval transform Resize(img_size / crop_pct) +
    CenterCrop(img_size) then feeds the model what ``load_split`` does. 28x28 IDX images: Resize(28) +
    CenterCrop(32) is the 2-pixel zero border ``_load_idx`` adds (crop_pct 32/28; 1.0 would resize them up); an
    image folder for an ImageNet topology: main_imagenet.py's 0.875; otherwise 1.0."""
    if spec.kind == "idx":
        return img_size / IDX_IMAGE_SIZE
    if spec.kind == "imagefolder" and imagenet_topology:
        return IMAGENET_CROP_PCT
    return 1.0


def get_spec(name: str) -> DatasetSpec:
    key = name.lower().replace("-", "_")
    key = {"fashion": "fashion_mnist", "fashionmnist": "fashion_mnist"}.get(key, key)
    if key not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[key]
