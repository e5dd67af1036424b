"""``ndeconv fold`` / ``export`` / ``load_model`` on the segmentation builders by name (issue 18): the zoo name and the
authors' ``fcn_resnet50d`` build the torchvision-style model with ``--random-init``, a name alone says in one line
that no weights exist, and a segmentation checkpoint loads with ``--checkpoint FILE --arch fcn_resnet50d``.

The public builders (dilated ResNet-50/101) take tens of seconds to export, so the cheap tests swap a one-block
backbone into ``SEGMENTATION_MODELS`` (the dict every loader looks the builders up in); the one real export is slow.
"""

from __future__ import annotations

import functools
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from ndeconv.cli import main
from ndeconv.errors import UsageError
from ndeconv.loading import load_model, pretrained_model_name
from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS, _segmentation_model


@pytest.fixture
def small_fcn(monkeypatch: pytest.MonkeyPatch) -> None:
    """fcn_resnet50_deconv with one bottleneck per stage: the same code path, a fraction of the cost."""
    small = functools.partial(_segmentation_model, "fcn_resnet50_deconv", "fcn", (1, 1, 1, 1))
    monkeypatch.setitem(SEGMENTATION_MODELS, "fcn_resnet50_deconv", small)


def test_names_resolve_to_the_builder_and_tags_are_refused() -> None:
    assert pretrained_model_name("fcn_resnet50d") == "fcn_resnet50_deconv"
    assert pretrained_model_name("deeplabv3_resnet101_deconv") == "deeplabv3_resnet101_deconv"
    with pytest.raises(UsageError, match="no pretrained weights exist"):
        pretrained_model_name("fcn_resnet50_deconv.cityscapes")


def test_a_name_without_random_init_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UsageError, match="--random-init"):
        load_model("fcn_resnet50d")
    assert main(["export", "deeplabv3_resnet50d", "-o", str(tmp_path / "never.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no pretrained weights exist" in err
    assert not (tmp_path / "never.onnx").exists()


def test_random_init_builds_the_torchvision_style_model(small_fcn: None) -> None:
    loaded = load_model("fcn_resnet50d", random_init=True, model_args={"num_classes": 5})
    assert loaded.kind == "random-init" and loaded.description == {"model": "fcn_resnet50_deconv",
                                                                   "weights": "random init"}
    out = loaded.model(torch.randn(1, 3, 40, 48))
    assert set(out) == {"out"} and out["out"].shape == (1, 5, 40, 48)


@pytest.mark.slow  # an FCN export verified with onnxruntime: about 8 s
def test_export_by_name_is_verified_with_onnxruntime(small_fcn: None, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "fcn.onnx"
    assert main(["export", "fcn_resnet50d", "--random-init", "-o", str(path)]) == 0
    assert "verified: max abs diff" in capsys.readouterr().out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    # One output (no aux head by default): its name as it is, not a JSON list.
    assert meta["fixed_input_size"] == "false" and meta["output_name"] == "out"
    (out,) = session.run(None, {session.get_inputs()[0].name: torch.randn(2, 3, 48, 64).numpy()})
    assert out.shape == (2, 21, 48, 64)  # dynamic spatial axes: another size than the traced one


def test_fold_by_name_reloads_as_the_same_network(small_fcn: None, tmp_path: Path) -> None:
    from ndeconv.convert import load_folded, read_folded_config

    path = tmp_path / "fcn.safetensors"
    assert main(["fold", "fcn_resnet50_deconv", "--random-init", "-o", str(path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["fcn.safetensors"]  # its config is inside
    config = read_folded_config(path)
    assert config["architecture"] == "fcn_resnet50_deconv" and config["model_args"]["aux_loss"] is False
    folded = load_folded(path)
    assert type(folded).__name__ == "FCN"
    assert folded(torch.randn(1, 3, 32, 32))["out"].shape == (1, 21, 32, 32)


def test_a_segmentation_checkpoint_loads_with_the_authors_arch(small_fcn: None, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = SEGMENTATION_MODELS["fcn_resnet50_deconv"](num_classes=4, aux_loss=True).eval()
    path = tmp_path / "seg.safetensors"  # no config.json beside it: the state_dict says classes and aux head
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_model(path, arch="fcn_resnet50d", weights_file=True)
    assert loaded.kind == "weights" and loaded.description["architecture"] == "fcn_resnet50_deconv"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, want = loaded.model(x), net(x)
    assert set(got) == {"out", "aux"} and torch.equal(got["out"], want["out"])
    with pytest.raises(UsageError, match="does not fit"):
        load_model(path, arch="deeplabv3_resnet50d", weights_file=True)
    # The CLI path: --checkpoint FILE --arch NAME, folded with the aux head the state_dict has.
    folded_path = tmp_path / "folded" / "seg.safetensors"
    assert main(["fold", "--checkpoint", str(path), "--arch", "fcn_resnet50d", "-o", str(folded_path)]) == 0
    from ndeconv.convert import read_folded_config

    config = read_folded_config(folded_path)
    assert config["model_args"]["aux_loss"] is True and config["num_classes"] == 4


@pytest.mark.slow
def test_export_of_the_public_fcn_resnet50_builder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "fcn.onnx"
    assert main(["export", "fcn_resnet50_deconv", "--random-init", "-o", str(path)]) == 0
    assert "verified: max abs diff" in capsys.readouterr().out
