"""``ndeconv eval`` of segmentation models (pixel accuracy, per-class and mean IoU on the val split, the one
``evaluate_segmentation`` that train-seg's per-epoch evaluation uses too), ``--input-size`` of ``export``/``fold``,
and the authors' BatchNorm segmentation names (``fcn_resnet50`` ...: the zoo builder with ``deconv=False``).

Tiny Cityscapes/VOC folders come from tests/test_train_segmentation.py's builders; the dilated ResNet-50 is swapped
for one bottleneck per stage (its ``small_models`` fixture), deconvolution models use block 8 and 2 iterations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from test_train_segmentation import make_cityscapes, make_voc, small_models, tiny_config  # noqa: F401 - fixture

import ndeconv.zoo
from ndeconv.cli import main
from ndeconv.errors import UsageError
from ndeconv.layers import FastDeconv
from ndeconv.loading import load_model, pretrained_model_name
from ndeconv.training.seg_data import SegmentationFolder
from ndeconv.training.segmentation import evaluate_segmentation, train_segmentation
from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


def _json_out(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _hand_metrics(model: torch.nn.Module, dataset: str, root: Path, num_classes: int, base_size: int,
                  limit: int | None = None) -> dict:
    """Pixel accuracy and IoU counted with numpy from the model's argmax on each val image (no ConfusionMatrix)."""
    val = SegmentationFolder(dataset, root, "val", num_classes, base_size, base_size, training=False, limit=limit)
    preds, targets = [], []
    with torch.no_grad():
        for i in range(len(val)):
            image, target = val[i]
            preds.append(model.eval()(image[None])["out"].argmax(1)[0].numpy().ravel())
            targets.append(target.numpy().ravel())
    pred, target = np.concatenate(preds), np.concatenate(targets)
    keep = target != 255
    pred, target = pred[keep], target[keep]
    iou = []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (target == c))
        union = np.sum((pred == c) | (target == c))
        iou.append(None if union == 0 else 100.0 * inter / union)
    present = [v for v in iou if v is not None]
    return {"pixel_acc": 100.0 * np.mean(pred == target), "iou": iou, "miou": sum(present) / len(present),
            "count": len(val)}


# -- eval ------------------------------------------------------------------------------------------------------


