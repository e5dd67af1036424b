"""Export a folded model to one self-contained ONNX file and verify it with onnxruntime.

The model is folded first (``ndeconv.convert.fold``): the exported graph then holds plain inference ops only, and
every Conv/Gemm/MatMul weight is a stored initializer (no whitening subgraph computing weights at run time).
The dynamo exporter is used, with a dynamic batch axis by default. Files are written atomically: the
export goes to a temporary folder beside the target and is renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ndeconv.errors import NdeconvError
from ndeconv.io import check_output_path

from ._inputs import fashion_mnist_batch, random_batch
from .fold import DECONV_TYPES, FoldReport, fold_with_report, model_input_size, output_difference

__all__ = [
    "ALLOWED_OPS",
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "ExportResult",
    "VerifyResult",
    "check_onnx_ops",
    "export_onnx",
    "model_input_size",
    "onnx_op_types",
    "verify_onnx",
    "verify_onnx_for_model",
]

# torch.onnx.export(dynamo=True) writes opset 18 and later: asked for less, it silently falls back to 18.
MIN_OPSET = 18
DEFAULT_OPSET = 20


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
})
_WEIGHTED_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op -> index of its weight input
# onnx's protobuf limit is 2 GiB; leave room for the graph.
_SINGLE_FILE_LIMIT = 1_800_000_000
REL_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    path: Path
    opset: int
    dynamic_batch: bool
    static_batch: int | None
    input_size: tuple[int, int, int]
    external_data: bool
    fold_report: FoldReport | None
    reference: nn.Module = field(repr=False)  # the float32 eval model the export must reproduce
    verification: VerifyResult | None = None  # set when export_onnx(verify=True)


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


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    static_batch: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    force: bool = False,
    fold_model: bool = True,
    verify: bool = False,
) -> ExportResult:
    """Fold ``model`` (unless ``fold_model=False`` and it is already plain) and write it to ``path`` as ONNX.

    The batch axis is dynamic (named ``batch``) unless ``static_batch`` fixes it. Input ``input``
    (float32, N x C x H x W), output ``logits``. One file unless the weights exceed protobuf's 2 GiB.
    With ``verify``, the export is checked (``verify_onnx_for_model``) before it takes ``path``'s place, so a
    failed check raises and leaves whatever was at ``path`` untouched.
    """
    path = check_output_path(path, force)
    if static_batch is not None and static_batch < 1:
        raise NdeconvError(f"static batch must be >= 1, got {static_batch}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise NdeconvError(f"opset {opset}: the installed torch ONNX exporter writes opsets {MIN_OPSET} to "
                           f"{MAX_OPSET}; choose {MIN_OPSET} or higher, up to {MAX_OPSET} (e.g. {DEFAULT_OPSET})")
    input_size = tuple(input_size or model_input_size(model))
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if len(input_size) != 3 or (first is not None and input_size[0] != first.in_channels):
        want = f"({first.in_channels}, H, W)" if first is not None else "(C, H, W)"
        raise NdeconvError(f"input_size {input_size} does not fit {type(model).__name__}: it takes {want}")
    reference = copy.deepcopy(model).float().eval()
    report = None
    if fold_model:
        plain, report = fold_with_report(reference, example_input=random_batch(2, input_size), check=False)
    else:
        plain = reference
        left = [n for n, m in plain.named_modules() if isinstance(m, DECONV_TYPES)]
        if left:
            raise NdeconvError(f"{left[0]} is a deconvolution layer: export with fold_model=True")
    batch = static_batch if static_batch is not None else 2  # a dynamic axis must be traced with a batch >= 2
    example = random_batch(batch, input_size)
    external = _param_bytes(plain) > _SINGLE_FILE_LIMIT
    kwargs = dict(
        dynamo=True, opset_version=opset, external_data=external, input_names=["input"], output_names=["logits"],
    )
    if static_batch is None:
        kwargs["dynamic_shapes"] = ({0: "batch"},)

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
        result = ExportResult(path=tmp_path, opset=opset, dynamic_batch=static_batch is None,
                              static_batch=static_batch, input_size=input_size, external_data=external,
                              fold_report=report, reference=reference)
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
            got = session.run(None, {input_name: x.numpy()})[0]
        except Exception as err:
            raise NdeconvError(f"{path}: onnxruntime failed on {name} input of batch {x.shape[0]}: {err}") from err
        max_abs, rel = output_difference(expected, torch.from_numpy(got))
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
    cfg = getattr(result.reference, "pretrained_cfg", None) or {}
    images = fashion_mnist_batch(result.static_batch or real, result.input_size, cfg.get("mean"), cfg.get("std"))
    if images is not None:
        inputs["fashion-mnist"] = images
    return verify_onnx(result.path, result.reference, inputs)
