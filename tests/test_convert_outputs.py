"""The converter on models other than (N, C, H, W) -> (N, K) classifiers: dict outputs (segmentation's out/aux), fully
convolutional exports with dynamic spatial axes, 1-D signal models (FastDeconv1d), and folding a ``convert-bn``
output through the CLI."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ndeconv.convert import default_example_input, export_onnx, fold, fold_with_report, model_input_size
from ndeconv.convert.export import read_onnx_metadata
from ndeconv.convert.fold import output_difference
from ndeconv.errors import NdeconvError
from ndeconv.layers import Delinear, FastDeconv
from ndeconv.layers.fast_deconv1d import FastDeconv1d

pytestmark = pytest.mark.usefixtures("one_thread")


class TinySegmenter(nn.Module):
    """A torchvision-style segmentation net in miniature: a strided backbone, an ``out`` and an ``aux`` head, both
    upsampled to the input's size and returned as an OrderedDict (what torchvision's FCN/DeepLabV3 return)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = FastDeconv(3, 8, 3, stride=2, padding=1, block=4)
        self.body = FastDeconv(8, 16, 3, stride=2, padding=1, block=8)
        self.out_head = FastDeconv(16, classes, 1, block=16)
        self.aux_head = FastDeconv(8, classes, 1, block=8)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        size = x.shape[-2:]
        low = F.relu(self.stem(x))
        high = F.relu(self.body(low))
        up = {"mode": "bilinear", "align_corners": False}
        return OrderedDict(out=F.interpolate(self.out_head(high), size=size, **up),
                           aux=F.interpolate(self.aux_head(low), size=size, **up))