def test_eval_of_a_train_seg_run_equals_its_recorded_val_metrics(tmp_path: Path, small_models: None,  # noqa: F811
                                                                 capsys: pytest.CaptureFixture) -> None:
    data = make_cityscapes(tmp_path / "cs", n_train=2, n_val=2)
    run = train_segmentation(tiny_config(data), out=tmp_path / "run").run_dir  # fcn_resnet50 (BatchNorm), 3 classes
    recorded = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # The run records its dataset and base size: --dataset and --base-size are optional.
    assert main(["eval", str(run), "--data-dir", str(data), "--json", "--device", "cpu"]) == 0
    got = _json_out(capsys)
    assert got["dataset"] == "cityscapes" and got["count"] == 2 and got["base_size"] == 32
    assert got["label_names"] == ["road", "sidewalk", "building"]
    for key in ("pixel_acc", "miou", "iou", "class_acc"):
        assert got[key] == recorded[key], key  # the same function on the same weights: equal, not close
    assert got["iou_by_class"] == dict(zip(got["label_names"], recorded["iou"], strict=True))
    # The first val image only: as counted by hand from the run's model.
    assert main(["eval", str(run), "--data-dir", str(data), "--test-subset", "1", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    hand = _hand_metrics(load_model(run).model, "cityscapes", data, 3, 32, limit=1)
    assert line.startswith(f"{run} on cityscapes val (1 images") and "mIoU" in line
    assert f"pixel acc {hand['pixel_acc']:.2f}%" in line and f"mIoU {hand['miou']:.2f}%" in line


def test_eval_of_a_checkpoint_with_arch_matches_a_hand_count(tmp_path: Path, small_models: None,  # noqa: F811
                                                              capsys: pytest.CaptureFixture) -> None:
    data = make_voc(tmp_path / "voc", n_train=1, n_val=2)
    torch.manual_seed(0)
    net = SEGMENTATION_MODELS["fcn_resnet50_deconv"](num_classes=3, aux_loss=True, block=8, deconv_iter=2).eval()
    path = tmp_path / "seg.safetensors"  # as convert-reference writes it, here without the config.json beside it
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    args = ["eval", "--checkpoint", str(path), "--arch", "fcn_resnet50d", "--data-dir", str(data), "--base-size", "32",
            "--device", "cpu"]
    assert main([*args, "--dataset", "voc", "--json"]) == 0
    got = _json_out(capsys)
    hand = _hand_metrics(net, "voc", data, 3, 32)
    assert got["count"] == 2 and got["num_classes"] == 3 and got["label_names"] == ["background", "aeroplane",
                                                                                      "bicycle"]
    assert got["pixel_acc"] == pytest.approx(hand["pixel_acc"], abs=1e-9)
    assert got["iou"] == pytest.approx(hand["iou"], abs=1e-9) and got["miou"] == pytest.approx(hand["miou"], abs=1e-9)
    # The library function gives the same numbers.
    result = evaluate_segmentation(net, "voc", data, base_size=32)
    assert (result.pixel_acc, result.iou) == (got["pixel_acc"], got["iou"])
    # No run records the data: --dataset is needed, and said so in one line.
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --dataset cityscapes or voc" in err


def test_eval_refuses_a_task_and_dataset_mismatch(tmp_path: Path, small_models: None,  # noqa: F811
                                                  capsys: pytest.CaptureFixture) -> None:
    data = make_voc(tmp_path / "voc", n_train=1, n_val=1)
    seg = SEGMENTATION_MODELS["fcn_resnet50_deconv"](num_classes=3, deconv=False).eval()
    seg_path = tmp_path / "seg" / "seg.safetensors"
    seg_path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in seg.state_dict().items()}, str(seg_path))
    clf = ndeconv.zoo.create_model("simple_v1_deconv")  # not a timm model: no feature maps
    clf_path = tmp_path / "clf" / "clf.safetensors"
    clf_path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(clf_path))
    cases = [
        (["--checkpoint", str(clf_path), "--arch", "simple_v1", "--dataset", "cityscapes"], "is a classifier"),
        # The BatchNorm name resolves for --arch too.
        (["--checkpoint", str(seg_path), "--arch", "fcn_resnet50", "--dataset", "fashion_mnist"],
         "is a segmentation model and fashion_mnist a classification dataset"),
        (["--checkpoint", str(seg_path), "--arch", "fcn_resnet50", "--dataset", "voc", "--img-size", "32"],
         "--base-size"),
    ]
    for extra, message in cases:
        assert main(["eval", *extra, "--data-dir", str(data), "--device", "cpu"]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(["eval", "--checkpoint", str(seg_path), "--arch", "fcn_resnet50", "--dataset", "voc", "--data-dir",
                 str(data), "--base-size", "32", "--device", "cpu", "--json"]) == 0
    assert _json_out(capsys)["count"] == 1


# -- --input-size ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # two FCN exports: about 8 s
def test_export_and_fold_take_the_input_size(tmp_path: Path, small_models: None,  # noqa: F811
                                             capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import ndeconv.convert

    seen = []
    real_fold = ndeconv.convert.fold_with_report

    def fold_with_report(model, example_input=None, **kwargs):  # noqa: ANN001, ANN202
        seen.append(None if example_input is None else tuple(example_input.shape))
        return real_fold(model, example_input=example_input, **kwargs)

    monkeypatch.setattr(ndeconv.convert, "fold_with_report", fold_with_report)
    onnx_path = tmp_path / "fcn.onnx"
    assert main(["export", "fcn_resnet50", "--random-init", "--input-size", "3", "40", "40", "-o",
                 str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert "input 3x40x40" in out and "verified: max abs diff" in out
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["input_size"]) == [3, 40, 40]
    (logits,) = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 24, 56), np.float32)})
    assert logits.shape == (1, 21, 24, 56)  # traced square, run at any size
    folded = tmp_path / "fold" / "fcn.safetensors"
    assert main(["fold", "fcn_resnet50d", "--random-init", "--input-size", "3", "24", "40", "-o", str(folded)]) == 0
    assert folded.is_file() and seen == [(2, 3, 24, 40)]  # the folded model is checked on that input
    capsys.readouterr()  # fold's warning that the whitening is untrained
    bad = [(["3", "40"], "takes C H W (3 values), e.g. --input-size 3 "),
           (["1", "40", "48"], "takes 3 input channel(s), not 1"),
           (["3", "0", "48"], "every size must be >= 1")]
    for command in ("export", "fold"):
        target = str(tmp_path / ("never.onnx" if command == "export" else "never.safetensors"))
        for values, message in bad:
            assert main([command, "fcn_resnet50", "--random-init", "--input-size", *values, "-o", target]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and message in err, (command, err)
    assert main(["export", "fcn_resnet50", "--random-init", "--input-size", "3", "40", "56", "-o",
                 str(tmp_path / "never.onnx")]) == 2
    assert "pass --input-size 3 40 40" in capsys.readouterr().err
    assert not list(tmp_path.glob("never.*"))


# -- the authors' BatchNorm names ------------------------------------------------------------------------------


def test_the_batchnorm_baseline_names_build_the_zoo_model_without_deconv(tmp_path: Path,
                                                                        small_models: None) -> None:  # noqa: F811
    for name in ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"):
        assert pretrained_model_name(name) == f"{name}_deconv"
    with pytest.raises(UsageError, match="no pretrained weights exist"):
        load_model("fcn_resnet50")
    baseline = load_model("fcn_resnet50", random_init=True, model_args={"num_classes": 4}).model
    assert not any(isinstance(m, FastDeconv) for m in baseline.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in baseline.modules())
    assert baseline(torch.randn(1, 3, 32, 32))["out"].shape == (1, 4, 32, 32)
    # An explicit deconv wins; the zoo name and the authors' d-name stay deconvolution models.
    forced = load_model("fcn_resnet50", random_init=True, model_args={"deconv": True, "block": 8}).model
    assert any(isinstance(m, FastDeconv) for m in forced.modules())
    assert any(isinstance(m, FastDeconv) for m in load_model("fcn_resnet50d", random_init=True).model.modules())
    # fold by the name records the BatchNorm form.
    path = tmp_path / "fcn.safetensors"
    assert main(["fold", "fcn_resnet50", "--random-init", "-o", str(path)]) == 0
    from ndeconv.convert import read_folded_config

    config = read_folded_config(path)
    assert config["architecture"] == "fcn_resnet50_deconv" and config["model_args"]["deconv"] is False
