"""The datasets ndeconv knows, read from local files only (nothing is downloaded): their constants (labels,
normalisation, where Debian installs them) and readers that turn each split into an ``ImageSource``.

Every dataset becomes an ``ImageSource``: labels known up front (so a label out of range fails before any
training) and ``batch(indices)`` returning uint8 images of one fixed size. Fashion-MNIST, MNIST and CIFAR are
decoded once into one uint8 tensor, so a batch is a single index op; an image folder decodes its files per
batch. This is the one module of dataset constants: the zoo's cards, the converter's verification batches and
``ndeconv train``/``eval`` all read them here.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import UsageError

__all__ = [
    "CIFAR10_LABELS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "FASHION_MNIST_LABELS",
    "IDX_IMAGE_SIZE",
    "IMAGENET_CROP_PCT",
    "DatasetSpec",
    "ImageSource",
    "eval_crop_pct",
    "folder_name",
    "get_spec",
    "load_split",
    "random_resized_crop_box",
    "read_class_map",
    "read_idx",
]

from .dataset_specs import (  # noqa: F401 - re-exported: this module's constants live there, torch-free
    CIFAR10_LABELS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    IDX_IMAGE_SIZE,
    IMAGENET_CROP_PCT,
    DatasetSpec,
    eval_crop_pct,
    get_spec,
)


class ImageSource(Dataset):
    """A split of a dataset: ``labels`` (int64, N) and ``batch(indices)`` -> uint8 images (B, C, H, W).

    ``batch(indices, seed)``: a source whose random augmentation happens as it decodes (an image folder's
    RandomResizedCrop) draws it from ``seed``; the others ignore it."""

    labels: torch.Tensor
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def batch(self, indices: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def subset(self, count: int | None) -> ImageSource:
        """The first ``count`` images (``--train-subset``/``--test-subset``), or all of them."""
        if count is not None and count < 0:
            raise ValueError(f"a subset needs a count >= 0, got {count}")  # [:-1] would silently drop one image
        if count is None or count >= len(self):
            return self
        return _Subset(self, count)


class TensorSource(ImageSource):
    """Images decoded once into memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str] | None = None):
        self.images, self.labels = images, labels
        self.class_names = tuple(class_names) if class_names else None

    def batch(self, indices: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return self.images[indices]


class _Subset(ImageSource):
    def __init__(self, source: ImageSource, count: int):
        self.source, self.labels, self.class_names = source, source.labels[:count], source.class_names

    def batch(self, indices: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        return self.source.batch(indices, seed)


# -- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


# An IDX file's body may hold at most this many bytes: ten times the largest file of the MNIST family (EMNIST's
# 0.7 GB), so a crafted header (dimensions whose product overflows, a gzip bomb) is refused before any body is read.
_IDX_MAX_BYTES = 8 * 2**30
_IDX_MAX_NDIM = 4  # images (N, H, W) and labels (N) of the ubyte format; 4 leaves room for (N, H, W, C)


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (ubyte data only, as MNIST ships) as a uint8 tensor of the shape its header gives.

    The header is validated before the body is read, and no more body is read (or decompressed, for .gz) than the
    header promises plus one byte: a crafted file costs nothing but its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0:2] != b"\x00\x00" or magic[2] != 0x08:
                raise UsageError(f"{path}: not an unsigned-byte IDX file (bad magic number); use the original MNIST "
                                 "files")
            ndim = magic[3]
            if not 1 <= ndim <= _IDX_MAX_NDIM:
                raise UsageError(f"{path}: its header gives {ndim} dimensions (an IDX image or label file has 1 to "
                                 f"{_IDX_MAX_NDIM}); the file is damaged or not MNIST data")
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise UsageError(f"{path}: the header ends early; the file is truncated")
            shape = struct.unpack(f">{ndim}I", dims)
            size = math.prod(shape)  # Python's integers: no overflow
            if size == 0:
                raise UsageError(f"{path}: its header gives the shape {shape}, which holds no data; use a file with "
                                 "images in it")
            if size > _IDX_MAX_BYTES:
                raise UsageError(f"{path}: its header gives the shape {shape} ({size:,} bytes), more than an IDX "
                                 f"dataset holds (at most {_IDX_MAX_BYTES:,}); the file is damaged or crafted")
            body = f.read(size + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UsageError(f"{path}: cannot read it ({err}); the file is truncated or not an IDX file") from err
    if len(body) != size:
        what = "truncated" if len(body) < size else "longer than its header says"
        raise UsageError(f"{path}: its header says {4 + 4 * ndim + size} bytes but the file holds "
                         f"{'more' if len(body) > size else 4 + 4 * ndim + len(body)}; the file is {what}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _load_idx(spec: DatasetSpec, folder: Path, split: str, size: int = 32) -> TensorSource:
    image_stem, label_stem = _IDX_FILES[split]
    # Some mirrors use dots ("train-images.idx3-ubyte").
    image_path = _find(folder, (image_stem, image_stem.replace("-idx", ".idx")))
    label_path = _find(folder, (label_stem, label_stem.replace("-idx", ".idx")))
    if image_path is None or label_path is None:
        raise _missing(spec, folder, f"{image_stem}[.gz] and {label_stem}[.gz]")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UsageError(f"{image_path}, {label_path}: expected N images of HxW and N labels, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    # 28x28 -> 32x32 with a zero (background) border: the zoo's CIFAR topology pools a 4x4 final map; the MNIST
    # models (mlp, simple_*) take the 28x28 images as they are (size 28), as the authors' main.py feeds them.
    if size < images.shape[1] or size < images.shape[2]:
        raise UsageError(f"{spec.name}: its images are {images.shape[1]}x{images.shape[2]}, larger than the image "
                         f"size {size}; pass --img-size {max(images.shape[1:])} or more (they are zero-padded)")
    pad_h, pad_w = size - images.shape[1], size - images.shape[2]
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return TensorSource(images.unsqueeze(1).contiguous(), labels.long(), spec.label_names)


# -- CIFAR python batches -------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else, and refusing every
    other global means a crafted file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")


def _read_cifar_batch(path: Path) -> dict[str, object]:
    try:
        raw = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as err:
        raise UsageError(f"{path}: not a CIFAR python batch ({err}); use the 'python version' archive") from err
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _load_cifar(spec: DatasetSpec, folder: Path, split: str) -> TensorSource:
    import numpy as np

    sub = "cifar-10-batches-py" if spec.name == "cifar10" else "cifar-100-python"
    if (folder / sub).is_dir():
        folder = folder / sub
    if spec.name == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    else:
        names, label_key = [split], "fine_labels"
    paths = [folder / n for n in names]
    if not all(p.is_file() for p in paths):
        raise _missing(spec, folder, ", ".join(names))
    images, labels = [], []
    for path in paths:
        batch = _read_cifar_batch(path)
        if "data" not in batch or label_key not in batch:
            raise UsageError(f"{path}: has no 'data'/'{label_key}' entries; is it a {spec.name} batch?")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[label_key]) != data.shape[0]:
            raise UsageError(f"{path}: expected N x 3072 bytes and N labels, got {data.shape}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.as_tensor(np.asarray(batch[label_key], dtype=np.int64)))
    return TensorSource(torch.cat(images), torch.cat(labels), spec.label_names)


# -- image folder ---------------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def random_resized_crop_box(
    width: int, height: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` drawn from ``generator`` (the same draws, in the same order,
    so a generator seeded as torch's global one gives the same crop): (left, top, right, bottom)."""
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return left, top, left + w, top + h
    # Fallback: the whole image, cut to the nearest aspect ratio of the range, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


class FolderSource(ImageSource):
    """``root/<class>/<image>`` decoded per batch to ``size`` x ``size``.

    ``crop_pct`` (evaluation, timm's meaning): the shorter side resized to ``size / crop_pct``, then the centre
    ``size`` x ``size`` (1.0: resize and centre-crop, the CIFAR-style folders; 0.875: main_imagenet.py's
    Resize(256) + CenterCrop(224)). ``random_resized_crop`` (training an ImageNet topology, as main_imagenet.py):
    torchvision's RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, drawn from the
    batch's seed."""

    def __init__(self, files: list[Path], labels: list[int], class_names: Sequence[str], size: int, in_chans: int,
                 crop_pct: float = 1.0, random_resized_crop: bool = False):
        self.files, self.size, self.in_chans = files, size, in_chans
        self.crop_pct, self.random_resized_crop = crop_pct, random_resized_crop
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.class_names = tuple(class_names)

    def _decode(self, path: Path, generator: torch.Generator | None) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.in_chans == 1 else "RGB")
                img = self._random_crop(img, generator) if generator is not None else self._centre_crop(img)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except OSError as err:
            raise UsageError(f"{path}: cannot decode the image ({err}); remove or replace it") from err
        return data.reshape(self.size, self.size, self.in_chans).permute(2, 0, 1)

    def _centre_crop(self, img: Any) -> Any:
        from PIL import Image, ImageOps

        if self.crop_pct == 1.0:
            return ImageOps.fit(img, (self.size, self.size), method=Image.Resampling.BILINEAR)
        short = int(self.size / self.crop_pct)  # timm's eval transform: Resize(int(size / crop_pct)), CenterCrop
        w, h = img.size
        # torchvision's Resize(int) of a PIL image: the shorter side to ``short``, the longer truncated in scale.
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, Image.Resampling.BILINEAR)
        left, top = int(round((size[0] - self.size) / 2.0)), int(round((size[1] - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))  # zero fill where it overhangs

    def _random_crop(self, img: Any, generator: torch.Generator) -> Any:
        from PIL import Image

        left, top, right, bottom = random_resized_crop_box(img.size[0], img.size[1], generator)
        img = img.crop((left, top, right, bottom)).resize((self.size, self.size), Image.Resampling.BILINEAR)
        if bool(torch.rand(1, generator=generator) < 0.5):  # RandomHorizontalFlip's draw, after the crop's
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def batch(self, indices: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed) if self.random_resized_crop and seed is not None else None
        return torch.stack([self._decode(self.files[i], generator) for i in indices.tolist()])


def _load_imagefolder(
    spec: DatasetSpec, folder: Path, split: str, img_size: int, num_classes: int | None,
    class_names: Sequence[str] | None = None, crop_pct: float = 1.0, random_resized_crop: bool = False,
) -> FolderSource:
    names = ("train",) if split == "train" else ("val", "test", "validation")
    root = next((folder / n for n in names if (folder / n).is_dir()), None)
    if root is None:
        raise UsageError(f"imagefolder: no {' or '.join(names)} folder in {folder}; lay it out as "
                         f"{folder}/train/<class>/<image> and {folder}/val/<class>/<image>")
    # Class indices come from the model's recorded label names (or a --class-map), else the training folder, so
    # train and val agree even if val lacks a class; val's own folders alone would shift every label after a
    # missing class.
    train_root = folder / "train" if (folder / "train").is_dir() else root
    if class_names:
        classes, known = list(class_names), "the model's recorded label_names"
    else:
        classes, known = sorted(p.name for p in train_root.iterdir() if p.is_dir()), f"the training folder {train_root}"
    if not classes:
        raise UsageError(f"imagefolder: {train_root} has no class folders; put images in {train_root}/<class>/")
    guessed = not class_names and split != "train" and train_root == root
    if guessed and num_classes is not None and len(classes) < num_classes:
        raise UsageError(f"imagefolder: {root} has {len(classes)} class folders for a {num_classes}-class model and "
                         f"no {folder}/train/ to say which label each is; add train/ (its class folders, even empty) "
                         "or evaluate a model whose config.json records label_names")
    index = {c: i for i, c in enumerate(classes)}
    if class_names:
        # A label that cannot be a folder name (Fashion-MNIST's "t-shirt/top") matches its folder-safe form, the
        # one the shipped class_map.txt lists ("t-shirt_top").
        for i, c in enumerate(classes):
            index.setdefault(folder_name(c), i)
    files, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if class_dir.name not in index:
            raise UsageError(f"imagefolder: {class_dir} is a class {known} lacks, so its label is out of range; "
                             "add the class there (or to --class-map) or remove the folder")
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file():
                files.append(path)
                labels.append(index[class_dir.name])
    if not files:
        raise UsageError(f"imagefolder: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
    if num_classes is not None and len(classes) > num_classes:
        raise UsageError(f"imagefolder: {train_root} has {len(classes)} class folders but --num-classes is "
                         f"{num_classes}, so labels {num_classes}..{len(classes) - 1} are out of range; "
                         "raise --num-classes or remove folders")
    return FolderSource(files, labels, classes, img_size, spec.in_chans, crop_pct, random_resized_crop)


def read_class_map(path: str | Path) -> tuple[str, ...]:
    """The class folder names of timm's ``--class-map`` text file, in class-index order (line i names class i),
    as ``timm.data`` reads it; a shipped weights folder has one (``class_map.txt``)."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        raise UsageError(f"--class-map {path}: only timm's text format is read (one class folder name per line, "
                         "line i for class i; nothing is unpickled): write it as a .txt file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--class-map {path}: cannot read it ({err}); give a text file, one class folder name "
                         "per line") from err
    names = tuple(line.strip() for line in lines)
    if not names or any(not n for n in names):
        raise UsageError(f"--class-map {path}: {'is empty' if not names else 'has a blank line'}; write one class "
                         "folder name per line, line i for class i, no blank lines")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--class-map {path}: names {', '.join(repeated)} more than once; each class folder once")
    return names


# -- entry points ---------------------------------------------------------------------------------------------


def _missing(spec: DatasetSpec, folder: Path, what: str) -> UsageError:
    hint = f"{spec.install_hint}, or " if spec.install_hint and str(folder) == spec.default_dir else ""
    return UsageError(f"{spec.name}: looked for {what} in {folder} and did not find them; "
                      f"{hint}point --data-dir to a folder that has them (nothing is downloaded)")


def resolve_data_dir(spec: DatasetSpec, data_dir: str | None) -> Path:
    if data_dir:
        path = Path(data_dir).expanduser()
    elif spec.default_dir:
        path = Path(spec.default_dir)
    else:
        raise UsageError(f"{spec.name}: no default location; pass --data-dir with the dataset's files")
    if not path.is_dir():
        hint = f"{spec.install_hint}, or " if spec.install_hint and not data_dir else ""
        raise UsageError(f"{spec.name}: data folder {path} does not exist; {hint}point --data-dir to the dataset")
    return path


def load_split(
    name: str, split: str, data_dir: str | None = None, img_size: int = 32, num_classes: int | None = None,
    class_names: Sequence[str] | None = None, crop_pct: float = 1.0, random_resized_crop: bool = False,
) -> ImageSource:
    """Load the ``train`` or ``test`` split of a dataset and check its labels against ``num_classes``.

    ``img_size``: an image folder's decoded size, the size IDX images are zero-padded to. ``class_names`` (a
    model's recorded ``label_names``) fixes an image folder's label order; the fixed datasets (IDX, CIFAR) have
    their own. ``crop_pct`` and ``random_resized_crop``: an image folder's decoding (``FolderSource``)."""
    spec = get_spec(name)
    folder = resolve_data_dir(spec, data_dir)
    if spec.kind == "idx":
        source: ImageSource = _load_idx(spec, folder, split, img_size)
    elif spec.kind == "cifar":
        source = _load_cifar(spec, folder, split)
    else:
        source = _load_imagefolder(spec, folder, split, img_size, num_classes, class_names, crop_pct,
                                   random_resized_crop)
    classes = num_classes or spec.num_classes or len(source.class_names or ())
    if len(source) and (int(source.labels.min()) < 0 or int(source.labels.max()) >= classes):
        raise UsageError(f"{spec.name} {split}: labels span {int(source.labels.min())}..{int(source.labels.max())} "
                         f"but the model has {classes} classes; fix the data or pass --num-classes")
    return source




def folder_name(label: str) -> str:
    """A label as a class folder name: ``t-shirt/top`` cannot be one (``/``), ``t-shirt_top`` can."""
    return "_".join(label.replace("/", " ").replace("\\", " ").split())
