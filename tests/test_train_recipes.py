"""Each model trains with the defaults of the authors' script that trains its topology: ``main.py`` (CIFAR and
MNIST models, 28x28 unpadded for the MNIST ones) or ``main_imagenet.py`` (the ImageNet topologies: wd 1e-4, batch
256, 90 epochs, RandomResizedCrop(224) + flip, Resize(256) + CenterCrop(224) for evaluation, its StepLR option).

The image-folder transforms are checked against torchvision's own (the ones main_imagenet.py composes), draw for
draw: a generator seeded as torch's global generator gives the same crop and flip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from ndeconv.cli import main
from ndeconv.datasets import FASHION_MNIST_DIR, FolderSource, random_resized_crop_box
from ndeconv.loading import load_eval_model
from ndeconv.training import TrainConfig
from ndeconv.training.evaluate import recorded_crop_pct
from ndeconv.training.loop import _scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(data.numpy(), "RGB")


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)


@pytest.mark.parametrize("arch, expected", [
    ("resnet18d", dict(wd=1e-4, batch_size=256, epochs=90, img_size=224)),
    ("vgg11d", dict(wd=1e-4, batch_size=256, epochs=90, img_size=224)),
    ("resnet18", dict(wd=1e-3, batch_size=128, epochs=20, img_size=32)),
    ("mlp", dict(wd=1e-3, batch_size=128, epochs=20, img_size=28)),
    ("simple_v2", dict(wd=1e-3, batch_size=128, epochs=20, img_size=28)),
])
def test_defaults_are_the_training_scripts(arch: str, expected: dict) -> None:
    resolved = TrainConfig(arch=arch).resolved()
    assert {k: getattr(resolved, k) for k in expected} == expected
    # What the user set stays.
    assert TrainConfig(arch=arch, wd=0.5, epochs=3).resolved().wd == 0.5


def test_validate_refuses_an_unresolved_config() -> None:
    with pytest.raises(ValueError, match="resolved"):
        TrainConfig().validate()


def test_step_scheduler_gives_main_imagenet_lrs() -> None:
    """main_imagenet.py steps its StepLR at the start of each epoch: epoch e trains at lr * gamma ** ((e + 1) //
    step_size)."""
    cfg = TrainConfig(lr_scheduler="step", scheduler_step_size=2, epochs=6, lr=0.1).resolved()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = _scheduler(cfg, optimizer, steps_per_epoch=3)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()  # at the epoch's end, as the trainer does for step and multistep
    assert lrs == pytest.approx([0.1 * 0.1 ** ((e + 1) // 2) for e in range(6)])


@pytest.mark.parametrize("size", [(300, 200), (120, 400), (64, 64)])
def test_random_resized_crop_is_torchvisions_draw_for_draw(size: tuple[int, int]) -> None:
    img = _image(*size)
    for seed in range(20):
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        box = random_resized_crop_box(*size, torch.Generator().manual_seed(seed))
        assert box == (left, top, left + w, top + h)


def test_folder_decoding_matches_main_imagenet_transforms(tmp_path: Path) -> None:
    """Training: RandomResizedCrop(S) + RandomHorizontalFlip under the batch's seed; evaluation: Resize(S / 0.875) +
    CenterCrop(S), byte for byte as torchvision's transforms."""
    path = tmp_path / "a.png"
    _image(90, 70, seed=3).save(path)
    size = 48
    for seed in range(6):
        train = FolderSource([path], [0], ["a"], size, 3, random_resized_crop=True).batch(torch.tensor([0]), seed)
        torch.manual_seed(seed)
        with Image.open(path) as img:
            expected = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])(img.convert("RGB"))
        assert torch.equal(train[0].permute(1, 2, 0).reshape(-1), _pixels(expected))
    evaluated = FolderSource([path], [0], ["a"], size, 3, crop_pct=0.875).batch(torch.tensor([0]))
    with Image.open(path) as img:
        expected = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size)])(img.convert("RGB"))
    assert torch.equal(evaluated[0].permute(1, 2, 0).reshape(-1), _pixels(expected))
    # The same seed gives the same crop (a resumed run sees the same images); the draw depends on it.
    source = FolderSource([path], [0], ["a"], size, 3, random_resized_crop=True)
    assert torch.equal(source.batch(torch.tensor([0]), 5), source.batch(torch.tensor([0]), 5))
    assert not torch.equal(source.batch(torch.tensor([0]), 5), source.batch(torch.tensor([0]), 6))


def _image_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                _image(50 + 7 * i, 40 + 5 * c, seed=100 * c + i).save(folder / f"{i}.png")
    return root


@pytest.mark.slow  # trains and evaluates an ImageNet ResNet-18: about 8 s
def test_an_imagenet_topology_trains_on_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``ndeconv train --arch resnet18d`` on a folder: main_imagenet.py's recipe is what the run records (its
    defaults, the eval crop 0.875 in the pretrained_cfg), and ``ndeconv eval`` of the run evaluates it."""
    data = _image_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--arch", "resnet18d", "--dataset", "imagefolder", "--data-dir", str(data),
                 "--img-size", "32", "--batch-size", "2", "--epochs", "1", "--lr", "0.01", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "resnet18_imagenet_deconv"
    train = config["train"]
    assert (train["wd"], train["img_size"], train["lr_scheduler"]) == (1e-4, 32, "cosine")
    assert config["model_args"]["block_fc"] is None or config["model_args"]["block_fc"] == 64
    assert config["pretrained_cfg"]["crop_pct"] == pytest.approx(0.875)
    assert tuple(config["pretrained_cfg"]["input_size"]) == (3, 32, 32)
    capsys.readouterr()
    assert main(["eval", str(run), "--data-dir", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["count"] == 6
    # ... through main_imagenet.py's evaluation crop, which the eval command reads from the run's architecture.
    _, info = load_eval_model(str(run))
    assert recorded_crop_pct(info) == pytest.approx(0.875)
    assert recorded_crop_pct({"architecture": "resnet18_deconv"}) == 1.0


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh installs it)")
def test_an_mnist_model_trains_on_unpadded_28x28_images(tmp_path: Path) -> None:
    """``ndeconv train --arch mlp``: 784 inputs, as the authors' main.py feeds MNIST-style data."""
    run = tmp_path / "run"
    assert main(["train", "--arch", "mlp", "--train-subset", "256",
                 "--test-subset", "64", "--epochs", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["img_size"] == 28 and tuple(config["pretrained_cfg"]["input_size"]) == (1, 28, 28)
    assert config["pretrained_cfg"]["crop_pct"] == 1.0  # timm's Resize(28) + CenterCrop(28): the image as it is
