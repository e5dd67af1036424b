"""ONNX export: every zoo model folds, exports with a dynamic batch and runs in onnxruntime within 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from test_fold import ZOO, correlated_batch, trained
from torch import nn

from ndeconv.convert import export_onnx, onnx_op_types, verify_onnx, verify_onnx_for_model
from ndeconv.convert._inputs import fashion_mnist_batch
from ndeconv.convert.export import check_onnx_ops
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.errors import NdeconvError

EXPORT_FAST = {"resnet18_deconv", "mobilenetv2_deconv", "pnasnet_a_deconv", "efficientnet_b0_deconv"}


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


def test_verify_fails_on_a_different_model(tmp_path) -> None:
    model = trained("pnasnet_a_deconv")
    result = export_onnx(model, tmp_path / "m.onnx")
    other = trained("pnasnet_a_deconv", deconv=False)
    with pytest.raises(NdeconvError, match="differs from PyTorch"):
        verify_onnx(result.path, other, {"random": correlated_batch(2, 3)})