class TinyClassifier1d(nn.Module):
    """Two FastDeconv1d layers, average pooling, a Delinear head: a 1-D classifier (like tests/test_fast_deconv1d's
    ResNet1d, smaller)."""

    def __init__(self, channels: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = FastDeconv1d(channels, 8, 5, padding=2, block=4)
        self.conv2 = FastDeconv1d(8, 8, 3, stride=2, padding=1, block=8)
        self.fc = Delinear(8, classes, block=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(-1))


def trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Running statistics from a few train-mode batches (far from the identity whitening), then eval mode."""
    g = torch.Generator().manual_seed(3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape, generator=g) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def segmenter() -> nn.Module:
    torch.manual_seed(0)
    return trained(TinySegmenter(), (3, 64, 64))


def test_output_difference_compares_every_tensor_of_a_dict() -> None:
    a = OrderedDict(out=torch.ones(2, 3), aux=torch.ones(2, 3))
    b = OrderedDict(out=torch.ones(2, 3), aux=torch.ones(2, 3) * 1.5)  # only aux differs: it must be seen
    assert output_difference(a, b) == (0.5, 0.5)
    assert output_difference((a["out"], a["aux"]), [b["out"], b["aux"]]) == (0.5, 0.5)
    with pytest.raises(NdeconvError, match="structure"):
        output_difference(a, OrderedDict(out=torch.ones(2, 3)))


def test_fold_checks_a_segmentation_models_dict_output(segmenter: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    folded, report = fold_with_report(segmenter, example_input=x)
    assert report.check_rel is not None and report.check_rel <= 1e-4
    assert not any(isinstance(m, FastDeconv) for m in folded.modules())
    with torch.no_grad():
        got, expected = folded(x), segmenter(x)
    assert list(got) == ["out", "aux"] and output_difference(expected, got)[1] <= 1e-4


def test_export_of_a_fully_convolutional_model_has_dynamic_spatial_axes(segmenter: nn.Module,
                                                                         tmp_path: Path) -> None:
    import onnxruntime as ort

    result = export_onnx(segmenter, tmp_path / "seg.onnx", input_size=(3, 64, 64), verify=True)
    assert result.output_names == ["out", "aux"] and result.dynamic_spatial
    assert "random#size" in {c[0] for c in result.verification.comparisons}  # verified at a second size
    meta = read_onnx_metadata(result.path)
    assert meta["fixed_input_size"] == "false" and json.loads(meta["output_name"]) == ["out", "aux"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["out", "aux"]
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape[2:])  # symbolic height and width
    for size in ((64, 64), (40, 56)):
        x = torch.randn(3, 3, *size)
        out, aux = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = segmenter(x)
        assert out.shape == aux.shape == (3, 3, *size)
        assert output_difference(expected, {"out": torch.from_numpy(out), "aux": torch.from_numpy(aux)})[1] <= 1e-4


def test_a_classifier_export_keeps_its_fixed_spatial_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = trained(nn.Sequential(FastDeconv(3, 8, 3, padding=1, block=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, 4)), (3, 16, 16))
    result = export_onnx(model, tmp_path / "cls.onnx", input_size=(3, 16, 16), verify=True)
    assert result.output_names == ["logits"] and not result.dynamic_spatial
    meta = read_onnx_metadata(result.path)
    assert meta["fixed_input_size"] == "true" and meta["output_name"] == "logits"


def test_1d_models_get_signal_inputs_labels_and_an_ncl_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = trained(TinyClassifier1d(), (4, 64))
    assert model_input_size(model) == (4, 64)
    assert default_example_input(model).shape == (2, 4, 64)
    folded, report = fold_with_report(model)  # no example input: a (2, 4, 64) batch, checked
    assert report.check_rel is not None and report.check_rel <= 1e-4
    assert set(report.conv_types.values()) == {"FastDeconv1d -> Conv1d"}
    assert "2 FastDeconv1d -> Conv1d" in report.summary() and "Conv2d" not in report.summary()
    assert sum(isinstance(m, nn.Conv1d) for m in folded.modules()) == 2

    result = export_onnx(model, tmp_path / "signal.onnx", input_size=(4, 48), verify=True)
    assert not result.dynamic_spatial  # pooled logits: the traced length is the one the metadata names
    meta = read_onnx_metadata(result.path)
    assert meta["input_layout"] == "NCL" and json.loads(meta["input_size"]) == [4, 48]
    assert not {"mean", "std", "resize", "pad", "scale", "crop_pct"} & meta.keys()
    assert "NCL" in meta["preprocess"]
    with pytest.raises(NdeconvError, match=r"it takes \(4, L\)"):
        export_onnx(model, tmp_path / "bad.onnx", input_size=(4, 48, 48))


def test_a_dense_1d_export_has_a_dynamic_length(tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = trained(nn.Sequential(FastDeconv1d(4, 8, 5, padding=2, block=4), nn.ReLU(),
                                  FastDeconv1d(8, 3, 3, stride=2, padding=1, block=8)), (4, 64))
    result = export_onnx(model, tmp_path / "dense.onnx", input_size=(4, 48), verify=True)
    assert result.dynamic_spatial and result.output_names == ["logits"]
    meta = read_onnx_metadata(result.path)
    assert meta["fixed_input_size"] == "false" and "N x K x L" in meta["output"]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 4, 101)  # another length than the traced 48 (odd: the stride-2 remainder)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert output_difference(model(x), torch.from_numpy(got))[1] <= 1e-4


def test_fold_of_a_1d_model_built_by_hand_without_fastdeconv1d() -> None:
    """A plain Conv1d first layer also makes the example input (C, L)."""
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3)).eval()
    assert model_input_size(model) == (2, 64)
    assert fold(model).fold_report.check_rel == 0.0


@pytest.mark.slow
def test_fcn_builder_with_a_small_backbone_exports_out_and_aux(tmp_path: Path) -> None:
    """The zoo's FCN (deconv form, aux head) on a one-block-per-stage dilated ResNet, at 64x64 and another size."""
    from ndeconv.zoo.deconv_segmentation import _segmentation_model

    torch.manual_seed(0)
    model = trained(_segmentation_model("fcn_small", "fcn", (1, 1, 1, 1), num_classes=3, aux_loss=True),
                    (3, 64, 64))
    folded = fold(model, example_input=torch.randn(2, 3, 64, 64))
    assert folded.fold_report.check_rel <= 1e-4
    result = export_onnx(model, tmp_path / "fcn.onnx", input_size=(3, 64, 64), verify=True)
    assert result.output_names == ["out", "aux"] and result.dynamic_spatial and result.verification.max_rel <= 1e-4


@pytest.mark.slow
def test_fold_cli_of_a_convert_bn_file_reloads_as_the_same_function(tmp_path: Path, capsys) -> None:

    from ndeconv.cli import main
    from ndeconv.convert import load_folded
    from ndeconv.loading import load_model

    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert_bn import SWEEP_BLOCK, write_bn_source

    data, source, bn = write_bn_source(tmp_path)
    converted = tmp_path / "out" / "converted.safetensors"
    assert main(["convert-bn", str(source), "--calibrate-data", "fashion_mnist", "--data-dir", str(data),
                 "--calibrate-images", "16", "--batch-size", "8", "--check-images", "8", "--block",
                 str(SWEEP_BLOCK), "-o", str(converted)]) == 0
    folded_path = tmp_path / "folded" / "model.safetensors"
    assert main(["fold", "--checkpoint", str(converted), "-o", str(folded_path)]) == 0
    capsys.readouterr()

    reloaded = load_folded(folded_path)
    assert not any(isinstance(m, (FastDeconv, nn.modules.batchnorm._BatchNorm)) for m in reloaded.modules())
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert output_difference(load_model(str(converted)).model(x), reloaded(x))[1] <= 1e-4
        assert output_difference(bn(x), reloaded(x))[1] <= 1e-4
