"""Export a folded model to one self-contained ONNX file and verify it with onnxruntime.

The model is folded first (``ndeconv.convert.fold``): the exported graph then holds plain inference ops only, and
every Conv/Gemm/MatMul weight is a stored initializer (no whitening subgraph computing weights at run time).
The dynamo exporter is used, with a dynamic batch axis by default. Files are written atomically: the
export goes to a temporary folder beside the target and is renamed into place.

Every export carries what a client needs to feed it in its ``metadata_props`` (string keys and values, JSON where
a value is a list; :data:`METADATA_KEYS` says what each means): the input's name, layout, dtype and fixed size,
the preprocessing (resize, zero padding, scale, mean, std), the label names and where the model came from. A
client with onnxruntime alone reads them as ``InferenceSession(path).get_modelmeta().custom_metadata_map``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ndeconv.errors import NdeconvError
from ndeconv.io import check_output_path, read_json
from ndeconv.onnx_defaults import DEFAULT_OPSET, MIN_OPSET, REL_TOLERANCE

from ._inputs import fashion_mnist_batch, random_batch
from .fold import (
    DECONV_TYPES,
    FoldReport,
    conv_dims,
    flatten_outputs,
    fold_with_report,
    model_input_size,
    output_difference,
)

__all__ = [
    "ALLOWED_OPS",
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "METADATA_KEYS",
    "MIN_OPSET",
    "ExportResult",
    "VerifyResult",
    "check_onnx_ops",
    "export_onnx",
    "model_input_size",
    "onnx_metadata",
    "onnx_op_types",
    "read_onnx_metadata",
    "verify_onnx",
    "verify_onnx_for_model",
    "weights_config",
]



def _max_opset() -> int:
    """The newest opset the installed exporter writes natively. Above it the exporter converts with onnx's
    version converter, which fails for some opsets and, for one past onnx's own newest, silently writes 18."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET

        return int(ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):  # another torch: onnx's own newest opset
        import onnx

        return int(onnx.defs.onnx_opset_version())


MAX_OPSET = _max_opset()
# What a folded CNN classifier needs at inference. Anything else (an Unfold decomposition, a Newton-Schulz
# or covariance subgraph: Einsum, ReduceSum, Sqrt, Pow, ...) means something was not folded.
ALLOWED_OPS = frozenset({
    "Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Clip", "HardSigmoid", "HardSwish",
    "Tanh", "Concat", "Split", "Slice", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
    "ReduceMax", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Constant", "Shape",
    "Gather", "BatchNormalization", "Cast", "Expand", "ConstantOfShape",
    # A segmentation model upsamples its logits to the input's size (bilinear interpolation): no whitening op.
    "Resize",
})
_WEIGHTED_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op -> index of its weight input
# onnx's protobuf limit is 2 GiB; leave room for the graph.
_SINGLE_FILE_LIMIT = 1_800_000_000
INPUT_NAME, OUTPUT_NAME = "input", "logits"

