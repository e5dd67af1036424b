"""ONNX export: every zoo model folds, exports with a dynamic batch and runs in onnxruntime within 1e-4; the
file's metadata_props carry what a client needs to feed it."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from test_fold import ZOO, correlated_batch, trained
from torch import nn

from ndeconv.cli import main
from ndeconv.convert import export_onnx, onnx_op_types, verify_onnx, verify_onnx_for_model
from ndeconv.convert._inputs import fashion_mnist_batch
from ndeconv.convert.export import METADATA_KEYS, check_onnx_ops, onnx_metadata, read_onnx_metadata
from ndeconv.datasets import CIFAR10_LABELS, CIFAR10_MEAN, CIFAR10_STD, FASHION_MNIST_DIR, FASHION_MNIST_LABELS
from ndeconv.errors import NdeconvError

DEPLOYMENT_DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
needs_fashion = pytest.mark.skipif(not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)")

# The quick run exports the flagship and the cheapest; the other eight (5-10 s each) run in the full suite.
EXPORT_FAST = {"resnet18_deconv", "mobilenetv2_deconv"}


@pytest.mark.parametrize("name", [n if n in EXPORT_FAST else pytest.param(n, marks=pytest.mark.slow) for n in ZOO])
def test_zoo_exports_and_verifies(tmp_path, name: str) -> None:
    model = trained(name)
    result = export_onnx(model, tmp_path / "model.onnx")
    assert result.dynamic_batch and not result.external_data
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # one self-contained file, no temp left
    verification = verify_onnx_for_model(result, batches=(1, 7))
    assert [c[1] for c in verification.comparisons][:2] == [1, 7]
    assert verification.max_rel <= 1e-4
    assert "Conv" in verification.ops and not {"Einsum", "ReduceSum", "Sqrt"} & set(verification.ops)
    if name == "resnet18_deconv":  # a plain ResNet: nothing but these
        assert set(verification.ops) <= {"Conv", "Relu", "Add", "ReduceMean", "GlobalAveragePool", "Reshape",
                                         "Flatten", "Gemm"}


def test_real_images_static_batch_and_opset(tmp_path) -> None:
    model = trained("pnasnet_a_deconv", in_chans=1, num_classes=10)
    result = export_onnx(model, tmp_path / "static.onnx", static_batch=3, opset=18)
    verification = verify_onnx_for_model(result)
    names = [c[0] for c in verification.comparisons]
    if (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file():
        assert "fashion-mnist" in names
        images = fashion_mnist_batch(3, (1, 32, 32))  # as ndeconv train feeds them: padded, in [0, 1]
        assert images.shape == (3, 1, 32, 32) and images.min() == 0 and images.max() <= 1
        assert float(images.std()) > 0.2
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == 3
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type: the batch is fixed
        session.run(None, {"input": np.zeros((2, 1, 32, 32), np.float32)})
    import onnx

    assert onnx.load(str(result.path)).opset_import[0].version == 18
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["batch"] == "3" and meta["opset"] == "18" and meta == read_onnx_metadata(result.path)


def test_refuses_to_overwrite(tmp_path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep")
    with pytest.raises(NdeconvError, match="already exists"):
        export_onnx(trained("pnasnet_a_deconv"), target)
    assert target.read_bytes() == b"keep"


def test_refuses_what_it_cannot_write(tmp_path) -> None:
    """An opset below 18 (the exporter silently wrote 18 and reported the one asked for) and an input_size
    of the wrong channels (a raw torch.fx ShapeProp error) are one clear error each, before any file."""
    model = trained("pnasnet_a_deconv")
    with pytest.raises(NdeconvError, match=r"opset 13: .*choose 18 or higher"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(NdeconvError, match=r"input_size \(1, 32, 32\) does not fit .*\(3, H, W\)"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(1, 32, 32))
    assert not list(tmp_path.iterdir())


class _Unfolding(nn.Module):
    """A whitening done the slow way (im2col + matmul): exactly what an exported graph must not contain."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 27))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(x, 3, padding=1)  # (N, 27, L)
        w = self.weight @ (self.weight.t() @ self.weight).sqrt()  # a weight computed on every call
        return (w @ cols).mean(-1)


