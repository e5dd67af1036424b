"""A dataset split written as an image folder: ``OUT/<class folder>/<index>.png`` and ``OUT/class_map.txt``.

The layout timm's ``create_dataset`` (``train.py``, ``validate.py``), torchvision's ``ImageFolder`` and
``ndeconv eval --dataset imagefolder`` read. The class folders are the dataset's labels as folder names
(``t-shirt/top`` -> ``t-shirt_top``) and ``class_map.txt`` lists them in class-index order, timm's ``--class-map``
file (the same file every shipped weights folder has): sorted alphabetically, as an image folder is without it,
Fashion-MNIST's classes would get other indices than the ones the models were trained with.

``image_size`` chooses what the files hold: the dataset's own images (28x28 for Fashion-MNIST, which timm's eval
transform of the zoo's pretrained_cfg pads to the models' 32x32 input) or, with ``image_size=32``, the images
already zero-padded to 32x32 as the models were trained on them, which timm's training transforms cannot produce
from a 28x28 image (docs/training.md, "Fine-tuning with timm's train.py").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .dataset_specs import DATASETS, IDX_IMAGE_SIZE, DatasetSpec, get_spec
from .errors import UsageError
from .file_lock import claim_output

__all__ = ["SPLITS", "write_image_folder"]

SPLITS = ("train", "test")
# The images of the fixed-size datasets: IDX (MNIST, Fashion-MNIST) 28x28, CIFAR 32x32.
_NATIVE_SIZE = {"idx": IDX_IMAGE_SIZE, "cifar": 32}


def write_image_folder(
    dataset: str,
    split: str,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    limit: int | None = None,
) -> int:
    """Write the ``split`` (``train`` or ``test``) of ``dataset`` (``fashion_mnist``, ``mnist``, ``cifar10``,
    ``cifar100``, read from ``data_dir`` or its default folder) as ``out_dir/<class folder>/<index>.png`` with
    ``out_dir/class_map.txt``; returns the number of images written.

    ``image_size``: None writes the dataset's own images (Fashion-MNIST 28x28 'L'); a larger size pads them with
    zeros, centred (32: what the zoo's models see). ``limit``: the first N images of the split only. The index in
    a file name is the image's index in the split, zero-padded so that a natural sort (timm's) keeps their order.

    ``out_dir`` must not exist or be an empty folder: the images are written into a hidden folder beside it that
    is renamed to ``out_dir`` when complete, so a failure or a kill never leaves a partial folder under the name,
    and a second writer of the same folder is refused.
    """
    spec = get_spec(dataset)
    if spec.kind not in _NATIVE_SIZE:
        known = ", ".join(name for name, s in DATASETS.items() if s.kind in _NATIVE_SIZE)
        raise UsageError(f"{spec.name}: already an image folder; give one of {known}")
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    native = _NATIVE_SIZE[spec.kind]
    size = native if image_size is None else image_size
    if spec.kind == "idx" and size < native:
        raise UsageError(f"image_size {size}: {spec.name}'s images are {native}x{native} and are zero-padded, never "
                         f"shrunk; give {native} or more")
    if spec.kind == "cifar" and size != native:
        raise UsageError(f"image_size {size}: {spec.name}'s images are {native}x{native}, written as they are; "
                         f"leave image_size out")
    if limit is not None and limit < 1:
        raise UsageError(f"limit {limit}: give a number of images >= 1, or None for the whole split")
    out = Path(out_dir)
    with claim_output(out, folder=True) as out:  # checked before the dataset is read: a refusal costs nothing
        return _write(spec, split, out, out.parent if str(out.parent) else Path("."), data_dir, size, limit)


def _write(spec: DatasetSpec, split: str, out: Path, parent: Path, data_dir: str | None, size: int,
           limit: int | None) -> int:
    import torch
    from PIL import Image

    from .datasets import load_split
    from .zoo._shipping import CLASS_MAP_FILE, write_class_map

    source = load_split(spec.name, split, data_dir, img_size=size).subset(limit)  # IDX zero-padded to size
    labels = source.labels.tolist()
    names = source.class_names or tuple(str(i) for i in range(spec.num_classes or 0))  # CIFAR-100: no label names
    width = max(5, len(str(len(labels) - 1)))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        # mkdtemp makes the folder owner-only (0700); the renamed folder gets the mode a plain mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        write_class_map(names, tmp / CLASS_MAP_FILE)  # one writer of timm's format, shared with shipped folders
        folders = (tmp / CLASS_MAP_FILE).read_text(encoding="utf-8").splitlines()
        for name in folders:
            (tmp / name).mkdir()
        chunk = 1000  # decoded IDX/CIFAR sources index one tensor: a batch per chunk, not one op per image
        for start in range(0, len(labels), chunk):
            batch = source.batch(torch.arange(start, min(start + chunk, len(labels))))
            for offset, image in enumerate(batch):
                i = start + offset
                # (1, H, W) -> 'L', (3, H, W) -> 'RGB': PNG is lossless, so the files hold the exact pixels.
                array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
                Image.fromarray(array).save(tmp / folders[labels[i]] / f"{i:0{width}d}.png")
        # No fsync of every file (tens of thousands): the folder is regenerated from the dataset at will; what the
        # rename guards against is a partial folder under the final name after a failure or a kill.
        try:
            os.rename(tmp, out)  # replaces an empty folder atomically; refuses a non-empty one
        except OSError as err:
            raise UsageError(f"{out}: cannot put the written folder there ({err.strerror or err}); it was created "
                             "meanwhile or is not writable: choose another folder") from err
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return len(labels)
