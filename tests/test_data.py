"""Datasets of ``ndeconv train``: real Fashion-MNIST, IDX/CIFAR/image-folder files written here, augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ndeconv.datasets import FASHION_MNIST_DIR, load_split, read_idx
from ndeconv.errors import UsageError
from ndeconv.training.data import Preprocess, batch_loader, epoch_batches, eval_batches


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(folder: Path, n: int = 12, gz: bool = False, label_max: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, label_max + 1, n, dtype=np.uint8)
    labels[0] = label_max
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz)
    return images, labels


def write_cifar10(folder: Path, n: int = 6) -> np.ndarray:
    """CIFAR-10's python batches, as the official archive lays them out (dict with bytes keys)."""
    rng = np.random.default_rng(1)
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [i % 10 for i in range(n)]}, f)
    return data


def write_imagefolder(root: Path, classes: dict[str, int], size: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_load_padded_to_32(tmp_path: Path, gz: bool) -> None:
    images, labels = write_mnist(tmp_path, gz=gz)
    source = load_split("mnist", "train", str(tmp_path))
    assert len(source) == 12
    batch = source.batch(torch.arange(12))
    assert batch.shape == (12, 1, 32, 32) and batch.dtype == torch.uint8
    assert torch.equal(batch[:, 0, 2:30, 2:30], torch.from_numpy(images))  # centred, 2-pixel zero border
    assert batch[:, :, :2].eq(0).all() and batch[:, :, :, 30:].eq(0).all()
    assert torch.equal(source.labels, torch.from_numpy(labels).long())


def test_real_fashion_mnist() -> None:
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/test.sh installs it)")
    train = load_split("fashion_mnist", "train")
    test = load_split("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert train.batch(torch.arange(4)).shape == (4, 1, 32, 32)
    # The reference feeds ToTensor() alone: pixel / 255, no normalisation, no augmentation.
    pre = Preprocess((0.0,), (1.0,))
    x = pre(train.batch(torch.arange(2)))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_truncated_idx_is_one_clear_error(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UsageError, match="truncated"):
        read_idx(path)


def test_missing_dataset_names_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"looked for train-images-idx3-ubyte.*--data-dir"):
        load_split("mnist", "train", str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        load_split("fashion_mnist", "train", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="unknown dataset 'svhn'"):
        load_split("svhn", "train", str(tmp_path))


def test_labels_out_of_range(tmp_path: Path) -> None:
    write_mnist(tmp_path, label_max=12)
    with pytest.raises(UsageError, match=r"labels span 0\.\.12 but the model has 10 classes"):
        load_split("mnist", "train", str(tmp_path))


def test_cifar_batches(tmp_path: Path) -> None:
    data = write_cifar10(tmp_path)
    train = load_split("cifar10", "train", str(tmp_path))
    test = load_split("cifar10", "test", str(tmp_path))
    assert (len(train), len(test)) == (30, 6)
    assert torch.equal(test.batch(torch.arange(6)), torch.from_numpy(data.reshape(6, 3, 32, 32)))
    assert test.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(UsageError, match="refusing to load builtins.print"):
        load_split("cifar10", "test", str(tmp_path))


def test_imagefolder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"cat": 2, "dog": 3})
    source = load_split("imagefolder", "train", str(tmp_path), img_size=8)
    assert source.class_names == ("cat", "dog") and source.labels.tolist() == [0, 0, 1, 1, 1]
    assert source.batch(torch.tensor([0, 4])).shape == (2, 3, 8, 8)
    with pytest.raises(UsageError, match=r"3 class folders but --num-classes is 2.*out of range"):
        (tmp_path / "train" / "emu").mkdir()
        load_split("imagefolder", "train", str(tmp_path), num_classes=2)


def test_imagefolder_val_class_unknown_to_train(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"cat": 1})
    (tmp_path / "val" / "owl").mkdir()
    with pytest.raises(UsageError, match="out of range"):
        load_split("imagefolder", "test", str(tmp_path))


