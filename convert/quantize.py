"""Int8 deployment: static quantization of an exported (folded) ONNX file with onnxruntime.

``export_int8`` folds and exports the model in float32 (``export_onnx``), calibrates on training images (never test
images) preprocessed as the file's metadata says, quantizes statically with ``onnxruntime.quantization`` in QDQ
format (int8 weights, per output channel by default; uint8 activations, per tensor; by default, ``auto``, the
activation ranges of minmax or of percentile calibration, whichever file agrees better with the float32 one on
held-out training images) and checks the result: the
graph holds only plain inference ops plus QuantizeLinear/DequantizeLinear, every conv/linear weight is stored as
int8, onnxruntime runs it, and its test-set top-1 stands beside the float32 file's. The settings and the measured
top-1 are written into the file's metadata_props beside the export's keys (``quantization``, ``int8_check``).

The QDQ graph uses standard ONNX ops only (no onnxruntime-specific fusions are baked in), so other runtimes that
read QDQ models take it too; onnxruntime fuses the pairs into int8 kernels when it loads the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ndeconv.errors import NdeconvError, UsageError
from ndeconv.io import atomic_write, check_output_path
from ndeconv.onnx_defaults import (
    AUTO_CALIBRATION_METHODS,
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CALIBRATION_METHOD,
    DEFAULT_OPSET,
    DEFAULT_SELECTION_IMAGES,
    MIN_CALIBRATION_IMAGES,
)

from .export import ALLOWED_OPS, _write_metadata, export_onnx, onnx_op_types, read_onnx_metadata

__all__ = [
    "AUTO_CALIBRATION_METHODS",
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION_IMAGES",
    "DEFAULT_CALIBRATION_METHOD",
    "DEFAULT_SELECTION_IMAGES",
    "INT8_METADATA_KEYS",
    "MIN_CALIBRATION_IMAGES",
    "Int8Check",
    "Int8ExportResult",
    "calibration_images",
    "check_int8_graph",
    "export_int8",
    "held_out_images",
    "onnx_top1",
    "quantize_onnx",
]

# The metadata_props an int8 file has beside those of every export (ndeconv.convert.export.METADATA_KEYS).
INT8_METADATA_KEYS: dict[str, str] = {
    "quantization": "the settings, JSON: format (QDQ), weights and activations (type, symmetry, scale granularity), "
                    "calibration (method), calibration_images, calibration_data (dataset and split), "
                    "calibration_seed, onnxruntime (the quantizer's version); with --calibrate-method auto, "
                    "calibration_choice: the rule, held_out_images and each candidate method's agreement with "
                    "the float32 file (percent) and mean KL divergence from it on those images",
    "int8_check": "what verification measured, JSON (when verified): dataset, test_images, top1_float32 and "
                  "top1_int8 (percent, onnxruntime on the test split), runtime",
}
_CALIBRATION_BATCH = 32
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Int8Check:
    """What the checks of a quantized file found: its ops, how many conv/linear layers hold int8 weights, and
    (when measured) top-1 of the float32 and int8 files on ``images`` test images of ``dataset``."""

    ops: dict[str, int]
    quantized_layers: int
    weighted_layers: int
    dataset: str | None = None
    images: int = 0
    top1_float32: float | None = None
    top1_int8: float | None = None

    def metadata(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "test_images": self.images, "top1_float32": self.top1_float32,
                "top1_int8": self.top1_int8, "runtime": "onnxruntime CPUExecutionProvider"}


@dataclass
class Int8ExportResult:
    path: Path
    settings: dict[str, Any]  # what metadata_props['quantization'] records
    check: Int8Check
    metadata: dict[str, str] = field(default_factory=dict)


def _check_method(name: str) -> None:
    if name not in CALIBRATION_METHODS:
        raise UsageError(f"calibration method {name!r}: choose one of {', '.join(CALIBRATION_METHODS)}")


def _ort_method(name: str):  # noqa: ANN202 - onnxruntime's CalibrationMethod
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _preprocessed(images: Any, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 normalised as an export's metadata says: x / 255, then (x - mean) / std."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - m) / s


def _file_preprocessing(metadata: Mapping[str, str], path: Path) -> tuple[list[int], list[float], list[float], float]:
    """(input_size, mean, std, crop_pct) as an export's metadata_props record them."""
    try:
        size = json.loads(metadata["input_size"])
        mean, std = json.loads(metadata["mean"]), json.loads(metadata["std"])
        crop_pct = float(metadata.get("crop_pct", "1.0"))
    except (KeyError, ValueError, TypeError) as err:
        raise NdeconvError(f"{path}: its metadata_props do not say how to feed it ({err}); export it with "
                           "`ndeconv export`") from err
    if len(size) != 3:
        raise UsageError(f"{path}: input {size} is not an image (C, H, W); int8 calibration feeds images")
    return size, mean, std, crop_pct