def test_op_check_rejects_whitening_subgraphs(tmp_path) -> None:
    path = tmp_path / "bad.onnx"
    torch.onnx.export(_Unfolding().eval(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=True, external_data=False)
    assert onnx_op_types(path)
    with pytest.raises(NdeconvError, match="unexpected ops|computed at run time"):
        check_onnx_ops(path)


def test_failed_verification_keeps_the_existing_file(tmp_path) -> None:
    # An export that does not pass its checks never takes the place of the file already there (--force).
    target = tmp_path / "m.onnx"
    target.write_bytes(b"a good export")
    with pytest.raises(NdeconvError, match=r"verification failed \(the existing file is kept\).*m\.onnx"):
        export_onnx(_Unfolding().eval(), target, input_size=(3, 8, 8), force=True, fold_model=False, verify=True)
    assert target.read_bytes() == b"a good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary folder or data file left
    with pytest.raises(NdeconvError, match="nothing was written"):
        export_onnx(_Unfolding().eval(), tmp_path / "new.onnx", input_size=(3, 8, 8), fold_model=False, verify=True)
    assert not (tmp_path / "new.onnx").exists()


def test_uneven_adaptive_pool_is_refused_with_the_size_that_fits(tmp_path) -> None:
    # A stride-8 stem leaves a 2x2 map at 16x16 that a 7x7 adaptive pool (VGG's) cannot pool evenly: torch would
    # write index arithmetic (GatherND, Where) for it. The export stops before tracing and names the fitting size.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.AdaptiveAvgPool2d(7),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 49, 2)).eval()
    with pytest.raises(NdeconvError, match=r"^1 \(AdaptiveAvgPool2d\) pools a 2x2 map to 7x7 .*--input-size 3 56 56$"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 16, 16))
    assert list(tmp_path.iterdir()) == []
    result = export_onnx(model, tmp_path / "m.onnx", input_size=(3, 56, 56), verify=True)
    assert "GatherND" not in result.verification.ops


def test_verify_fails_on_a_different_model(tmp_path) -> None:
    model = trained("pnasnet_a_deconv")
    result = export_onnx(model, tmp_path / "m.onnx")
    other = trained("pnasnet_a_deconv", deconv=False)
    with pytest.raises(NdeconvError, match="differs from PyTorch"):
        verify_onnx(result.path, other, {"random": correlated_batch(2, 3)})


# -- metadata_props: what a client needs -------------------------------------------------------------------------


