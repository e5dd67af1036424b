"""The ecosystem contract (issue #19): what timm's own tooling gets from the zoo.

- timm's eval transforms from a model's data config feed it what ndeconv feeds it (the zero-padded 32x32 image);
- the default cfg describes the default model, and every model's pretrained_cfg describes the model built
  (registry, random init, shipped weights, a user's file, ``local-dir:``, ``hf-hub:``);
- each shipped folder has timm's class map, and ``ndeconv eval --dataset imagefolder --class-map`` reads it;
- the reference fixtures are in the repository.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import PROJECT_ROOT, REFERENCE, default_tag, shipped_zoo_models, write_hf_cache
from timm.data import create_transform, resolve_model_data_config
from timm.models import get_pretrained_cfg_value

import ndeconv.zoo as zoo
from ndeconv.cli import main
from ndeconv.datasets import DATASETS, FASHION_MNIST_DIR, FASHION_MNIST_LABELS, load_split
from ndeconv.training.data import Preprocess
from ndeconv.zoo._pretrained import WEIGHTS_DIR

SHIPPED = shipped_zoo_models()
needs_fashion = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                   reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)")
needs_resnet18 = pytest.mark.skipif("resnet18_deconv" not in SHIPPED, reason="resnet18_deconv is not shipped")


# Two cores shared by several jobs: torch on one thread is the fast setting (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _stem_chans(model: torch.nn.Module) -> int:
    return model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels


def _describes_itself(model: torch.nn.Module) -> None:
    cfg = model.pretrained_cfg
    chans = _stem_chans(model)
    assert cfg["input_size"][0] == chans and len(cfg["mean"]) == len(cfg["std"]) == chans, cfg


def _pil_test_images(count: int, mode: str) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The first test images as timm's ImageFolder gives them (28x28 'L' PNGs, converted to ``mode``), with the
    uint8 batch and labels of ndeconv's own loader."""
    from PIL import Image

    source = load_split("fashion_mnist", "test").subset(count)
    padded = source.batch(torch.arange(count))  # (N, 1, 32, 32): the 28x28 image with a 2-pixel zero border
    images = [Image.fromarray(img[0, 2:30, 2:30].numpy(), mode="L").convert(mode) for img in padded]
    return images, padded, source.labels


# -- item 1: timm's transforms --------------------------------------------------------------------------------


@needs_fashion
@pytest.mark.parametrize("name", zoo.ZOO_MODELS)
@pytest.mark.parametrize("in_chans", [None, 1])
def test_timm_eval_transform_is_ndeconvs_zero_padding(name: str, in_chans: int | None) -> None:
    """timm's eval transform of the model's data config gives, to the bit, the tensor ndeconv evaluates."""
    with torch.device("meta"):
        model = timm.create_model(name, **({"in_chans": in_chans} if in_chans else {}))
    config = resolve_model_data_config(model)
    chans = config["input_size"][0]
    transform = create_transform(**config)
    images, padded, _ = _pil_test_images(16, "RGB" if chans == 3 else "L")
    got = torch.stack([transform(img) for img in images])
    spec = DATASETS["fashion_mnist"]
    want = Preprocess(spec.mean, spec.std)(padded).expand(-1, chans, -1, -1)
    assert torch.equal(got, want)