def _image_source(dataset: str, split: str, data_dir: str | None, size: list[int], crop_pct: float,
                  class_names: list[str] | None = None):  # noqa: ANN202 - an ndeconv.datasets.ImageSource
    """A split of ``dataset`` decoded at the model's size; an image folder's labels in ``class_names`` order."""
    from ndeconv.datasets import get_spec, load_split

    spec = get_spec(dataset)
    if spec.in_chans != size[0] and (spec.in_chans, size[0]) != (1, 3):
        raise UsageError(f"{dataset} has {spec.in_chans}-channel images but the model takes {size[0]}; calibrate on "
                         "the data the model was trained on")
    source = load_split(dataset, split, data_dir, size[1], class_names=class_names, crop_pct=crop_pct)
    if len(source):
        got = tuple(source.batch(torch.arange(1)).shape[-2:])
        if got != tuple(size[1:]):
            raise UsageError(f"{dataset}'s {split} images are {got[0]}x{got[1]} but the model takes "
                             f"{size[1]}x{size[2]}; calibrate on the data the model was trained on")
    return source


def _uint8_batch(source, indices, channels: int) -> np.ndarray:  # noqa: ANN001 - an ImageSource, a torch index
    """The images at ``indices`` with ``channels`` channels: gray images for an RGB model are repeated over its
    three channels, as timm's loader converts them (``Image.convert('RGB')``)."""
    images = source.batch(indices).numpy()
    return images.repeat(channels, axis=1) if images.shape[1] == 1 and channels != 1 else images


