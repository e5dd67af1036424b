"""Int8 export (``ndeconv export --int8``, ``ndeconv.convert.quantize``): a folded model quantized statically with
onnxruntime, calibrated on training images only, checked, scored beside its float32 file, with its settings in the
file's metadata; bad settings refused in one line, and nothing on disk lost on failure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_data import write_idx
from test_fold import trained

from ndeconv.cli import main
from ndeconv.convert import quantize as quantize_module
from ndeconv.convert.export import read_onnx_metadata
from ndeconv.convert.quantize import (
    AUTO_CALIBRATION_METHODS,
    INT8_METADATA_KEYS,
    calibration_images,
    check_int8_graph,
    export_int8,
    held_out_images,
    onnx_top1,
)
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.errors import NdeconvError, UsageError

DEPLOYMENT_DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
needs_fashion = pytest.mark.skipif(not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)")


def write_fashion(folder: Path, train: int = 64, test: int = 40) -> Path:
    """Fashion-MNIST-shaped IDX files whose training images are dark (pixels < 100) and test images bright (pixels
    >= 150), so a calibration batch shows which split it came from. Images are smooth blobs, labels 0..9."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:28, :28]
    for split, n, low, high in (("train", train, 0, 99), ("t10k", test, 150, 255)):
        centres = rng.integers(6, 22, (n, 2))
        blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 40.0)
        images = (low + (high - low) * blobs).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz=False)
        write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, gz=False)
    return folder


def test_calibration_draws_training_images_only(tmp_path) -> None:
    data = write_fashion(tmp_path / "data")
    images = calibration_images("fashion_mnist", 32, input_size=(1, 32, 32), mean=[0.0], std=[1.0],
                                data_dir=str(data))
    assert images.shape == (32, 1, 32, 32) and images.dtype == np.float32
    assert images.max() <= 99 / 255 + 1e-6  # every one a (dark) training image, none a (bright) test image
    # Seeded: the same draw twice, another with another seed; the 2-pixel zero border as the models were trained.
    again = calibration_images("fashion_mnist", 32, input_size=(1, 32, 32), mean=[0.0], std=[1.0], data_dir=str(data))
    other = calibration_images("fashion_mnist", 32, input_size=(1, 32, 32), mean=[0.0], std=[1.0], data_dir=str(data),
                               seed=1)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert not images[:, :, :2].any() and not images[:, :, -2:].any()
    # A three-channel (timm default) model gets the gray image on each channel, normalised per channel.
    rgb = calibration_images("fashion_mnist", 32, input_size=(3, 32, 32), mean=[0.5, 0.5, 0.5], std=[2.0, 2.0, 2.0],
                             data_dir=str(data))
    assert rgb.shape == (32, 3, 32, 32) and np.allclose(rgb[:, 1], (images[:, 0] - 0.5) / 2.0)


@pytest.mark.parametrize(("count", "message"), [
    (8, "8 calibration image(s) are too few to set the activation ranges: use at least 32"),
    (65, "65 calibration images asked for but fashion_mnist's training split has 64; use at most 64"),
])
def test_calibration_refuses_too_few_or_too_many_images(tmp_path, count: int, message: str) -> None:
    data = write_fashion(tmp_path / "data")
    with pytest.raises(UsageError) as err:
        calibration_images("fashion_mnist", count, input_size=(1, 32, 32), mean=[0.0], std=[1.0], data_dir=str(data))
    assert str(err.value).startswith(message)


def test_calibration_refuses_data_of_other_channels(tmp_path) -> None:
    data = write_fashion(tmp_path / "data")
    with pytest.raises(UsageError, match="fashion_mnist has 1-channel images but the model takes 2"):
        calibration_images("fashion_mnist", 32, input_size=(2, 32, 32), mean=[0.0] * 2, std=[1.0] * 2,
                           data_dir=str(data))


