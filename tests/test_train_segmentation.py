"""``ndeconv train-seg`` (ndeconv.training.segmentation): the authors' Segmentation/train.py on tiny Cityscapes- and
VOC-layout folders built here: labelIds -> trainIds, the confusion-matrix metrics against hand numbers, a few
training steps that write metrics and a loadable model, a bit-exact resume, and the refusals.

The public builders' dilated ResNet-50 is swapped for one bottleneck per stage in ``SEGMENTATION_MODELS`` (the
dict the trainer looks builders up in), as tests/test_segmentation_cli.py does; deconvolution runs use block 8
and 2 iterations (the default block 64 whitens 576-wide patches in every 2048-channel layer: seconds a step).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ndeconv.cli import main
from ndeconv.errors import UsageError
from ndeconv.io import load_safetensors
from ndeconv.loading import load_model
from ndeconv.training.lock import RunDirLock
from ndeconv.training.seg_data import ConfusionMatrix, SegmentationFolder, sample_generator, train_transform
from ndeconv.training.segmentation import SegTrainConfig, train_segmentation
from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS, _segmentation_model

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 40, 48
# labelIds in the masks: unlabeled (0) and static (4) are ignored, road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2,
# car 26 -> 13 (ignored too in a 3-class run).
LABEL_IDS = np.array([0, 4, 7, 8, 11, 26], dtype=np.uint8)
TRAIN_IDS = {0: 255, 4: 255, 7: 0, 8: 1, 11: 2, 26: 13}


@pytest.fixture
def small_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """fcn_resnet50_deconv with one bottleneck per stage: the same code path, a fraction of the cost."""
    small = functools.partial(_segmentation_model, "fcn_resnet50_deconv", "fcn", (1, 1, 1, 1))
    monkeypatch.setitem(SEGMENTATION_MODELS, "fcn_resnet50_deconv", small)


def _image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def make_cityscapes(root: Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = "aachen" if i % 2 == 0 else "bonn"
            stem = f"{city}_{i:06d}_000019"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            _image(rng).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            mask = LABEL_IDS[rng.integers(0, len(LABEL_IDS), (H, W))]
            Image.fromarray(mask, mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def make_voc(root: Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]
    for split, n in (("train", n_train), ("val", n_val)):
        names = [f"2007_{split}_{i:03d}" for i in range(n)]
        for name in names:
            _image(rng).save(root / "JPEGImages" / f"{name}.jpg")
            mask = rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), (H, W))
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(root / "SegmentationClass" / f"{name}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def tiny_config(data_dir: Path, **overrides) -> SegTrainConfig:
    settings = dict(model="fcn_resnet50", dataset="cityscapes", data_dir=str(data_dir), base_size=32, crop_size=24,
                    batch_size=2, epochs=1, num_classes=3, workers=0, device="cpu", deconv=False, block=8,
                    deconv_iter=2, checkpoint_every=0)
    settings.update(overrides)
    return SegTrainConfig(**settings)


# -- data ------------------------------------------------------------------------------------------------------


def test_cityscapes_label_ids_map_to_train_ids(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path / "cs")
    ds = SegmentationFolder("cityscapes", root, "train", 19, base_size=H, crop_size=24, training=False)
    assert len(ds) == 4
    raw = np.asarray(Image.open(ds.samples[0].mask))
    _, mask = ds.read(0)
    expected = np.vectorize(TRAIN_IDS.get)(raw)
    assert np.array_equal(mask[0].numpy(), expected)
    assert set(np.unique(mask.numpy())) == {0, 1, 2, 13, 255}
    # A 3-class run: trainId 13 (car) is beyond its classes, so ignored.
    _, mask3 = SegmentationFolder("cityscapes", root, "train", 3, H, 24, training=False).read(0)
    assert np.array_equal(mask3[0].numpy(), np.where(expected == 13, 255, expected))
    # Evaluation resizes the shorter side to base_size, the mask with nearest (no new labels).
    image, target = SegmentationFolder("cityscapes", root, "val", 19, 20, 24, training=False)[0]
    assert image.shape == (3, 20, 24) and target.shape == (20, 24) and target.dtype == torch.int64
    assert set(np.unique(target.numpy())) <= {0, 1, 2, 13, 255}


def test_voc_palette_labels_and_border_stay(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc")
    ds = SegmentationFolder("voc", root, "val", 21, H, 24, training=False)
    assert [s.image.name for s in ds.samples] == ["2007_val_000.jpg", "2007_val_001.jpg"]
    _, mask = ds.read(1)
    assert np.array_equal(mask[0].numpy(), np.asarray(Image.open(ds.samples[1].mask)))
    assert set(np.unique(mask.numpy())) == {0, 1, 2, 255}


def test_train_transform_pads_with_ignore_and_is_seeded() -> None:
    image = torch.full((3, 10, 12), 7, dtype=torch.uint8)
    mask = torch.ones(1, 10, 12, dtype=torch.uint8)
    # base 10: the shorter side becomes 5..20; crop 24 is always larger, so part of it is padding.
    out_img, out_mask = train_transform(image, mask, 10, 24, sample_generator(0, 0, 0))
    assert out_img.shape == (3, 24, 24) and out_mask.shape == (1, 24, 24)
    assert (out_mask == 255).any() and set(out_mask.unique().tolist()) <= {1, 255}
    assert torch.equal((out_img == 0).all(0), out_mask[0] == 255)  # the image is padded (0) where the mask is
    again = train_transform(image, mask, 10, 24, sample_generator(0, 0, 0))
    assert torch.equal(again[1], out_mask)
    sizes = {tuple(train_transform(image, mask, 40, 8, sample_generator(0, 0, i))[0].shape) for i in range(3)}
    assert sizes == {(3, 8, 8)}


# -- metrics ---------------------------------------------------------------------------------------------------


def test_confusion_matrix_metrics_match_a_hand_computation() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    prediction = torch.tensor([0, 1, 1, 1, 0, 2])  # the ignored pixel's prediction never counts
    cm = ConfusionMatrix(4)  # class 3 appears nowhere: no IoU, left out of the mean
    cm.update(target, prediction)
    assert cm.mat[:3, :3].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = cm.compute()
    # correct 3 of 5; IoU: 1/(2+2-1), 2/(2+3-2), 0/(1+0-0); row accuracy 1/2, 2/2, 0/1.
    assert m["pixel_acc"] == pytest.approx(60.0)
    assert m["iou"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0]) and m["iou"][3] is None
    assert m["miou"] == pytest.approx(100 / 3)
    assert m["class_acc"][:3] == pytest.approx([50.0, 100.0, 0.0]) and m["class_acc"][3] is None


# -- training --------------------------------------------------------------------------------------------------


def test_names_and_defaults_follow_the_authors() -> None:
    d = SegTrainConfig()
    assert (d.model, d.dataset, d.base_size, d.crop_size, d.batch_size, d.epochs, d.lr, d.momentum, d.wd) == (
        "deeplabv3_resnet50", "cityscapes", 520, 480, 4, 30, 0.01, 0.9, 1e-4)
    assert (d.block, d.deconv_iter, d.eps, d.bias, d.stride) == (64, 5, 1e-5, True, 3)
    assert d.resolved().deconv is False and d.resolved().num_classes == 19
    assert SegTrainConfig(dataset="voc").resolved().num_classes == 21
    authors = SegTrainConfig(model="deeplabv3_resnet101d").resolved()
    assert authors.deconv is True and authors.architecture() == "deeplabv3_resnet101_deconv"
    assert SegTrainConfig(model="fcn_resnet50_deconv", deconv=False).resolved().deconv is False
    with pytest.raises(UsageError, match="not a segmentation model"):
        SegTrainConfig(model="resnet18").architecture()


def test_a_deconv_run_writes_metrics_and_a_loadable_model(tmp_path: Path, small_models: None) -> None:
    data = make_cityscapes(tmp_path / "cs")
    cfg = tiny_config(data, model="fcn_resnet50d", deconv=None, aux_loss=True, max_steps=2, epochs=2)
    result = train_segmentation(cfg, out=tmp_path / "run")
    run = result.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 2 and rows[0]["epoch"] == 1
    assert 0 <= rows[0]["pixel_acc"] <= 100 and 0 <= rows[0]["miou"] <= 100 and len(rows[0]["iou"]) == 3
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "fcn_resnet50_deconv" and config["num_classes"] == 3
    assert config["model_args"]["deconv"] is True and config["model_args"]["aux_loss"] is True
    assert config["label_names"] == ["road", "sidewalk", "building"]
    # The auxiliary head trains at 10x the lr (poly-decayed after 2 of 4 steps: (1 - 2/4) ** 0.9).
    groups = torch.load(run / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    lrs = [g["lr"] for g in groups]
    assert lrs == pytest.approx([0.01 * 0.5**0.9, 0.01 * 0.5**0.9, 0.1 * 0.5**0.9])
    loaded = load_model(run)
    assert loaded.kind == "run" and loaded.label_names == ["road", "sidewalk", "building"]
    weights = load_safetensors(run / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in loaded.model.state_dict().items())
    out = loaded.model(torch.randn(1, 3, 24, 32))
    assert out["out"].shape == (1, 3, 24, 32)


def test_resume_continues_exactly_as_an_unstopped_run(tmp_path: Path, small_models: None,
                                                      capsys: pytest.CaptureFixture) -> None:
    data = make_voc(tmp_path / "voc")
    cfg = tiny_config(data, dataset="voc", max_steps=1)  # 4 images, batch 2: 2 steps in the epoch
    first = train_segmentation(cfg, out=tmp_path / "a")
    assert first.history[-1]["partial"] is True
    train_segmentation(cfg, resume=tmp_path / "a")  # the same --max-steps: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--lr 0.5 .the run has 0.01"):
        train_segmentation(tiny_config(data, dataset="voc", lr=0.5), resume=tmp_path / "a", given=frozenset({"lr"}))
    resumed = train_segmentation(tiny_config(data, dataset="voc", max_steps=2), resume=tmp_path / "a",
                                 given=frozenset({"max_steps"}))
    assert [row["step"] for row in resumed.history] == [1, 2] and "partial" not in resumed.history[-1]
    straight = train_segmentation(tiny_config(data, dataset="voc"), out=tmp_path / "b")
    a, b = (load_safetensors(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history[-1]["miou"] == straight.history[-1]["miou"]


def test_existing_busy_and_foreign_dirs_are_refused(tmp_path: Path) -> None:
    data = make_cityscapes(tmp_path / "cs", n_train=2, n_val=1)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists and is not empty"):
        train_segmentation(tiny_config(data), out=taken)
    with pytest.raises(UsageError, match="only in a run directory of `ndeconv train-seg`"):
        train_segmentation(tiny_config(data), out=taken, force=True)
    assert (taken / "notes.txt").read_text() == "mine"
    busy = tmp_path / "busy"
    with RunDirLock(busy), pytest.raises(UsageError, match="in use by another training"):
        train_segmentation(tiny_config(data), out=busy)
    with pytest.raises(UsageError, match="no such directory"):
        train_segmentation(tiny_config(data), resume=tmp_path / "nowhere")


def test_missing_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cs = make_cityscapes(tmp_path / "cs", n_train=2, n_val=1)
    next((cs / "gtFine" / "train").rglob("*.png")).unlink()
    with pytest.raises(UsageError, match="has no label file gtFine/train/") as err:
        train_segmentation(tiny_config(cs), out=tmp_path / "r1")
    assert "\n" not in str(err.value) and not (tmp_path / "r1").exists()
    voc = make_voc(tmp_path / "voc", n_train=2, n_val=1)
    (voc / "JPEGImages" / "2007_val_000.jpg").unlink()
    with pytest.raises(UsageError, match="lists '2007_val_000' but JPEGImages/2007_val_000.jpg is missing"):
        train_segmentation(tiny_config(voc, dataset="voc"), out=tmp_path / "r2")
    rc = main(["train-seg", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "r3")])
    err_text = capsys.readouterr().err
    assert rc == 2 and err_text.count("\n") == 1 and "no such folder" in err_text and "leftImg8bit" in err_text
    rc = main(["train-seg", "--dataset", "voc", "--data-dir", str(tmp_path / "cs"), "--out", str(tmp_path / "r4")])
    assert rc == 2 and "no JPEGImages; a VOC folder holds" in capsys.readouterr().err


def test_the_command_line_trains_the_authors_model(tmp_path: Path, small_models: None,
                                                   capsys: pytest.CaptureFixture) -> None:
    data = make_voc(tmp_path / "voc")
    out = tmp_path / "run"
    common = ["--dataset", "voc", "--data-dir", str(data), "--base-size", "32", "--crop-size", "24", "-b", "2",
              "--num-classes", "3", "--epochs", "1", "--workers", "0", "--device", "cpu"]
    rc = main(["train-seg", "--model", "fcn_resnet50", *common, "--max-steps", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "fcn_resnet50_deconv" and config["model_args"]["deconv"] is False
    assert config["train_segmentation"]["num_classes"] == 3 and config["train_segmentation"]["max_steps"] == 1
    assert main(["train-seg", "--model", "fcn_resnet50", *common, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train-seg", "--resume", str(out), "--lr", "0.1"]) == 2
    assert "a resumed run keeps its settings" in capsys.readouterr().err
    assert main(["train-seg", "--resume", str(out), "--max-steps", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert main(["train-seg", "--model", "fcn_resnet50", *common, "--max-steps", "1", "--force", "--out",
                 str(out)]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