def test_imagefolder_val_only_takes_recorded_label_order(tmp_path: Path) -> None:
    """A val/ with no train/ beside it and a class missing: its own folders would shift every later label."""
    import shutil

    write_imagefolder(tmp_path, {"a": 1, "b": 1, "c": 2})
    shutil.rmtree(tmp_path / "train")
    shutil.rmtree(tmp_path / "val" / "b")
    with pytest.raises(UsageError, match=r"2 class folders for a 3-class model and no .*train/"):
        load_split("imagefolder", "test", str(tmp_path), num_classes=3)
    source = load_split("imagefolder", "test", str(tmp_path), num_classes=3, class_names=("a", "b", "c"))
    assert source.labels.tolist() == [0, 2, 2]  # c keeps label 2
    with pytest.raises(UsageError, match="recorded label_names lacks"):
        load_split("imagefolder", "test", str(tmp_path), class_names=("a", "b"))
    # recorded names win over a train/ folder too (it may have gained a class since the model was trained)
    (tmp_path / "train" / "0").mkdir(parents=True)
    source = load_split("imagefolder", "test", str(tmp_path), num_classes=3, class_names=("a", "b", "c"))
    assert source.labels.tolist() == [0, 2, 2]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_undecodable_image_is_one_line_error(tmp_path: Path, num_workers: int) -> None:
    """With workers too: DataLoader would re-raise the worker's error with its whole traceback in the text."""
    write_imagefolder(tmp_path, {"cat": 2})
    (tmp_path / "val" / "cat" / "1.png").write_bytes(b"not a png")
    source = load_split("imagefolder", "test", str(tmp_path), img_size=8)
    with pytest.raises(UsageError, match=r"1\.png: cannot decode the image") as err:
        list(batch_loader(source, eval_batches(len(source), 1), num_workers))
    assert len(str(err.value).splitlines()) == 1


def test_crop_and_flip_match_the_reference_transform() -> None:
    """Each augmented image is a 32x32 window of the zero-padded image, flipped or not (RandomCrop(32, 4) +
    RandomHorizontalFlip), then normalised; the same (seed, epoch, step, rank) gives the same batch."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    pre = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=4)
    out = pre(images, Preprocess.generator(0, 1, 2, 0))
    again = pre(images, Preprocess.generator(0, 1, 2, 0))
    assert torch.equal(out, again)
    assert not torch.equal(out, pre(images, Preprocess.generator(0, 1, 3, 0)))
    padded = torch.nn.functional.pad(images.float() / 255, (4, 4, 4, 4))
    flips = 0
    for i in range(16):
        target = out[i] * 0.25 + 0.5
        windows = [(padded[i, :, r:r + 32, c:c + 32], f) for r in range(9) for c in range(9) for f in (0, 1)]
        matches = [f for w, f in windows if torch.allclose(w.flip(-1) if f else w, target, atol=1e-6)]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0]
    assert 0 < flips < 16
    plain = pre(images)  # evaluation: no augmentation
    assert torch.allclose(plain * 0.25 + 0.5, images.float() / 255, atol=1e-6)


def test_epoch_batches_shuffle_and_shard() -> None:
    one = epoch_batches(10, 3, seed=0, epoch=0)
    assert [len(b) for b in one] == [3, 3, 3, 1]
    assert sorted(torch.cat(one).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(one), torch.cat(epoch_batches(10, 3, seed=0, epoch=1)))
    ranks = [torch.cat(epoch_batches(10, 3, 0, 0, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and set(ranks[0].tolist()).isdisjoint(ranks[1].tolist())
    shards = [torch.cat(eval_batches(7, 2, rank=r, world=2)) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(7))  # every test image exactly once


def _idx(shape: tuple[int, ...], body: bytes = b"", ndim: int | None = None) -> bytes:
    ndim = len(shape) if ndim is None else ndim
    return b"\x00\x00\x08" + bytes([ndim]) + struct.pack(f">{len(shape)}I", *shape) + body


@pytest.mark.parametrize("content, said", [
    (_idx((1,) * 255, b"\x00"), "its header gives 255 dimensions"),
    (_idx((0, 28, 28)), "which holds no data"),
    (_idx((2**32 - 1, 2**32 - 1, 2**32 - 1)), "more than an IDX dataset holds"),
    (_idx((2, 2), b"\x00" * 5), "longer than its header says"),
    (_idx((2, 2), b"\x00" * 3), "truncated"),
    (b"\x00\x00\x08\x03\x00\x00", "the header ends early"),
], ids=["ndim-255", "no-images", "overflow", "longer", "shorter", "short-header"])
def test_crafted_idx_headers_are_one_line(tmp_path: Path, content: bytes, said: str) -> None:
    path = tmp_path / "crafted-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=said):
        read_idx(path)


def test_a_gzip_bomb_is_refused_after_reading_what_the_header_promises(tmp_path: Path, monkeypatch) -> None:
    """256 MB of zeros (a 1 MB file) behind a header that promises 4 bytes: refused after decompressing the header
    and 5 bytes of body, not the 256 MB."""
    import ndeconv.datasets

    path = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_idx((4,)))
        for _ in range(16):
            f.write(bytes(2**24))
    decompressed = []
    real_open = gzip.open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def read(self, n=-1):
            data = self.file.read(n)
            decompressed.append(len(data))
            return data

    monkeypatch.setattr(ndeconv.datasets.gzip, "open", Counting)
    with pytest.raises(UsageError, match="longer than its header says"):
        read_idx(path)
    assert sum(decompressed) == 4 + 4 + 5