def test_export_int8_writes_a_checked_int8_file_with_its_settings(tmp_path) -> None:
    data = write_fashion(tmp_path / "data")
    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    path = tmp_path / "model.int8.onnx"
    result = export_int8(model, path, calibrate_data="fashion_mnist", calibrate_images=48, data_dir=str(data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model.int8.onnx"]  # no temporary files left

    # Every conv/linear weight is stored as int8 behind a DequantizeLinear; onnxruntime runs the file.
    check = check_int8_graph(path)
    assert check.quantized_layers == check.weighted_layers == 21
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= set(check.ops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 1, 32, 32)).astype(np.float32)
    assert session.run(None, {"input": x})[0].shape == (3, 10)

    meta = read_onnx_metadata(path)
    assert meta["folded"] == "true" and meta["input_size"] == "[1, 32, 32]"  # the export's keys are kept
    settings = json.loads(meta["quantization"])
    assert settings == result.settings
    # The default, auto: minmax or percentile, chosen on the 16 training images the calibration draw left.
    assert settings["format"] == "QDQ" and settings["calibration"] in AUTO_CALIBRATION_METHODS
    assert settings["calibration_choice"]["held_out_images"] == 16
    assert settings["calibration_images"] == 48 and settings["calibration_data"] == "fashion_mnist train"
    assert "per output channel" in settings["weights"] and settings["onnxruntime"] == ort.__version__
    scored = json.loads(meta["int8_check"])
    assert scored["test_images"] == 40 and scored["dataset"] == "fashion_mnist"
    assert scored["top1_int8"] == result.check.top1_int8
    # The scores are onnxruntime's on the test split, each file fed as its metadata says.
    assert onnx_top1(path, "fashion_mnist", data_dir=str(data)) == (scored["top1_int8"], 40)

    per_tensor = export_int8(model, tmp_path / "t.onnx", calibrate_data="fashion_mnist", calibrate_images=48,
                             data_dir=str(data), per_channel=False, verify=False)
    assert "per tensor" in per_tensor.settings["weights"] and per_tensor.check.top1_int8 is None
    assert "int8_check" not in read_onnx_metadata(tmp_path / "t.onnx")


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_calibration_holds_one_batch_of_activations_at_a_time(tmp_path, monkeypatch, method: str) -> None:
    """onnxruntime's calibrators keep every activation of what one collection round reads (the histogram methods in
    full: DenseNet-121 on 512 images took about 20 GB): the rounds are one reader batch each, and their ranges or
    histograms merged, so memory stays that of one batch whatever --calibrate-images is."""
    import importlib

    # importlib: the package's attribute `quantize` is a function, not this module.
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    data = write_fashion(tmp_path / "data")
    rounds: list[int] = []
    create = ort_quantize.create_calibrator

    def counting(*args, **kwargs):
        calibrator = create(*args, **kwargs)
        collect = calibrator.collect_data

        def collect_counted(reader):
            batches = []
            get_next = reader.get_next
            reader.get_next = lambda: batches.append(1) or get_next()  # one call more than batches: the end
            collect(reader)
            rounds.append(len(batches) - 1)
            reader.get_next = get_next

        calibrator.collect_data = collect_counted
        return calibrator

    monkeypatch.setattr(ort_quantize, "create_calibrator", counting)
    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    result = export_int8(model, tmp_path / "m.onnx", calibrate_data="fashion_mnist", calibrate_images=64,
                         method=method, data_dir=str(data), verify=False)
    assert rounds == [1, 1]  # 64 images: two batches of 32, one round each
    assert result.settings["calibration"] == method


def test_every_int8_metadata_key_is_documented() -> None:
    section = DEPLOYMENT_DOCS.read_text(encoding="utf-8").split("## Int8", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)) == set(INT8_METADATA_KEYS)