def calibration_images(
    dataset: str,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    *,
    input_size: tuple[int, int, int] | list[int],
    mean: list[float],
    std: list[float],
    crop_pct: float = 1.0,
    data_dir: str | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``count`` images of ``dataset``'s training split (never its test split), drawn at random by ``seed``,
    preprocessed as a model of ``input_size`` (C, H, W) with ``mean``/``std`` is fed: float32 (count, C, H, W)."""
    _check_count(count)
    source = _image_source(dataset, "train", data_dir, list(input_size), crop_pct)
    return _drawn_images(source, dataset, 0, count, "calibration", input_size, mean, std, seed)


def held_out_images(
    dataset: str,
    count: int | None = None,
    *,
    after: int,
    input_size: tuple[int, int, int] | list[int],
    mean: list[float],
    std: list[float],
    crop_pct: float = 1.0,
    data_dir: str | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``count`` training images of ``dataset`` that ``calibration_images(dataset, after, seed=seed)`` does not
    hold (the next ``count`` of the same draw), preprocessed alike: what ``--calibrate-method auto`` chooses on.
    ``None``: ``DEFAULT_SELECTION_IMAGES``, or as many as the split has left after the calibration images."""
    if count is not None and count < 1:
        raise UsageError(f"{count} held-out images: choose at least 1 (default {DEFAULT_SELECTION_IMAGES})")
    source = _image_source(dataset, "train", data_dir, list(input_size), crop_pct)
    if count is None:
        count = min(DEFAULT_SELECTION_IMAGES, len(source) - after)
        if count < 1:
            raise UsageError(f"calibration method auto chooses on training images other than the {after} calibration "
                             f"images, and {dataset}'s training split has {len(source)}: calibrate on fewer, or name "
                             f"a method ({', '.join(AUTO_CALIBRATION_METHODS)})")
    return _drawn_images(source, dataset, after, after + count, "calibration and held-out", input_size, mean, std,
                         seed)


def _drawn_images(source, dataset: str, start: int, stop: int, what: str,  # noqa: ANN001 - an ImageSource
                  input_size: tuple[int, int, int] | list[int], mean: list[float], std: list[float],
                  seed: int) -> np.ndarray:
    """Images ``start:stop`` of the training split ``source`` in the order ``seed`` draws them."""
    if stop > len(source):
        raise UsageError(f"{stop} {what} images asked for but {dataset}'s training split has {len(source)}; "
                         f"use at most {len(source)} in all")
    chosen = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[start:stop].sort().values
    return _preprocessed(_uint8_batch(source, chosen, int(input_size[0])), mean, std)


def _check_count(count: int) -> None:
    if count < MIN_CALIBRATION_IMAGES:
        raise UsageError(f"{count} calibration image(s) are too few to set the activation ranges: use at least "
                         f"{MIN_CALIBRATION_IMAGES} (default {DEFAULT_CALIBRATION_IMAGES})")


class _Reader:
    """onnxruntime's CalibrationDataReader over an array, in batches, fed one batch per collection round.

    onnxruntime's calibrators keep every activation the reader's data produces until a round ends (the histogram
    methods keep them in full: DenseNet-121 on 512 images held about 20 GB). With ``CalibStridedMinMax`` set to 1
    (``_ROUND_OPTIONS``), ``quantize_static`` calls ``set_range`` and collects once per batch; each round's minima
    and maxima or histograms are merged into the previous ones, so memory is bounded by one batch's activations."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = _CALIBRATION_BATCH):
        self._all = np.array_split(images, max(1, -(-len(images) // batch)))
        self._batches: Iterator[np.ndarray] = iter(self._all)
        self.input_name = input_name

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(self._all[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch)}

    def __iter__(self):  # noqa: ANN204 - onnxruntime >= 1.17 iterates the reader
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


# One collection round per reader batch (the option's name says MinMax; quantize_static applies it to every method).
_ROUND_OPTIONS = {"CalibStridedMinMax": 1}
# A BatchNormalization left in the graph (one before a conv, which folding cannot fuse: DenseNet's, pre-activation
# blocks') has a 1-D scale; onnxruntime's per-channel axis for it is 1, out of range, so it warned once per such
# node and quantized the scale per tensor. Its channels are axis 0.
_PER_CHANNEL_AXES = {"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}}


def check_int8_graph(path: str | os.PathLike) -> Int8Check:
    """Fail unless the quantized graph holds only :data:`~ndeconv.convert.export.ALLOWED_OPS` plus
    QuantizeLinear/DequantizeLinear and every Conv/Gemm/MatMul weight is an int8 initializer behind a
    DequantizeLinear; onnx.checker (full) must accept it."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # noqa: BLE001 - onnx raises several error types
        raise NdeconvError(f"{path}: onnx.checker rejects the quantized model: {err}") from err
    ops = onnx_op_types(path)
    unexpected = sorted(set(ops) - ALLOWED_OPS - _QDQ_OPS)
    if unexpected:
        raise NdeconvError(f"{path}: unexpected ops in the quantized graph: {', '.join(unexpected)}")
    model = onnx.load(str(path), load_external_data=False)
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weighted = [n for n in model.graph.node if n.op_type in _WEIGHTED_OPS and len(n.input) > 1]
    quantized = [n for n in weighted if dequantized.get(n.input[1]) in int8]
    return Int8Check(ops=dict(ops), quantized_layers=len(quantized), weighted_layers=len(weighted))


def quantize_onnx(
    float_path: str | os.PathLike,
    path: str | os.PathLike,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    method: str = "minmax",
    force: bool = False,
    settings: Mapping[str, Any] | None = None,
    activation_bits: int = 8,
    held_out: np.ndarray | None = None,
) -> dict[str, Any]:
    """Quantize the float32 ONNX file at ``float_path`` statically into ``path`` (QDQ, int8 weights per output
    channel or per tensor, uint8 activations per tensor), with activation ranges calibrated by ``method`` on
    ``calibration`` (float32 N x C x H x W, preprocessed as the file is fed). The float file's metadata_props
    are kept; ``quantization`` (JSON) records the settings, with ``settings`` (what the caller knows of the
    calibration data) added. Written atomically; returns the recorded settings.

    ``method="auto"`` quantizes with each of ``AUTO_CALIBRATION_METHODS`` and keeps the file whose top-1 agrees
    with the float32 file's on the most ``held_out`` images (float32 N x C x H x W, none of them calibration
    images), ties going to the lower mean KL divergence from the float32 outputs; ``calibration`` records the
    method kept and ``calibration_choice`` how each candidate scored.

    ``activation_bits=16`` stores activations as uint16 instead (opset 21's 16-bit QuantizeLinear: onnxruntime
    raises the file's opset), to measure what 8-bit activations cost; it is not an int8 file."""
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, path = Path(float_path), check_output_path(path, force)
    _check_method(method)
    if method == "auto":
        if held_out is None:
            raise UsageError("calibration method auto chooses on held-out images: pass held_out (float32 N x C x H "
                             "x W training images that are not calibration images), or name a method")
        held_out = _image_batch(held_out, "held-out")
    elif held_out is not None:
        raise UsageError(f"held-out images are what calibration method auto chooses on; method {method!r} uses none: "
                         "drop held_out or use method='auto'")
    activation_types = {8: QuantType.QUInt8, 16: QuantType.QUInt16}
    if activation_bits not in activation_types:
        raise UsageError(f"activation_bits {activation_bits}: choose 8 or 16")
    calibration = _image_batch(calibration, "calibration")
    metadata = read_onnx_metadata(float_path)
    recorded = {
        "format": "QDQ",
        "weights": f"int8, symmetric, {'per output channel' if per_channel else 'per tensor'}",
        "activations": f"uint{activation_bits}, asymmetric, per tensor",
        "calibration": method,
        "calibration_images": len(calibration),
        **dict(settings or {}),
        "onnxruntime": onnxruntime.__version__,
    }
    import onnx

    def quantize(prepared: Path, quantized: Path, calibrate: str) -> None:
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        try:
            # The histogram calibrators print a progress line per collection round on stdout, which is the
            # command's own: not passed on (onnxruntime's warnings go through logging, to stderr).
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(prepared), str(quantized), _Reader(input_name, calibration),
                                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=activation_types[activation_bits], weight_type=QuantType.QInt8,
                                calibrate_method=_ort_method(calibrate),
                                extra_options={**_ROUND_OPTIONS, **_PER_CHANNEL_AXES})
        except Exception as err:  # noqa: BLE001 - onnxruntime's quantizer raises many types
            raise NdeconvError(f"onnxruntime could not quantize {float_path}: {type(err).__name__}: {err}") from err

    def write(quantized: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as work:
            prepared = Path(work) / "prepared.onnx"
            # Shape inference only: onnxruntime's graph optimizations would bake its own fused ops into the file.
            quant_pre_process(str(float_path), str(prepared), skip_optimization=True)
            if method != "auto":
                quantize(prepared, quantized, method)
            else:
                reference = _onnx_outputs(float_path, held_out)
                scores = {}
                for candidate in AUTO_CALIBRATION_METHODS:
                    quantize(prepared, Path(work) / f"{candidate}.onnx", candidate)
                    scores[candidate] = _agreement(reference, _onnx_outputs(Path(work) / f"{candidate}.onnx",
                                                                             held_out))
                kept = max(AUTO_CALIBRATION_METHODS,  # the first listed on a full tie
                           key=lambda m: (scores[m]["agreement"], -scores[m]["kl_divergence"]))
                os.replace(Path(work) / f"{kept}.onnx", quantized)
                recorded["calibration"] = kept
                recorded["calibration_choice"] = {
                    "rule": "auto: the candidate whose top-1 agrees with the float32 file's on the most held-out "
                            "images (ties: the lower mean KL divergence from the float32 outputs)",
                    "held_out_images": len(held_out),
                    "candidates": {m: {"agreement": round(v["agreement"], 2),
                                       "kl_divergence": float(f"{v['kl_divergence']:.4g}")} for m, v in scores.items()}}
        _write_metadata(quantized, {**metadata, "quantization": json.dumps(recorded)})

    atomic_write(path, write)
    return recorded


def _image_batch(images: Any, what: str) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise UsageError(f"{what} data of shape {tuple(images.shape)}: give a float32 N x C x H x W batch")
    return images


def _onnx_runner(path: Path, threads: int | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], int | None]:
    """A function running the ONNX file at ``path`` through onnxruntime on a float32 batch (its first output), and
    the file's static batch size (None: dynamic). A static-batch file is fed its own batch: a shorter one is padded
    with zeros, and only its own rows come back. ``threads``: onnxruntime's intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    static = batch if isinstance(batch, int) else None
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        rows = len(x)
        if static is not None and rows < static:
            x = np.concatenate([x, np.zeros((static - rows, *x.shape[1:]), np.float32)])
        return session.run(None, {name: np.ascontiguousarray(x)})[0][:rows]

    return run, static


def _onnx_outputs(path: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The first output of the ONNX file at ``path`` on ``images``, through onnxruntime, as float64."""
    run, static = _onnx_runner(path)
    step = static or batch_size
    return np.concatenate([run(images[i:i + step]) for i in range(0, len(images), step)]).astype(np.float64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _agreement(reference: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """How closely ``quantized`` logits follow the float32 ``reference``: top-1 agreement (percent of images) and
    the mean KL divergence of the quantized softmax from the reference's."""
    log_p, log_q = _log_softmax(reference), _log_softmax(quantized)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean())
    agree = float((reference.argmax(1) == quantized.argmax(1)).mean() * 100)
    return {"agreement": agree, "kl_divergence": kl}


def onnx_top1(
    path: str | os.PathLike,
    dataset: str,
    *,
    data_dir: str | None = None,
    count: int | None = None,
    batch_size: int = 256,
    threads: int | None = None,
) -> tuple[float, int]:
    """(top-1 in percent, images) of an exported classifier through onnxruntime on the first ``count`` (default:
    all) test images of ``dataset``, fed as the file's metadata_props say; ``threads``: onnxruntime's intra-op
    threads (default: its own choice)."""

    path = Path(path)
    metadata = read_onnx_metadata(path)
    size, mean, std, crop_pct = _file_preprocessing(metadata, path)
    labels = json.loads(metadata["label_names"]) if "label_names" in metadata else None
    source = _image_source(dataset, "test", data_dir, size, crop_pct, labels).subset(count)
    run, static = _onnx_runner(path, threads)
    step = static or batch_size
    correct, total = 0, len(source)
    for start in range(0, total, step):
        stop = min(start + step, total)
        logits = run(_preprocessed(_uint8_batch(source, torch.arange(start, stop), size[0]), mean, std))
        correct += int((logits.argmax(1) == source.labels[start:stop].numpy()).sum())
    return (100.0 * correct / total if total else 0.0), total


def export_int8(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    calibrate_data: str,
    calibrate_images: int = DEFAULT_CALIBRATION_IMAGES,
    per_channel: bool = True,
    method: str = DEFAULT_CALIBRATION_METHOD,
    selection_images: int | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    verify: bool = True,
    verify_images: int | None = None,
    opset: int = DEFAULT_OPSET,
    static_batch: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    force: bool = False,
    config: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> Int8ExportResult:
    """Fold ``model``, export it in float32 (``export_onnx``, verified against PyTorch when ``verify``), quantize it
    with ``calibrate_images`` training images of ``calibrate_data`` (``quantize_onnx``) and write the int8 file
    to ``path``; ``method="auto"`` chooses between ``AUTO_CALIBRATION_METHODS`` on the next ``selection_images``
    training images of the same draw (``quantize_onnx``; default: ``DEFAULT_SELECTION_IMAGES`` or what the split
    has left). With ``verify``, the quantized graph is checked
    (``check_int8_graph``) and both files are scored on the test split of ``calibrate_data`` (the first
    ``verify_images``, default all) before the file takes ``path``'s place; the scores go into
    metadata_props['int8_check']. Nothing replaces ``path`` on failure."""
    from ndeconv.datasets import get_spec

    # Bad settings fail before the (long) export.
    _check_method(method)
    _check_count(calibrate_images)
    if method == "auto" and selection_images is not None and selection_images < 1:
        raise UsageError(f"{selection_images} held-out images: calibration method auto needs at least 1 (default "
                         f"{DEFAULT_SELECTION_IMAGES})")
    get_spec(calibrate_data)
    if verify_images is not None and verify_images < 1:
        raise UsageError(f"verify images must be >= 1, got {verify_images}; leave it out to score every test image")
    path = check_output_path(path, force)
    result: dict[str, Any] = {}

    def write(int8_path: Path) -> None:  # verified before it replaces anything at ``path``
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as work:
            float_path = Path(work) / "float32.onnx"
            exported = export_onnx(model, float_path, opset=opset, static_batch=static_batch, input_size=input_size,
                                   verify=verify, config=config, source=source)
            size, mean, std, crop_pct = _file_preprocessing(exported.metadata, path)
            drawn = dict(input_size=size, mean=mean, std=std, crop_pct=crop_pct, data_dir=data_dir, seed=seed)
            images = calibration_images(calibrate_data, calibrate_images, **drawn)
            held_out = (held_out_images(calibrate_data, selection_images, after=calibrate_images, **drawn)
                        if method == "auto" else None)
            result["settings"] = quantize_onnx(
                float_path, int8_path, images, per_channel=per_channel, method=method, force=True,
                settings={"calibration_data": f"{calibrate_data} train", "calibration_seed": seed},
                held_out=held_out)
            check = result["check"] = check_int8_graph(int8_path)
            if verify:
                check.dataset = calibrate_data
                check.top1_float32, check.images = onnx_top1(float_path, calibrate_data, data_dir=data_dir,
                                                             count=verify_images)
                check.top1_int8, _ = onnx_top1(int8_path, calibrate_data, data_dir=data_dir, count=verify_images)
                _write_metadata(int8_path, {"int8_check": json.dumps(check.metadata())})
        result["metadata"] = read_onnx_metadata(int8_path)

    atomic_write(path, write)
    return Int8ExportResult(path=path, **result)