# The metadata_props of every export, in the order written; those marked "when known" are left out when the
# model does not say (a model built without a dataset's pretrained_cfg, weights with no recorded accuracy).
METADATA_KEYS: dict[str, str] = {
    "model": "what was exported: MODEL[.TAG] as named, a run directory or a weights file",
    "architecture": "the zoo (timm) architecture, e.g. resnet18_deconv",
    "tag": "the pretrained tag its pretrained_cfg describes, e.g. fashion_mnist (when known)",
    "dataset": "the data the weights were trained on (when known)",
    "description": "the pretrained_cfg's description (when known)",
    "input_name": f"the graph's input: {INPUT_NAME}",
    "input_layout": "NCHW (NCL for a 1-D model, NCDHW for a 3-D one)",
    "input_dtype": "float32",
    "input_size": "[C, H, W] of one image ([C, L] of one signal for a 1-D model, [C, D, H, W] of one volume for a "
                  "3-D one), JSON",
    "fixed_input_size": "true: the graph takes H x W only (convolutions are traced at that size); bring other "
                        "images there as `preprocess` says. false for a fully convolutional model (segmentation): "
                        "height and width (length; depth, height and width) are dynamic axes too, input_size is "
                        "the traced size",
    "batch": "dynamic, or the fixed batch size",
    "resize": "the shorter side an image is resized to first (timm's eval transform: floor(H / crop_pct)); an "
              "image of that size is used as it is",
    "interpolation": "the resize's interpolation (timm's name)",
    "crop_pct": "timm's crop_pct",
    "crop_mode": "timm's crop_mode",
    "pad": "[top, bottom, left, right], JSON: zero pixels (value 0, before scaling) that take a resize x resize "
           "image to H x W",
    "padding": "the padding rule in words, e.g. zero-pad 28x28 to 32x32",
    "scale": "the factor taking uint8 pixel values to [0, 1] (1/255)",
    "mean": "per-channel mean subtracted after scaling, JSON list of C numbers",
    "std": "per-channel std divided by after that, JSON list of C numbers",
    "preprocess": "the whole recipe in words: resize, pad, scale, normalise, layout",
    "output_name": f"the graph's output: {OUTPUT_NAME}; for several outputs (a segmentation model's out and aux) "
                   "their names, JSON list, in the graph's order",
    "output": "what the output holds",
    "num_classes": "number of classes (the output's second axis)",
    "label_names": "class names in output order, JSON list (when known)",
    "test_top1": "the weights' recorded test top-1 on `dataset`, percent (when recorded)",
    "folded": "true when the model was folded (whitening, BatchNorm) into plain conv weights before export",
    "opset": "the ONNX opset",
    "ndeconv_version": "the ndeconv that wrote the file",
    "torch_version": "the torch whose exporter wrote the file",
    "license": "the weights' license (when known)",
    "source": "what the exporting command recorded of its source, JSON (when given)",
}
# The keys that describe image preprocessing: a 1-D or 3-D model's export has none of them (its signal or volume is
# fed as it is).
_IMAGE_KEYS = ("resize", "interpolation", "crop_pct", "crop_mode", "pad", "padding", "scale", "mean", "std")
# By spatial dimensions: the axes' letters as error messages and layouts write them, and the dynamic axes' names.
_SPATIAL_LETTERS = {1: "L", 2: "H, W", 3: "D, H, W"}
_SPATIAL_AXES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}
_CFG_OVERLAY = ("tag", "description", "mean", "std", "crop_pct", "crop_mode", "interpolation", "label_names",
                "license")