def _raw_test_images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` Fashion-MNIST test images as the IDX files hold them (uint8 28x28) and their labels,
    read with gzip and numpy alone."""
    with gzip.open(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images[:count], labels[:count]


def _client_logits(path: Path, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A client with onnxruntime and numpy only: everything it does to the raw images comes from the file's
    metadata_props (no ndeconv, no torch, no constant of the dataset)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["input_layout"] == "NCHW" and meta["input_dtype"] == "float32"
    channels, height, width = json.loads(meta["input_size"])
    resize = int(meta["resize"])
    assert images.shape[1:] == (resize, resize)  # already at the resize size: the resize is the identity
    top, bottom, left, right = json.loads(meta["pad"])
    x = np.pad(images, ((0, 0), (top, bottom), (left, right)), constant_values=0)  # pixel value 0, before scaling
    x = x.astype(np.float32) * np.float32(float(meta["scale"]))
    x = x[:, None].repeat(channels, axis=1)  # gray images: one channel (the model's stem says how many)
    mean = np.asarray(json.loads(meta["mean"]), np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(json.loads(meta["std"]), np.float32).reshape(1, -1, 1, 1)
    x = ((x - mean) / std).astype(np.float32)
    assert x.shape[1:] == (channels, height, width)
    return session.run([meta["output_name"]], {meta["input_name"]: x})[0], json.loads(meta["label_names"])


@needs_fashion
def test_export_metadata_lets_an_onnxruntime_client_preprocess_raw_images(tmp_path, capsys) -> None:
    """``ndeconv export`` of shipped weights writes the documented keys; a client using only onnxruntime and numpy
    pads, scales and normalises raw 28x28 Fashion-MNIST images from them and gets the PyTorch model's logits on
    the images ``ndeconv eval`` feeds it."""
    from ndeconv.datasets import load_split
    from ndeconv.loading import create_pretrained_model
    from ndeconv.training.data import Preprocess
    from ndeconv.zoo._pretrained import shipped_weights_path

    path = tmp_path / "pnasnet.onnx"
    assert main(["export", "pnasnet_a_deconv.fashion_mnist", "-o", str(path)]) == 0
    assert "metadata_props: " in capsys.readouterr().out
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert list(meta) and set(meta) <= set(METADATA_KEYS)
    shipped = json.loads(shipped_weights_path("pnasnet_a_deconv", "fashion_mnist").with_name("config.json").read_text())
    assert {k: meta[k] for k in ("model", "architecture", "tag", "dataset", "input_layout", "input_size", "batch",
                                 "fixed_input_size", "resize", "pad", "mean", "std", "num_classes", "opset")} == {
        "model": "pnasnet_a_deconv.fashion_mnist", "architecture": "pnasnet_a_deconv", "tag": "fashion_mnist",
        "dataset": "fashion_mnist", "input_layout": "NCHW", "input_size": "[1, 32, 32]", "batch": "dynamic",
        "fixed_input_size": "true", "resize": "28", "pad": "[2, 2, 2, 2]", "mean": "[0.0]", "std": "[1.0]",
        "num_classes": "10", "opset": "20",
    }
    assert meta["padding"].startswith("zero-pad 28x28 to 32x32")
    assert json.loads(meta["label_names"]) == list(FASHION_MNIST_LABELS)
    assert float(meta["test_top1"]) == shipped["weights"]["test_top1"]
    assert meta["ndeconv_version"] and meta["torch_version"] == torch.__version__

    raw, labels = _raw_test_images(24)
    got, names = _client_logits(path, raw)
    model = create_pretrained_model("pnasnet_a_deconv.fashion_mnist").eval()
    test = load_split("fashion_mnist", "test")
    with torch.no_grad():
        want = model(Preprocess((0.0,), (1.0,))(test.batch(torch.arange(24)))).numpy()
    assert np.array_equal(test.labels[:24].numpy(), labels)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert names[int(got[0].argmax())] in FASHION_MNIST_LABELS

    # The deployment docs' client, as printed there, on this file.
    snippet = DEPLOYMENT_DOCS.read_text(encoding="utf-8").split("A client with onnxruntime and numpy only", 1)[1]
    snippet = snippet.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"images": raw}
    exec(snippet.replace('"resnet18.onnx"', repr(str(path))), scope)  # noqa: S102 - the docs' own code
    assert np.array_equal(scope["logits"], got)
    assert scope["labels"] == [names[i] for i in got.argmax(1)]


def test_metadata_follows_the_weights_config() -> None:
    """A model built from a weights file carries its architecture's default cfg; the config.json of its run says
    what the weights were trained on (CIFAR-10 here: its normalisation, no padding, its labels)."""
    import timm

    model = timm.create_model("pnasnet_a_deconv", pretrained=False).eval()  # default cfg: Fashion-MNIST's
    run_config = {
        "architecture": "pnasnet_a_deconv", "label_names": list(CIFAR10_LABELS), "train": {"dataset": "cifar10"},
        "pretrained_cfg": {"tag": "cifar10", "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD), "crop_pct": 1.0},
    }
    meta = onnx_metadata(model, (3, 32, 32), opset=20, config=run_config, source={"run": "runs/cifar"})
    assert json.loads(meta["mean"]) == list(CIFAR10_MEAN) and json.loads(meta["std"]) == list(CIFAR10_STD)
    assert meta["pad"] == "[0, 0, 0, 0]" and meta["resize"] == "32" and meta["padding"].startswith("none")
    assert meta["dataset"] == "cifar10" and json.loads(meta["label_names"]) == list(CIFAR10_LABELS)
    assert meta["model"] == "runs/cifar" and "test_top1" not in meta

    # The shipped config.json describes the default 3-channel model (gray statistics repeated): a 1-channel
    # export gets one value each. An untrained model names no dataset and no accuracy.
    shipped = {"architecture": "pnasnet_a_deconv", "pretrained_cfg": {"mean": [0.0] * 3, "std": [1.0] * 3},
               "weights": {"test_top1": 89.0}, "train": {"dataset": "fashion_mnist"}}
    gray = timm.create_model("pnasnet_a_deconv", pretrained=False, in_chans=1).eval()
    meta = onnx_metadata(gray, (1, 32, 32), opset=20, config=shipped)
    assert meta["mean"] == "[0.0]" and meta["std"] == "[1.0]" and meta["test_top1"] == "89.0"
    meta = onnx_metadata(gray, (1, 32, 32), opset=20, config=shipped, source={"model": "pnasnet_a_deconv",
                                                                              "weights": "random init"})
    assert "dataset" not in meta and "test_top1" not in meta and meta["model"] == "pnasnet_a_deconv"
    # Another architecture's config.json does not describe these weights.
    meta = onnx_metadata(gray, (1, 32, 32), opset=20, config={**run_config, "architecture": "vgg16_deconv"})
    assert meta["dataset"] == "fashion_mnist" and meta["pad"] == "[2, 2, 2, 2]"

    bad = copy_with_cfg(model, mean=(0.1, 0.2), std=(1.0, 1.0))
    with pytest.raises(NdeconvError, match=r"2 mean values .* 3-channel input; set pretrained_cfg\['mean'\]"):
        onnx_metadata(bad, (3, 32, 32), opset=20)


def copy_with_cfg(model: nn.Module, **cfg) -> nn.Module:
    import copy

    other = copy.deepcopy(model)
    other.pretrained_cfg = {**model.pretrained_cfg, **cfg}
    return other


def test_readme_documents_every_metadata_key() -> None:
    """The deployment docs' ONNX section lists each key ``onnx_metadata`` writes."""
    text = DEPLOYMENT_DOCS.read_text(encoding="utf-8")
    section = text.split("## ONNX export", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M))
    assert documented == set(METADATA_KEYS)


def test_an_input_size_whose_activations_cannot_fit_is_refused_before_tracing(tmp_path, capsys) -> None:
    """--input-size 1 20000 20000: one line saying how much the first layer alone needs, nothing written, and no
    allocation tried (the refusal comes before the probe forward)."""
    from ndeconv.cli import main

    out = tmp_path / "big.onnx"
    capsys.readouterr()
    assert main(["export", "resnet18_deconv.fashion_mnist", "--input-size", "1", "20000", "20000", "-o",
                 str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the first convolution's output alone need" in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_counts_batch_channels_and_stride(monkeypatch) -> None:
    import ndeconv.convert.export as export_module

    conv = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3)
    need = 4 * 2 * (3 * 1000 * 1000 + 64 * 500 * 500)  # 88 MB at batch 2
    monkeypatch.setattr(export_module, "_available_memory", lambda: need)
    export_module._refuse_what_memory_cannot_hold(conv, (3, 1000, 1000), 2)  # fits exactly
    monkeypatch.setattr(export_module, "_available_memory", lambda: need - 1)
    with pytest.raises(NdeconvError, match="need 0.1 GiB"):
        export_module._refuse_what_memory_cannot_hold(conv, (3, 1000, 1000), 2)