def test_a_failed_quantization_keeps_the_existing_file(tmp_path, monkeypatch) -> None:
    data = write_fashion(tmp_path / "data")
    path = tmp_path / "model.int8.onnx"
    path.write_bytes(b"the user's file")

    def broken(*args, **kwargs):
        raise RuntimeError("calibration ran out of memory")

    monkeypatch.setattr("onnxruntime.quantization.quantize_static", broken)
    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    with pytest.raises(NdeconvError, match="onnxruntime could not quantize .*: RuntimeError: calibration ran out"):
        export_int8(model, path, calibrate_data="fashion_mnist", calibrate_images=32, data_dir=str(data), force=True)
    assert path.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model.int8.onnx"]
    with pytest.raises(UsageError, match="exists"):  # and without --force it is not touched at all
        export_int8(model, path, calibrate_data="fashion_mnist", calibrate_images=32, data_dir=str(data))


@pytest.mark.parametrize(("args", "message"), [
    (["--int8"], "--int8 calibrates on training images: pass --calibrate-data DATASET"),
    (["--calibrate-data", "fashion_mnist"], "--calibrate-data is an int8 setting: add --int8, or drop it"),
    (["--per-tensor"], "--per-tensor is an int8 setting: add --int8, or drop it"),
    (["--int8", "--calibrate-data", "fashion_mnist", "--calibrate-images", "3"],
     "--calibrate-images 3: too few to set the activation ranges; use at least 32"),
    (["--int8", "--calibrate-data", "svhn"], "unknown dataset 'svhn'"),
    (["--int8", "--calibrate-data", "fashion_mnist", "--verify-images", "0"], "--verify-images 0: must be >= 1"),
    (["--int8", "--calibrate-data", "fashion_mnist", "--verify-images", "10", "--no-verify"],
     "--verify-images sets how many test images --verify scores"),
    (["--int8", "--calibrate-data", "fashion_mnist", "--calibrate-method", "mse"], "invalid choice: 'mse'"),
    (["--int8", "--calibrate-data", "fashion_mnist", "--calibrate-method", "minmax", "--held-out-images", "100"],
     "--held-out-images sets what --calibrate-method auto chooses on: add --calibrate-method auto, or drop it"),
    (["--int8", "--calibrate-data", "fashion_mnist", "--calibrate-method", "auto", "--held-out-images", "0"],
     "--held-out-images 0: must be >= 1"),
    (["--held-out-images", "100"], "--held-out-images is an int8 setting: add --int8, or drop it"),
])
def test_cli_refuses_bad_int8_settings_in_one_line(tmp_path, capsys, args: list[str], message: str) -> None:
    out = tmp_path / "model.onnx"
    try:
        code = main(["export", "resnet18_deconv.fashion_mnist", "-o", str(out), *args])
    except SystemExit as exit_info:  # argparse's own refusals (an invalid choice) exit
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not out.exists()