def weights_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The ``config.json`` describing a weights file or run directory (beside the file, or inside the folder), or
    ``{}`` when there is none; unreadable JSON is an NdeconvError naming the file."""
    if not path:
        return {}
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path.with_name("config.json")
    if not config_path.is_file():
        return {}
    try:
        config = read_json(config_path)
    except (OSError, ValueError) as err:
        raise NdeconvError(f"{config_path}: not readable JSON ({err}); fix or remove it") from err
    return config if isinstance(config, dict) else {}


def _channels(values: Any, channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if values and len(set(values)) == 1:  # a gray statistic repeated for an adapted stem (or the reverse)
        return values[:1] * channels
    raise NdeconvError(f"the model's pretrained_cfg gives {len(values)} {what} values {values} for a "
                       f"{channels}-channel input; set pretrained_cfg['{what}'] to {channels} values before exporting")


def _padding(size: tuple[int, int], crop_pct: float, crop_mode: str) -> tuple[int, list[int], str]:
    """(resize, pad, rule): timm's eval transform for an ``size`` model, Resize(floor(H / crop_pct)) then
    CenterCrop(H x W), which pads a smaller image with zeros."""
    height, width = size
    if crop_mode not in ("center", None) or height != width:
        raise NdeconvError(f"crop_mode {crop_mode!r} with input {height}x{width}: the export describes timm's "
                           "centre crop of a square input only; set pretrained_cfg['crop_mode'] = 'center'")
    resize = math.floor(height / crop_pct)  # timm's scale_size, exactly as transforms_imagenet_eval computes it
    if resize >= height:
        rule = (f"none: {height}x{width} images as they are" if resize == height else
                f"none: resize the shorter side to {resize}, then centre-crop {height}x{width}")
        return resize, [0, 0, 0, 0], rule
    top, left = (height - resize) // 2, (width - resize) // 2
    pad = [top, height - resize - top, left, width - resize - left]
    sides = (f"{pad[0]} pixels on each side" if len(set(pad)) == 1 else
             f"{pad[0]} rows above, {pad[1]} below, {pad[2]} columns left, {pad[3]} right")
    return resize, pad, f"zero-pad {resize}x{resize} to {height}x{width} ({sides}, value 0 before scaling)"


def onnx_metadata(
    model: nn.Module,
    input_size: tuple[int, ...],
    *,
    opset: int,
    static_batch: int | None = None,
    folded: bool = True,
    config: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    output_names: Sequence[str] = (OUTPUT_NAME,),
    dynamic_spatial: bool = False,
) -> dict[str, str]:
    """The ``metadata_props`` of an export of ``model`` (see :data:`METADATA_KEYS`), from its timm
    ``pretrained_cfg`` and, where given, the ``config.json`` of its run or weights (``weights_config``): that
    one's pretrained_cfg, label names, dataset and recorded accuracy describe the weights, where a model built
    from a weights file carries only its architecture's default cfg. ``input_size`` (C, L) is a 1-D model
    (layout NCL), (C, D, H, W) a 3-D one (NCDHW): neither has image preprocessing keys. ``output_names`` are the
    graph's outputs (a segmentation model's out and aux); ``dynamic_spatial`` says its spatial axes are dynamic
    (fully convolutional)."""
    from importlib.metadata import PackageNotFoundError, version

    config = dict(config or {})
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = cfg.get("architecture") or type(model).__name__
    if config.get("architecture") in (None, architecture):
        cfg.update({k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in _CFG_OVERLAY})
    else:
        config = {}  # another architecture's config.json: it does not describe these weights
    dims = len(input_size) - 1
    image = dims == 2
    # A signal or a volume has no image preprocessing; its (C, L) or (C, D, H, W) stands in for an image's
    # (C, 1, L) or (C, H, W) only to share the code below.
    channels, (height, width) = input_size[0], ((1, input_size[1]) if dims == 1 else input_size[-2:])
    mean = _channels(cfg.get("mean") or (0.0,), channels, "mean")
    std = _channels(cfg.get("std") or (1.0,), channels, "std")
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    crop_mode = cfg.get("crop_mode") or "center"
    interpolation = str(cfg.get("interpolation") or "bilinear")
    resize, pad, rule = _padding((height, width), crop_pct, crop_mode) if image else (width, [0, 0, 0, 0], "")
    num_classes = int(getattr(model, "num_classes", 0) or cfg.get("num_classes") or 0)
    labels = config.get("label_names") or cfg.get("label_names")
    labels = [str(n) for n in labels] if labels and len(labels) == num_classes else None
    dataset = (config.get("train") or {}).get("dataset")
    if dataset is None:
        from ndeconv.zoo._pretrained import tag_dataset

        dataset = tag_dataset(cfg.get("tag"))
    top1 = (config.get("weights") or {}).get("test_top1")
    if (source or {}).get("weights") == "random init":  # the cfg describes the data, but nothing was trained
        dataset = top1 = None
    tag = cfg.get("tag")
    name = (source or {}).get("model") or (source or {}).get("run") or (source or {}).get("checkpoint")
    chans = "gray" if channels == 1 else f"{channels}-channel"
    steps = [f"uint8 {chans} image", f"resize the shorter side to {resize} ({interpolation}; a {resize}x{resize} "
             "image as it is)"]
    if resize > height:
        steps.append(f"centre-crop {height}x{width}")
    elif resize < height:
        steps.append(rule)
    steps += ["x * scale (x / 255, to [0, 1])", "(x - mean) / std per channel",
              f"float32 {channels}x{height}x{width}, NCHW, batched as input '{INPUT_NAME}'"]
    if dynamic_spatial and image:
        steps[-1] += f" (any H x W: {height}x{width} is the traced size)"
    if dims == 1:
        steps = [f"float32 {channels}x{width} signal ({channels} channels, length {width}"
                 f"{', any length' if dynamic_spatial else ''}), NCL, batched as input '{INPUT_NAME}'"]
    if dims == 3:
        volume = "x".join(str(v) for v in input_size[1:])
        steps = [f"float32 {channels}x{volume} volume ({channels} channels, D x H x W {volume}"
                 f"{', any size' if dynamic_spatial else ''}), NCDHW, batched as input '{INPUT_NAME}'"]
    preprocess = " -> ".join(steps)
    if not dynamic_spatial:  # pooled logits; a dense (fully convolutional) output keeps the spatial axes
        output = (f"float32 N x {num_classes} logits (unnormalised; softmax gives probabilities), column i is "
                  "class i of label_names")
    else:
        shape = "N x K x " + " x ".join(_SPATIAL_LETTERS[dims].split(", "))
        output = (f"float32 {shape} per-position logits (K = {num_classes} classes, at the input's size) in each of "
                  f"{', '.join(output_names)}")

    def version_of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "0.0.0+unknown"

    meta: dict[str, Any] = {
        "model": str(name or (f"{architecture}.{tag}" if tag else architecture)),
        "architecture": architecture,
        "tag": tag,
        "dataset": dataset,
        "description": cfg.get("description"),
        "input_name": INPUT_NAME,
        "input_layout": "NC" + _SPATIAL_LETTERS[dims].replace(", ", ""),
        "input_dtype": "float32",
        "input_size": json.dumps(list(input_size)),
        "fixed_input_size": "false" if dynamic_spatial else "true",
        "batch": "dynamic" if static_batch is None else str(static_batch),
        "resize": str(resize),
        "interpolation": interpolation,
        "crop_pct": repr(crop_pct),
        "crop_mode": crop_mode,
        "pad": json.dumps(pad),
        "padding": rule,
        "scale": repr(1 / 255),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "preprocess": preprocess,
        "output_name": output_names[0] if len(output_names) == 1 else json.dumps(list(output_names)),
        "output": output,
        "num_classes": str(num_classes),
        "label_names": json.dumps(labels) if labels else None,
        "test_top1": repr(float(top1)) if top1 is not None else None,
        "folded": "true" if folded else "false",
        "opset": str(opset),
        "ndeconv_version": version_of("ndeconv"),
        "torch_version": torch.__version__,
        "license": cfg.get("license"),
        "source": json.dumps(dict(source), sort_keys=True, default=str) if source else None,
    }
    if not image:
        for key in _IMAGE_KEYS:
            del meta[key]
    return {k: str(v) for k, v in meta.items() if v is not None}


def _write_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Put ``metadata`` into the ONNX file's metadata_props (replacing keys of the same name) and its
    doc_string (onnxruntime's ``get_modelmeta().description``); external data files stay as they are."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in (*kept, *metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if "preprocess" in metadata:
        proto.doc_string = f"{metadata.get('model', '')}: {metadata['preprocess']}; output {metadata.get('output', '')}"
    onnx.save(proto, str(path))


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (the weights are not read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's decode errors vary
        raise NdeconvError(f"{path}: not a readable ONNX file ({type(err).__name__}: {err})") from err
    return {p.key: p.value for p in proto.metadata_props}


@dataclass
class ExportResult:
    path: Path
    opset: int
    dynamic_batch: bool
    static_batch: int | None
    input_size: tuple[int, ...]  # (C, H, W), or (C, L) for a 1-D model
    external_data: bool
    fold_report: FoldReport | None
    reference: nn.Module = field(repr=False)  # the float32 eval model the export must reproduce
    verification: VerifyResult | None = None  # set when export_onnx(verify=True)
    metadata: dict[str, str] = field(default_factory=dict)  # written to the file's metadata_props
    output_names: list[str] = field(default_factory=lambda: [OUTPUT_NAME])  # the graph's outputs, in order
    dynamic_spatial: bool = False  # fully convolutional: the spatial axes are dynamic, not only the batch


@dataclass
class VerifyResult:
    ops: dict[str, int]
    comparisons: list[tuple[str, int, float, float]] = field(default_factory=list)  # (input, batch, abs, rel)

    @property
    def max_abs(self) -> float:
        return max((c[2] for c in self.comparisons), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c[3] for c in self.comparisons), default=0.0)

    def lines(self) -> list[str]:
        return [f"{name} batch {batch}: max abs diff {a:.3g}, max rel diff {r:.3g}"
                for name, batch, a, r in self.comparisons]


_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


@contextlib.contextmanager
def _uneven_adaptive_pools_refused(model: nn.Module, input_size: Sequence[int]):
    """Within the block, a forward through an adaptive pool whose input is not a whole multiple of its output
    raises. torch writes such a pool (VGG's 7x7 pool on the 2x2 map of a 64x64 input) as index arithmetic
    (GatherND, Where) rather than an AveragePool/MaxPool, which the op check would refuse after a long export;
    refused here, the error names the input size that makes the pool even."""
    def check(module: nn.Module, args: tuple, output: torch.Tensor, name: str) -> None:
        in_sizes, out_sizes = tuple(args[0].shape[2:]), tuple(output.shape[2:])
        if all(i % o == 0 for i, o in zip(in_sizes, out_sizes, strict=True)):
            return
        # The input sizes that reach this pool as a whole multiple of its output, at the same reduction.
        fit = [o * max(1, round(s / i)) for s, i, o in zip(input_size[1:], in_sizes, out_sizes, strict=True)]
        raise NdeconvError(
            f"{name} ({type(module).__name__}) pools a {'x'.join(map(str, in_sizes))} map to "
            f"{'x'.join(map(str, out_sizes))} at input size {tuple(input_size)}: ONNX has no pooling op for an "
            f"uneven adaptive pool; export at an input size whose map there is a whole multiple of its output, "
            f"e.g. --input-size {' '.join(map(str, (input_size[0], *fit)))}")

    handles = [m.register_forward_hook(lambda mod, a, out, name=n: check(mod, a, out, name))
               for n, m in model.named_modules() if isinstance(m, _ADAPTIVE_POOLS)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    static_batch: int | None = None,
    input_size: tuple[int, ...] | None = None,
    force: bool = False,
    fold_model: bool = True,
    verify: bool = False,
    config: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Fold ``model`` (unless ``fold_model=False`` and it is already plain) and write it to ``path`` as ONNX.

    The batch axis is dynamic (named ``batch``) unless ``static_batch`` fixes it. Input ``input`` (float32, N x C
    x H x W; N x C x L for a 1-D model, ``input_size`` (C, L); N x C x D x H x W for a 3-D one, ``input_size``
    (C, D, H, W)), output ``logits``. A model whose outputs keep the input's spatial axes (fully convolutional:
    segmentation) gets dynamic ``height``/``width`` (``length``; ``depth``, ``height``, ``width``) axes too, and a
    dict or tuple output (``{'out', 'aux'}``) one graph output per tensor, named by its keys; a classifier keeps
    its traced spatial size. One file unless the weights exceed protobuf's 2 GiB.
    The file's metadata_props say how to feed it (``onnx_metadata``: from the model's pretrained_cfg and
    ``config``, the config.json of its run or weights; ``source``, what the caller records of where the model
    came from, names it). With ``verify``, the export is checked (``verify_onnx_for_model``) before it takes
    ``path``'s place, so a failed check raises and leaves whatever was at ``path`` untouched.
    """
    path = check_output_path(path, force)
    if static_batch is not None and static_batch < 1:
        raise NdeconvError(f"static batch must be >= 1, got {static_batch}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise NdeconvError(f"opset {opset}: the installed torch ONNX exporter writes opsets {MIN_OPSET} to "
                           f"{MAX_OPSET}; choose {MIN_OPSET} or higher, up to {MAX_OPSET} (e.g. {DEFAULT_OPSET})")
    input_size = tuple(input_size or model_input_size(model))
    # The first layer with input channels (a conv; FastDeconv subclasses torch's _ConvNd): none in an MLP.
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    dims = conv_dims(first) if first is not None else 2
    if len(input_size) != dims + 1 or (first is not None and input_size[0] != first.in_channels):
        channels = first.in_channels if first is not None else "C"
        want = f"({channels}, {_SPATIAL_LETTERS[dims]})"
        raise NdeconvError(f"input_size {input_size} does not fit {type(model).__name__}: it takes {want}")
    _refuse_what_memory_cannot_hold(first, input_size, max(2, static_batch or 2))
    # A cfg it cannot describe fails before any work: the metadata is built once here, and once more below with
    # the output names and axes, which need a forward of the model.
    onnx_metadata(model, input_size, opset=opset, static_batch=static_batch, folded=fold_model, config=config,
                  source=source)
    reference = copy.deepcopy(model).float().eval()
    with torch.no_grad(), _uneven_adaptive_pools_refused(reference, input_size):
        probe = flatten_outputs(reference(random_batch(2, input_size)))
    output_names = [OUTPUT_NAME] if probe == [] or probe[0][0] == "" else [n.replace(".", "_") for n, _ in probe]
    # Fully convolutional: every output keeps the input's spatial axes (a dense prediction), so those axes can be
    # dynamic; a classifier's pooled logits (N, K) keep the traced size, which its metadata fixes.
    spatial = tuple(range(2, len(input_size) + 1))
    dynamic_spatial = bool(probe) and all(t.dim() == len(input_size) + 1 for _, t in probe)
    metadata = onnx_metadata(model, input_size, opset=opset, static_batch=static_batch, folded=fold_model,
                             config=config, source=source, output_names=output_names,
                             dynamic_spatial=dynamic_spatial)
    report = None
    if fold_model:
        plain, report = fold_with_report(reference, example_input=random_batch(2, input_size), check=False,
                                         fuse_batchnorm=True)
    else:
        plain = reference
        left = [n for n, m in plain.named_modules() if isinstance(m, DECONV_TYPES)]
        if left:
            raise NdeconvError(f"{left[0]} is a deconvolution layer: export with fold_model=True")
    batch = static_batch if static_batch is not None else 2  # a dynamic axis must be traced with a batch >= 2
    example = random_batch(batch, input_size)
    external = _param_bytes(plain) > _SINGLE_FILE_LIMIT
    kwargs = dict(
        dynamo=True, opset_version=opset, external_data=external, input_names=[INPUT_NAME],
        output_names=output_names,
    )
    axes: dict[int, str] = {} if static_batch is not None else {0: "batch"}
    if dynamic_spatial:
        axes.update(dict(zip(spatial, _SPATIAL_AXES[dims], strict=True)))
    if axes:
        kwargs["dynamic_shapes"] = (axes,)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_path = tmp_dir / path.name
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(plain, (example,), str(tmp_path), **kwargs)
        except Exception as err:
            raise NdeconvError(f"ONNX export of {type(model).__name__} failed: {type(err).__name__}: {err}") from err
        _write_metadata(tmp_path, metadata)
        result = ExportResult(path=tmp_path, opset=opset, dynamic_batch=static_batch is None,
                              static_batch=static_batch, input_size=input_size, external_data=external,
                              fold_report=report, reference=reference, metadata=metadata,
                              output_names=output_names, dynamic_spatial=dynamic_spatial)
        if verify:
            try:
                result.verification = verify_onnx_for_model(result)
            except NdeconvError as err:
                reason = str(err).replace(str(tmp_path), str(path))
                kept = "the existing file is kept" if path.exists() else "nothing was written"
                raise NdeconvError(f"verification failed ({kept}): {reason}") from err
        # Data file first, so the .onnx never points at a missing one.
        for produced in sorted(tmp_dir.iterdir(), key=lambda p: p == tmp_path):
            with open(produced, "rb") as f:
                os.fsync(f.fileno())
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    result.path = path
    return result


def _available_memory() -> int | None:
    """The bytes of memory available to a new allocation (Linux's MemAvailable), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _refuse_what_memory_cannot_hold(first: nn.Module | None, input_size: tuple[int, ...], batch: int) -> None:
    """Refuse, before any tracing, an input size whose activations cannot fit: the example batch and the first
    convolution's output alone (a lower bound of what the probe, the fold check and the export hold at once) must
    fit in the memory available. Without it, ``--input-size 1 20000 20000`` is a traceback after allocating
    until the machine gives up."""
    available = _available_memory()
    if first is None or available is None:
        return
    strides = tuple(first.stride) if isinstance(first.stride, tuple) else (first.stride,) * (len(input_size) - 1)
    spatial = input_size[1:]
    out_pixels = math.prod(-(-s // st) for s, st in zip(spatial, strides, strict=False))
    need = 4 * batch * (math.prod(input_size) + first.out_channels * out_pixels)
    if need > available:
        raise NdeconvError(
            f"input_size {input_size}: the example batch of {batch} and the first convolution's output alone need "
            f"{need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory available; export at a "
            "smaller size (a fully convolutional model's file takes any size once exported)")


def onnx_op_types(path: str | os.PathLike) -> Counter:
    """How often each op type occurs in the ONNX graph at ``path`` (subgraphs included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: Counter = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    return counts


def check_onnx_ops(path: str | os.PathLike) -> Counter:
    """Fail unless the graph holds only :data:`ALLOWED_OPS` and every conv/linear weight is a stored constant."""
    import onnx

    ops = onnx_op_types(path)
    unexpected = sorted(set(ops) - ALLOWED_OPS)
    if unexpected:
        raise NdeconvError(f"{path}: unexpected ops in the graph: {', '.join(unexpected)} (the model is not fully "
                           "folded into plain inference layers)")
    model = onnx.load(str(path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer}
    constants |= {out for n in model.graph.node if n.op_type == "Constant" for out in n.output}
    # A weight may be a transposed constant (Gemm/MatMul layouts); anything computed beyond that is a subgraph.
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    for node in model.graph.node:
        index = _WEIGHTED_OPS.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        weight = node.input[index]
        if weight not in constants and transposed.get(weight) not in constants:
            raise NdeconvError(f"{path}: the weight of {node.op_type} node {node.name!r} is computed at run time "
                               "(a whitening subgraph): fold the model before exporting")
    return ops


def verify_onnx(
    path: str | os.PathLike,
    reference: nn.Module,
    inputs: dict[str, torch.Tensor],
    rtol: float = REL_TOLERANCE,
) -> VerifyResult:
    """onnx.checker (full), the op check, then onnxruntime vs ``reference`` (eval, no_grad) on each named input.

    Raises NdeconvError when a relative difference (max |ort - torch| / max |torch|) exceeds ``rtol``.
    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        raise NdeconvError(f"{path}: onnx.checker rejects the model: {err}") from err
    result = VerifyResult(ops=dict(check_onnx_ops(path)))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    reference = reference.eval()
    for name, x in inputs.items():
        x = x.float()
        with torch.no_grad():
            expected = reference(x)
        try:
            got = session.run(None, {input_name: x.numpy()})
        except Exception as err:
            raise NdeconvError(f"{path}: onnxruntime failed on {name} input of batch {x.shape[0]}: {err}") from err
        # Every output tensor is compared (a segmentation model's out and aux): the graph's outputs come in the
        # order torch.onnx flattened the model's output in, which is flatten_outputs' order.
        flat = flatten_outputs(expected)
        if len(got) != len(flat):
            raise NdeconvError(f"{path}: the graph has {len(got)} outputs, the model {len(flat)} "
                               f"({', '.join(n or 'tensor' for n, _ in flat)})")
        max_abs, rel = output_difference([t for _, t in flat], [torch.from_numpy(g) for g in got])
        result.comparisons.append((name, x.shape[0], max_abs, rel))
        if not rel <= rtol:
            raise NdeconvError(f"{path}: onnxruntime output differs from PyTorch on {name} input (batch "
                               f"{x.shape[0]}): max abs diff {max_abs:.3g}, max rel diff {rel:.3g} > {rtol:g}")
    return result


def verify_onnx_for_model(result: ExportResult, batches: tuple[int, ...] = (1, 7), real: int = 16) -> VerifyResult:
    """Verify an export against its source model: random inputs at ``batches`` (or the static batch), and real
    Fashion-MNIST test images when the model takes one channel and the data is installed."""
    if result.static_batch is not None:
        batches = (result.static_batch,)
    inputs = {f"random#{i}": random_batch(b, result.input_size, seed=100 + i) for i, b in enumerate(batches)}
    if result.dynamic_spatial:
        # A second spatial size, not a multiple of the traced one (odd output-stride remainders), so the dynamic
        # axes are exercised, not just declared.
        other = (*result.input_size[:1], *(s + s // 2 + 3 for s in result.input_size[1:]))
        inputs["random#size"] = random_batch(batches[-1], other, seed=99)
    if len(result.input_size) != 3:
        return verify_onnx(result.path, result.reference, inputs)  # a 1-D model: no images to feed it
    if result.metadata:  # the normalisation the file tells its clients
        mean, std = json.loads(result.metadata["mean"]), json.loads(result.metadata["std"])
    else:
        cfg = getattr(result.reference, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
    images = fashion_mnist_batch(result.static_batch or real, result.input_size, mean, std)
    if images is not None:
        inputs["fashion-mnist"] = images
    return verify_onnx(result.path, result.reference, inputs)