@pytest.mark.slow  # two 500-image evaluations of ResNet-18: 15-50 s on the shared 2 cores
@needs_fashion
@needs_resnet18
def test_timm_pipeline_reproduces_ndeconv_eval(capsys: pytest.CaptureFixture) -> None:
    """The default pretrained model (3 channels) through timm's transforms, on RGB copies of the test images as
    timm's ImageFolder reads them, scores what ``ndeconv eval`` scores on the same 500 images, to the image."""
    count = 500
    model = timm.create_model("resnet18_deconv", pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model))
    images, _, labels = _pil_test_images(count, "RGB")
    with torch.no_grad():
        correct = int((model(torch.stack([transform(img) for img in images])).argmax(1) == labels).sum())
    capsys.readouterr()
    assert main(["eval", "resnet18_deconv", "--test-subset", str(count), "--json"]) == 0  # the default tag too
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["count"] == count and 100.0 * correct / count == pytest.approx(ours["top1"], abs=1e-9)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_has_the_eval_crop(name: str) -> None:
    config = json.loads((WEIGHTS_DIR / f"{name}.fashion_mnist" / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert cfg["crop_pct"] == pytest.approx(32 / 28) and cfg["crop_mode"] == "center"
    assert get_pretrained_cfg_value(name, "crop_pct") == pytest.approx(32 / 28)


def test_training_run_config_has_the_eval_crop() -> None:
    from ndeconv.training.config import TrainConfig
    from ndeconv.training.loop import _hub_config

    cfg = TrainConfig(arch="pnasnet_a", deconv=False).resolved()
    model = timm.create_model("pnasnet_a_deconv", deconv=False, in_chans=1)
    hub = _hub_config(cfg, model, "pnasnet_a_deconv", 10, 1, FASHION_MNIST_LABELS, "now")
    assert hub["pretrained_cfg"]["crop_pct"] == pytest.approx(32 / 28)
    assert hub["pretrained_cfg"]["input_size"] == [1, 32, 32]
    cifar_cfg = TrainConfig(arch="pnasnet_a", dataset="cifar10").resolved()
    cifar = _hub_config(cifar_cfg, model, "pnasnet_a_deconv", 10, 3, None, "now")
    assert cifar["pretrained_cfg"]["crop_pct"] == 1.0  # CIFAR images are 32x32 already


# -- item 2: the default cfg describes the default model ------------------------------------------------------


@pytest.mark.parametrize("name", zoo.ZOO_MODELS)
def test_default_cfg_describes_the_default_model(name: str) -> None:
    size = get_pretrained_cfg_value(name, "input_size")
    model = timm.create_model(name)
    with torch.no_grad():  # eval: a random model's train-mode whitening costs seconds and shows nothing more here
        assert model.eval()(torch.randn(2, *size)).shape == (2, 10)
    _describes_itself(model)
    # Random init has the default tag's cfg, as any timm model: its data fields, not CIFAR statistics.
    assert model.pretrained_cfg["mean"] == get_pretrained_cfg_value(name, "mean") == (0.0,) * size[0]
    gray = timm.create_model(name, in_chans=1)
    _describes_itself(gray)
    assert gray.pretrained_cfg["input_size"] == (1, 32, 32) and gray.pretrained_cfg["mean"] == (0.0,)
    with torch.no_grad():
        assert gray.eval()(torch.randn(2, *gray.pretrained_cfg["input_size"])).shape == (2, 10)


@pytest.mark.parametrize("name", SHIPPED)
def test_pretrained_cfg_describes_the_stem(name: str) -> None:
    default = timm.create_model(name, pretrained=True)
    _describes_itself(default)
    assert _stem_chans(default) == get_pretrained_cfg_value(name, "input_size")[0] == 3
    gray = timm.create_model(name, pretrained=True, in_chans=1)
    _describes_itself(gray)
    assert _stem_chans(gray) == 1 and gray.pretrained_cfg["mean"] == (0.0,)


@pytest.mark.skipif(not SHIPPED, reason="no zoo weights are shipped yet")
def test_hub_and_local_dir_loads_describe_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shipped folder as ``local-dir:`` and as a cached Hub repo builds what ``pretrained=True`` builds."""
    arch = "efficientnet_b0_deconv" if "efficientnet_b0_deconv" in SHIPPED else SHIPPED[0]  # small and quick
    weight_set = f"{arch}.{default_tag(arch)}"  # the folder `pretrained=True` reads
    folder = WEIGHTS_DIR / weight_set
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    write_hf_cache(tmp_path / "hub", f"someorg/{weight_set}", folder)
    reference = timm.create_model(arch, pretrained=True).eval()
    x = torch.rand(2, 3, 32, 32)
    for name in (f"local-dir:{folder}", f"hf-hub:someorg/{weight_set}"):
        model = timm.create_model(name, pretrained=True).eval()
        _describes_itself(model)
        assert _stem_chans(model) == 3
        with torch.no_grad():
            assert torch.equal(model(x), reference(x)), name
        gray = timm.create_model(name, pretrained=True, in_chans=1)
        _describes_itself(gray)
        assert _stem_chans(gray) == 1
    # A folder whose config.json records its model's in_chans (a run directory's) builds that model.
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(folder / "model.safetensors", run / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["in_chans"] = 1
    config["pretrained_cfg"].update(input_size=[1, 32, 32], mean=[0.0], std=[1.0])
    (run / "config.json").write_text(json.dumps(config))
    model = timm.create_model(f"local-dir:{run}", pretrained=True)
    _describes_itself(model)
    assert _stem_chans(model) == 1


def test_user_files_describe_the_model(tmp_path: Path) -> None:
    """A user's file: the model takes the weights' channels unless asked for others, in both forms."""
    from ndeconv.zoo._shipping import save_safetensors_atomic

    for deconv in (True, False):
        torch.manual_seed(0)
        source = timm.create_model("efficientnet_b0_deconv", in_chans=1, deconv=deconv).eval()
        file = tmp_path / f"{deconv}.safetensors"
        save_safetensors_atomic(source.state_dict(), file)
        x = torch.rand(2, 1, 32, 32)
        for in_chans in (None, 1, 3):
            model = timm.create_model("efficientnet_b0_deconv", pretrained=True, deconv=deconv,
                                      pretrained_cfg_overlay=dict(file=str(file)),
                                      **({"in_chans": in_chans} if in_chans else {})).eval()
            _describes_itself(model)
            assert _stem_chans(model) == (in_chans or 1)
            with torch.no_grad():
                torch.testing.assert_close(model(x.expand(-1, _stem_chans(model), -1, -1)), source(x),
                                           rtol=1e-4, atol=1e-4)


def test_ship_weights_config_builds_the_default_model(tmp_path: Path) -> None:
    from ndeconv.zoo._shipping import ship_weights

    torch.manual_seed(0)
    model = timm.create_model("pnasnet_a_deconv", in_chans=1).eval()
    folder = ship_weights(model, "fashion_mnist", root=tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and "in_chans" not in config["model_args"]
    assert config["pretrained_cfg"]["crop_pct"] == pytest.approx(32 / 28)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert _stem_chans(loaded) == 3 and tuple(loaded.pretrained_cfg["mean"]) == (0.0,) * 3
    # ndeconv's own commands build the weights' own (gray) stem from it.
    from ndeconv.zoo._pretrained import weights_in_chans

    assert weights_in_chans(f"local-dir:{folder}") == 1


# -- item 4: class maps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_class_map_is_timms_format(name: str) -> None:
    from timm.data.readers.class_map import load_class_map

    from ndeconv.datasets import folder_name

    path = WEIGHTS_DIR / f"{name}.fashion_mnist" / "class_map.txt"
    class_to_idx = load_class_map(str(path))
    assert class_to_idx == {folder_name(label): i for i, label in enumerate(FASHION_MNIST_LABELS)}
    assert all("/" not in n and " " not in n for n in class_to_idx) and "t-shirt_top" in class_to_idx


def _folder(root: Path, classes: list[str]) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(3)
    for name in classes:
        (root / "val" / name).mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (12, 12, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "val" / name / f"{i}.png")


def test_eval_imagefolder_takes_a_class_map(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import save_file

    # Class order of the dataset, not alphabetical: folders sorted would give trouser 2, t-shirt_top 1, bag 0.
    order = ["trouser", "t-shirt_top", "bag"]
    _folder(tmp_path / "data", order)
    class_map = tmp_path / "class_map.txt"
    class_map.write_text("\n".join(order) + "\n")
    torch.manual_seed(0)
    model = timm.create_model("pnasnet_a_deconv", deconv=False, num_classes=3).eval()
    weights = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(weights))

    from ndeconv.datasets import read_class_map

    source = load_split("imagefolder", "test", str(tmp_path / "data"), class_names=read_class_map(class_map))
    assert [order[int(y)] for y in source.labels] == [p.parent.name for p in source.files]
    spec = DATASETS["imagefolder"]
    with torch.no_grad():
        logits = model(Preprocess(spec.mean, spec.std)(source.batch(torch.arange(len(source)))))
    right, alphabetical = F.cross_entropy(logits, source.labels), F.cross_entropy(logits, (2 - source.labels) % 3)
    assert float(right) != pytest.approx(float(alphabetical))

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(weights), "--arch", "pnasnet_a", "--dataset", "imagefolder",
                 "--data-dir", str(tmp_path / "data"), "--class-map", str(class_map), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["count"] == 6 and got["loss"] == pytest.approx(float(right), rel=1e-5)

    # The model's recorded label names ("t-shirt/top") match their folder-safe form.
    labeled = load_split("imagefolder", "test", str(tmp_path / "data"), class_names=("trouser", "t-shirt/top", "bag"))
    assert torch.equal(labeled.labels, source.labels)

    blank = tmp_path / "blank.txt"
    blank.write_text("trouser\n\nbag\n")
    assert main(["eval", "--checkpoint", str(weights), "--arch", "pnasnet_a", "--dataset", "imagefolder",
                 "--data-dir", str(tmp_path / "data"), "--class-map", str(blank)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "blank line" in err


# -- item 14: reference fixtures ------------------------------------------------------------------------------


def test_reference_fixtures_are_in_the_repository() -> None:
    """The parity tests read the committed copy, byte-identical to ../shared/fixtures/reference (its source)."""
    assert REFERENCE == PROJECT_ROOT / "tests" / "fixtures" / "reference" and (REFERENCE / "README.md").is_file()
    sums = dict(line.split()[::-1] for line in (REFERENCE.parent / "reference.sha256").read_text().splitlines())
    shared = PROJECT_ROOT.parent / "shared" / "fixtures" / "reference"
    assert set(sums) == {p.name for p in REFERENCE.iterdir()}
    for name, digest in sums.items():
        assert hashlib.sha256((REFERENCE / name).read_bytes()).hexdigest() == digest, name
        if shared.is_dir():  # on this project's machines: still byte-identical to the source
            assert (shared / name).read_bytes() == (REFERENCE / name).read_bytes(), name
