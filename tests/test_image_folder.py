"""``ndeconv.image_folder.write_image_folder``: a split as ``<class folder>/<index>.png`` + ``class_map.txt``, exact
pixels, read back by timm with the dataset's class indices; written whole or not at all, never over a folder
that holds anything."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ndeconv.datasets import FASHION_MNIST_LABELS, folder_name
from ndeconv.errors import UsageError
from ndeconv.file_lock import release_lock, take_lock
from ndeconv.image_folder import write_image_folder
from ndeconv.zoo._pretrained import WEIGHTS_DIR

COUNT = 23  # more than the 10 classes, fewer than a chunk


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it (unsigned bytes, big-endian dimensions), gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def idx_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A Fashion-MNIST-layout folder of COUNT random 28x28 test images (and as many train ones), nonzero to the
    edge, so that a padding or a crop shows."""
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(COUNT, 28, 28), dtype=np.uint8)
    labels = np.arange(COUNT, dtype=np.uint8) % 10
    folder = tmp_path / "idx"
    folder.mkdir()
    for prefix in ("t10k", "train"):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder, images, labels


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


def test_layout_pixels_and_class_map(tmp_path: Path, idx_dir: tuple[Path, np.ndarray, np.ndarray]) -> None:
    folder, images, labels = idx_dir
    out = tmp_path / "data" / "val"  # missing parents are created
    assert write_image_folder("fashion_mnist", "test", out, data_dir=str(folder)) == COUNT
    names = [folder_name(label) for label in FASHION_MNIST_LABELS]
    assert (out / "class_map.txt").read_text() == "".join(f"{n}\n" for n in names)
    # The shipped weights folders' class map: the same file, so either one is train.py's --class-map.
    shipped = WEIGHTS_DIR / "resnet18_deconv.fashion_mnist" / "class_map.txt"
    if shipped.is_file():
        assert (out / "class_map.txt").read_bytes() == shipped.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "class_map.txt"])
    for i in range(COUNT):
        assert np.array_equal(_read(out / names[labels[i]] / f"{i:05d}.png"), images[i])  # lossless, unpadded
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's owner-only mode
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder or lock left


def test_zero_padded_and_limited(tmp_path: Path, idx_dir: tuple[Path, np.ndarray, np.ndarray]) -> None:
    folder, images, labels = idx_dir
    out = tmp_path / "train"
    assert write_image_folder("fashion_mnist", "train", out, data_dir=str(folder), image_size=32, limit=5) == 5
    files = list(out.glob("*/*.png"))
    assert sorted(p.name for p in files) == [f"{i:05d}.png" for i in range(5)]
    for path in files:
        i = int(path.stem)
        assert path.parent.name == folder_name(FASHION_MNIST_LABELS[labels[i]])
        padded = _read(path).copy()
        assert padded.shape == (32, 32) and np.array_equal(padded[2:30, 2:30], images[i])
        padded[2:30, 2:30] = 0
        assert not padded.any()  # the 2-pixel border the models were trained with, zero


def test_timm_reads_the_dataset_labels(tmp_path: Path, idx_dir: tuple[Path, np.ndarray, np.ndarray]) -> None:
    from timm.data import create_dataset

    folder, _, labels = idx_dir
    write_image_folder("fashion_mnist", "test", tmp_path / "val", data_dir=str(folder))
    dataset = create_dataset("", root=str(tmp_path), split="validation",
                             class_map=str(tmp_path / "val" / "class_map.txt"), input_img_mode="L")
    assert len(dataset) == COUNT
    for path, target in dataset.reader.samples:
        assert target == labels[int(Path(path).stem)]  # the dataset's index, not the alphabetical folder order


def test_refuses_existing_output(tmp_path: Path, idx_dir: tuple[Path, np.ndarray, np.ndarray]) -> None:
    folder = str(idx_dir[0])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists and is not empty"):
        write_image_folder("fashion_mnist", "test", full, data_dir=folder)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        write_image_folder("fashion_mnist", "test", tmp_path / "file", data_dir=folder)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is taken
    assert write_image_folder("fashion_mnist", "test", empty, data_dir=folder) == COUNT


def test_refuses_a_folder_being_written(tmp_path: Path, idx_dir: tuple[Path, np.ndarray, np.ndarray]) -> None:
    lock = tmp_path / ".val.lock"
    fd = take_lock(lock)  # what a writer of tmp_path/val holds while it writes
    try:
        with pytest.raises(UsageError, match=f"being written by another ndeconv command \\(pid {os.getpid()}\\)"):
            write_image_folder("fashion_mnist", "test", tmp_path / "val", data_dir=str(idx_dir[0]))
    finally:
        release_lock(lock, fd)
    assert not (tmp_path / "val").exists()


def test_a_failure_leaves_nothing(tmp_path: Path, idx_dir: tuple[Path, np.ndarray, np.ndarray],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    saved = []

    def save(self: Image.Image, path: object, *args: object, **kwargs: object) -> None:
        if len(saved) == 7:
            raise OSError(28, "No space left on device")
        saved.append(path)
        original(self, path, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError, match="No space left"):
        write_image_folder("fashion_mnist", "test", tmp_path / "val", data_dir=str(idx_dir[0]))
    assert list(tmp_path.iterdir()) == [idx_dir[0]]  # no partial folder under the name, no temporary one


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(dataset="imagefolder"), "already an image folder; give one of fashion_mnist, mnist, cifar10, cifar100"),
    (dict(dataset="svhn"), "unknown dataset 'svhn'"),
    (dict(split="val"), "unknown split 'val'; choose one of train, test"),
    (dict(image_size=24), "image_size 24: fashion_mnist's images are 28x28 and are zero-padded, never shrunk"),
    (dict(dataset="cifar10", image_size=64), "image_size 64: cifar10's images are 32x32"),
    (dict(limit=0), "limit 0: give a number of images >= 1"),
])
def test_bad_arguments_are_one_line(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"dataset": "fashion_mnist", "split": "test", **kwargs}
    with pytest.raises(UsageError) as err:
        write_image_folder(args.pop("dataset"), args.pop("split"), tmp_path / "out", **args)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fashion_mnist: looked for t10k-images-idx3-ubyte"):
        write_image_folder("fashion_mnist", "test", tmp_path / "new" / "out", data_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing left: no folder, no lock, not the parent it created


def test_rgb_images(tmp_path: Path) -> None:
    """CIFAR's 3-channel images are written as RGB PNGs, and CIFAR-100 (no label names) gets index folders."""
    import pickle

    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(4, 3 * 32 * 32), dtype=np.uint8)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    (root / "test").write_bytes(pickle.dumps({b"data": data, b"fine_labels": [3, 0, 3, 99]}))
    out = tmp_path / "out"
    assert write_image_folder("cifar100", "test", out, data_dir=str(tmp_path)) == 4
    assert len((out / "class_map.txt").read_text().splitlines()) == 100
    with Image.open(out / "3" / "00002.png") as img:
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), data[2].reshape(3, 32, 32).transpose(1, 2, 0))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