def test_cli_without_calibration_data_on_disk_names_the_fix(tmp_path, capsys) -> None:
    code = main(["export", "resnet18_deconv.fashion_mnist", "-o", str(tmp_path / "m.onnx"), "--int8",
                 "--calibrate-data", "fashion_mnist", "--data-dir", str(tmp_path / "missing")])
    assert code == 2
    assert "data folder" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_cli_int8_export_of_shipped_weights_then_eval(tmp_path, capsys) -> None:
    data = write_fashion(tmp_path / "data", train=96, test=40)
    out = tmp_path / "resnet18.int8.onnx"
    assert main(["export", "resnet18_deconv.fashion_mnist", "-o", str(out), "--int8", "--calibrate-data",
                 "fashion_mnist", "--data-dir", str(data), "--calibrate-images", "64", "--per-tensor",
                 "--held-out-images", "32"]) == 0  # the default method, auto
    printed = capsys.readouterr().out
    assert f"wrote {out} (int8 QDQ" in printed
    kept = json.loads(read_onnx_metadata(out)["quantization"])["calibration"]
    assert "weights int8, symmetric, per tensor; activations uint8, asymmetric, per tensor; calibrated by " \
           f"{kept} on 64 images of fashion_mnist train" in printed
    assert re.search(r"calibration method auto: agreement with the float32 file on 32 held-out training images: "
                     rf"minmax \d+\.\d\d%, percentile \d+\.\d\d%; kept {kept}\n", printed)
    assert "21 of 21 conv/linear layers hold int8 weights" in printed
    assert re.search(r"onnxruntime top-1 on fashion_mnist test \(40 images\): float32 \d+\.\d\d%, int8 \d+\.\d\d% "
                     r"\([+-]\d+\.\d\d points\)", printed)
    meta = read_onnx_metadata(out)
    assert meta["model"] == "resnet18_deconv.fashion_mnist" and meta["test_top1"] == "92.6"
    # An ONNX client of the float file reads the int8 file the same way: `ndeconv eval FILE.onnx` runs it.
    assert main(["eval", str(out), "--data-dir", str(data), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["count"] == 40 and scored["top1"] == pytest.approx(json.loads(meta["int8_check"])["top1_int8"])


@needs_fashion
def test_shipped_resnet18_keeps_its_top1_in_int8() -> None:
    """On real data: 512 training images calibrate, and the int8 file scores within one point of the float32 one on
    1,000 test images (the committed table, reproduce/int8.py, has every shipped model on all 10,000)."""
    import tempfile

    from ndeconv.loading import load_model

    model = load_model("resnet18_deconv.fashion_mnist").model
    with tempfile.TemporaryDirectory() as tmp:
        result = export_int8(model, Path(tmp) / "m.onnx", calibrate_data="fashion_mnist", verify_images=1000)
    assert result.check.images == 1000
    assert abs(result.check.top1_int8 - result.check.top1_float32) <= 1.0, result.check


def test_quantize_onnx_refuses_calibration_of_the_wrong_shape(tmp_path) -> None:
    with pytest.raises(UsageError, match=r"calibration data of shape \(4, 32, 32\): give a float32 N x C x H x W"):
        quantize_module.quantize_onnx(tmp_path / "f.onnx", tmp_path / "q.onnx", np.zeros((4, 32, 32), np.float32))


def test_16_bit_activations_for_measuring_what_8_bit_ones_cost(tmp_path) -> None:
    from ndeconv.convert.export import export_onnx

    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    float_path = export_onnx(model, tmp_path / "f.onnx", verify=False).path
    images = np.random.default_rng(0).standard_normal((32, 1, 32, 32)).astype(np.float32)
    with pytest.raises(UsageError, match="activation_bits 4: choose 8 or 16"):
        quantize_module.quantize_onnx(float_path, tmp_path / "q4.onnx", images, activation_bits=4)
    settings = quantize_module.quantize_onnx(float_path, tmp_path / "q16.onnx", images, activation_bits=16)
    assert settings["activations"] == "uint16, asymmetric, per tensor"
    session = ort.InferenceSession(str(tmp_path / "q16.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": images[:2]})[0].shape == (2, 10)


def _rows(images: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in images}


def test_held_out_images_are_the_next_ones_of_the_calibration_draw(tmp_path) -> None:
    data = write_fashion(tmp_path / "data")
    # Each training image told apart by its first pixel (the blobs may repeat).
    images = np.zeros((64, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(64)
    write_idx(data / "train-images-idx3-ubyte", images, gz=False)
    drawn = dict(input_size=(1, 32, 32), mean=[0.0], std=[1.0], data_dir=str(data))
    calibration = calibration_images("fashion_mnist", 32, **drawn)
    held_out = held_out_images("fashion_mnist", 20, after=32, **drawn)
    assert held_out.shape == (20, 1, 32, 32) and held_out.max() <= 99 / 255 + 1e-6  # training images
    assert not _rows(calibration) & _rows(held_out)
    assert _rows(calibration) | _rows(held_out) == _rows(calibration_images("fashion_mnist", 52, **drawn))
    with pytest.raises(UsageError, match="65 calibration and held-out images asked for but fashion_mnist's training "
                                         "split has 64; use at most 64 in all"):
        held_out_images("fashion_mnist", 33, after=32, **drawn)


def _agreement_of(reference_path: Path, path: Path, images: np.ndarray) -> float:
    """Top-1 agreement (percent) of two ONNX files on ``images``, computed here with onnxruntime alone."""
    def top1(p: Path) -> np.ndarray:
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]

    return float((top1(reference_path).argmax(1) == top1(path).argmax(1)).mean() * 100)


def test_auto_calibration_keeps_the_candidate_that_agrees_best_with_float32(tmp_path) -> None:
    from ndeconv.convert.export import export_onnx

    data = write_fashion(tmp_path / "data", train=128)
    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    path = tmp_path / "auto.onnx"
    result = export_int8(model, path, calibrate_data="fashion_mnist", calibrate_images=48, method="auto",
                         selection_images=64, data_dir=str(data), verify=False)
    settings = json.loads(read_onnx_metadata(path)["quantization"])
    assert settings == result.settings
    choice = settings["calibration_choice"]
    assert choice["held_out_images"] == 64 and list(choice["candidates"]) == list(AUTO_CALIBRATION_METHODS)
    assert settings["calibration"] in AUTO_CALIBRATION_METHODS and settings["calibration_images"] == 48

    # Each candidate made again by its own method on the same calibration images, and scored here on the same
    # held-out images: the recorded agreements are theirs, and the file kept is the best one's.
    float_path = export_onnx(model, tmp_path / "f.onnx", verify=False).path
    drawn = dict(input_size=(1, 32, 32), mean=[0.0], std=[1.0], data_dir=str(data))
    calibration = calibration_images("fashion_mnist", 48, **drawn)
    held_out = held_out_images("fashion_mnist", 64, after=48, **drawn)
    scores = {}
    for method in AUTO_CALIBRATION_METHODS:
        quantize_module.quantize_onnx(float_path, tmp_path / f"{method}.onnx", calibration, method=method)
        scores[method] = _agreement_of(float_path, tmp_path / f"{method}.onnx", held_out)
        assert choice["candidates"][method]["agreement"] == pytest.approx(scores[method])
        assert choice["candidates"][method]["kl_divergence"] >= 0
    assert scores[settings["calibration"]] == max(scores.values())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kept = ort.InferenceSession(str(tmp_path / f"{settings['calibration']}.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"input": held_out})[0], kept.run(None, {"input": held_out})[0])


@pytest.mark.parametrize(("scores", "kept"), [
    ({"minmax": (97.0, 0.01), "percentile": (98.0, 0.02)}, "percentile"),  # more agreement wins
    ({"minmax": (98.0, 0.02), "percentile": (98.0, 0.01)}, "percentile"),  # a tie: the lower KL divergence
    ({"minmax": (98.0, 0.01), "percentile": (98.0, 0.01)}, "minmax"),  # a full tie: the first listed
    ({"minmax": (99.0, 0.03), "percentile": (98.0, 0.01)}, "minmax"),
])
def test_auto_calibration_rule(tmp_path, monkeypatch, scores: dict, kept: str) -> None:
    from ndeconv.convert.export import export_onnx

    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    float_path = export_onnx(model, tmp_path / "f.onnx", verify=False).path
    images = np.random.default_rng(0).standard_normal((32, 1, 32, 32)).astype(np.float32)
    script = iter(scores.values())

    def scripted(reference, quantized) -> dict:
        agreement, kl = next(script)
        return {"agreement": agreement, "kl_divergence": kl}

    monkeypatch.setattr(quantize_module, "_agreement", scripted)
    settings = quantize_module.quantize_onnx(float_path, tmp_path / "q.onnx", images, method="auto",
                                             held_out=images[:8])
    assert settings["calibration"] == kept
    assert settings["calibration_choice"]["candidates"] == {
        m: {"agreement": a, "kl_divergence": k} for m, (a, k) in scores.items()}


def test_auto_calibration_needs_held_out_images(tmp_path) -> None:
    images = np.zeros((32, 1, 32, 32), np.float32)
    with pytest.raises(UsageError, match="calibration method auto chooses on held-out images: pass held_out"):
        quantize_module.quantize_onnx(tmp_path / "f.onnx", tmp_path / "q.onnx", images, method="auto")
    with pytest.raises(UsageError, match=r"held-out data of shape \(8, 32, 32\)"):
        quantize_module.quantize_onnx(tmp_path / "f.onnx", tmp_path / "q.onnx", images, method="auto",
                                      held_out=images[:8, 0])
    with pytest.raises(UsageError, match="held-out images are what calibration method auto chooses on; method "
                                         "'minmax' uses none"):
        quantize_module.quantize_onnx(tmp_path / "f.onnx", tmp_path / "q.onnx", images, method="minmax",
                                      held_out=images)
    with pytest.raises(UsageError, match="0 held-out images: calibration method auto needs at least 1"):
        export_int8(trained("resnet18_deconv", in_chans=1, num_classes=10), tmp_path / "m.onnx",
                    calibrate_data="fashion_mnist", method="auto", selection_images=0)


def test_auto_calibration_chooses_on_what_the_training_split_has_left(tmp_path) -> None:
    data = write_fashion(tmp_path / "data")  # 64 training images
    drawn = dict(input_size=(1, 32, 32), mean=[0.0], std=[1.0], data_dir=str(data))
    assert held_out_images("fashion_mnist", after=48, **drawn).shape[0] == 16  # not the default 1,000
    with pytest.raises(UsageError, match="calibration method auto chooses on training images other than the 64 "
                                         "calibration images, and fashion_mnist's training split has 64: calibrate "
                                         "on fewer, or name a method"):
        held_out_images("fashion_mnist", after=64, **drawn)
    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    result = export_int8(model, tmp_path / "m.onnx", calibrate_data="fashion_mnist", calibrate_images=48,
                         method="auto", data_dir=str(data), verify=False)
    assert result.settings["calibration_choice"]["held_out_images"] == 16


def test_a_batchnorm_left_in_the_graph_is_quantized_per_channel_without_warnings(tmp_path, caplog) -> None:
    """A BatchNorm that folding cannot fuse (it follows a ReLU, not a conv) keeps a 1-D scale: quantized per channel
    (onnxruntime's default axis for it, 1, is out of range: it warned per node and fell back to one scale)."""
    import logging

    import onnx
    import torch
    from torch import nn

    from ndeconv.convert.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).eval()
    model[2].weight.data.uniform_(0.1, 3.0)
    with pytest.warns(UserWarning, match="stay as per-channel affine layers"):
        float_path = export_onnx(model, tmp_path / "f.onnx", verify=False, input_size=(1, 32, 32)).path
    images = np.random.default_rng(0).standard_normal((32, 1, 32, 32)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        quantize_module.quantize_onnx(float_path, tmp_path / "q.onnx", images)
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    scale = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "2.weight_quantized")
    assert {a.name: a.i for a in scale.attribute}.get("axis") == 0
    initializer = next(t for t in graph.initializer if t.name == scale.input[1])
    assert list(initializer.dims) == [4]  # one scale per channel


def test_a_static_batch_file_is_scored_on_every_image_with_its_own_batch(tmp_path) -> None:
    """40 test images through a file of static batch 16: the last batch padded, only its own rows scored."""
    from ndeconv.convert.export import export_onnx

    data = write_fashion(tmp_path / "data")
    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    dynamic = export_onnx(model, tmp_path / "d.onnx", verify=False).path
    static = export_onnx(model, tmp_path / "s.onnx", verify=False, static_batch=16).path
    assert onnx_top1(static, "fashion_mnist", data_dir=str(data)) == onnx_top1(dynamic, "fashion_mnist",
                                                                               data_dir=str(data))
    images = np.random.default_rng(0).standard_normal((20, 1, 32, 32)).astype(np.float32)
    out = quantize_module._onnx_outputs(static, images)
    assert out.shape == (20, 10)
    assert np.allclose(out, quantize_module._onnx_outputs(dynamic, images), atol=1e-4)
