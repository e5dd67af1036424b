"""``ndeconv eval FILE.onnx``: an exported model through onnxruntime, fed as its metadata_props say; the
README's first command (export the shipped ResNet-18, then this) on a few test images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import default_tag

from ndeconv.cli import main
from ndeconv.convert import export_onnx
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.errors import UsageError
from ndeconv.training.evaluate import OnnxClassifier, evaluate_on_dataset, evaluate_onnx

needs_fashion = pytest.mark.skipif(not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)")


def _model() -> torch.nn.Module:
    import ndeconv.zoo  # noqa: F401 - registers the zoo with timm

    torch.manual_seed(0)
    return timm.create_model("pnasnet_a_deconv", deconv=False, in_chans=1, num_classes=10).eval()


def _eval_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@needs_fashion
def test_eval_onnx_equals_pytorch_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Dynamic and static batch files give ``ndeconv eval``'s PyTorch numbers on the same images; the static one
    takes a last batch smaller than its own (zero-filled) and batches larger than it (in chunks)."""
    model = _model()
    want = evaluate_on_dataset(model, "fashion_mnist", subset=45, batch_size=16)
    dynamic = export_onnx(model, tmp_path / "dynamic.onnx").path
    static = export_onnx(model, tmp_path / "static.onnx", static_batch=7).path
    for path in (dynamic, static):
        got = _eval_json(capsys, [str(path), "--test-subset", "45", "--batch-size", "16"])
        assert got["runtime"] == "onnxruntime" and got["dataset"] == "fashion_mnist"  # from the metadata
        assert got["count"] == 45 and got["recorded_top1"] is None  # untrained: no recorded accuracy
        assert got["top1"] == pytest.approx(want.top1) and got["top5"] == pytest.approx(want.top5)
        assert got["loss"] == pytest.approx(want.loss, rel=1e-4)
    assert OnnxClassifier(static).static_batch == 7 and OnnxClassifier(dynamic).static_batch is None


def test_eval_onnx_refuses_what_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = export_onnx(_model(), tmp_path / "m.onnx", verify=False).path
    for argv, message in [
        ([str(path), "--arch", "pnasnet_a"], "is an ONNX file, which fixes its own model and input size: drop --arch"),
        ([str(path), "--device", "cuda"], "runs on onnxruntime's CPU provider; drop --device"),
        ([str(path), "--dataset", "cifar10"], "takes 1-channel images but cifar10 has 3"),
        ([str(tmp_path / "none.onnx")], "no such ONNX file; write one with `ndeconv export MODEL -o none.onnx`"),
    ]:
        capsys.readouterr()
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    # A file no ndeconv export wrote: no metadata names its data.
    bare = tmp_path / "bare.onnx"
    torch.onnx.export(_model(), (torch.zeros(2, 1, 32, 32),), str(bare), dynamo=True, external_data=False,
                      input_names=["input"], dynamic_shapes=({0: "batch"},))
    with pytest.raises(UsageError, match="name no dataset .*pass --dataset"):
        evaluate_onnx(bare)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(UsageError, match="onnxruntime cannot load it"):
        evaluate_onnx(broken)


@needs_fashion
def test_readme_first_command_on_a_few_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The README's first command, on 64 test images: export the shipped ResNet-18 (folded, verified), then its
    test accuracy through onnxruntime equals the PyTorch model's on the same images."""
    from ndeconv.loading import create_pretrained_model
    from ndeconv.zoo._pretrained import WEIGHTS_DIR

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    first, said = readme.split("## First command", 1)[1].split("```bash\n", 1)[1].split("```", 1)
    assert "ndeconv export resnet18_deconv -o resnet18.onnx" in first  # the default tag: the best weights shipped
    assert "ndeconv eval resnet18.onnx" in first
    card = json.loads((WEIGHTS_DIR / f"resnet18_deconv.{default_tag('resnet18_deconv')}" / "config.json").read_text())
    card_top1 = card["weights"]["test_top1"]
    assert f"top-1 {card_top1:.2f}%, the model card's number" in said.split("##", 1)[0].replace("\n", " ")

    path = tmp_path / "resnet18.onnx"
    assert main(["export", "resnet18_deconv", "-o", str(path)]) == 0
    assert "verified: " in capsys.readouterr().out
    got = _eval_json(capsys, [str(path), "--test-subset", "64"])
    want = evaluate_on_dataset(create_pretrained_model("resnet18_deconv").eval(), "fashion_mnist", subset=64)
    assert got["count"] == 64 and got["top1"] == pytest.approx(want.top1) and got["loss"] == pytest.approx(
        want.loss, rel=1e-4)
    assert got["recorded_top1"] == pytest.approx(card_top1)  # the shipped weights' card, carried by the file
    capsys.readouterr()
    assert main(["eval", str(path), "--test-subset", "64"]) == 0
    out = capsys.readouterr().out
    assert "(onnxruntime) on fashion_mnist test (64 images): top-1" in out and "recorded top-1" in out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_onnx(_model(), tmp_path_factory.mktemp("onnx") / "m.onnx", verify=False).path


@needs_fashion
@pytest.mark.parametrize("key, value, said", [
    ("std", "[0.0]", "not a JSON list of finite numbers > 0"),
    ("std", "[-1.0]", "not a JSON list of finite numbers > 0"),
    ("std", "[NaN]", "not a JSON list of finite numbers > 0"),
    ("mean", "[NaN]", "not a JSON list of finite numbers"),
    ("mean", '["zero"]', "not a JSON list of finite numbers"),
    ("mean", "{}", "not a JSON list of finite numbers"),
    ("num_classes", "ten", "is not a whole number of classes"),
    ("num_classes", "2.5", "is not a whole number of classes"),
], ids=["std-0", "std-negative", "std-nan", "mean-nan", "mean-text", "mean-object", "classes-text", "classes-2.5"])
def test_onnx_preprocessing_metadata_is_validated(exported: Path, tmp_path: Path, capsys, key, value, said) -> None:
    """A preprocessing value that would make every number wrong (a NaN loss, a top-1 of nothing) is one line
    naming the key, not a top-1."""
    import onnx

    proto = onnx.load(str(exported))
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
    damaged = tmp_path / "damaged.onnx"
    onnx.save(proto, str(damaged))
    capsys.readouterr()
    assert main(["eval", str(damaged), "--test-subset", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"metadata_props['{key}']" in err and said in err, err
