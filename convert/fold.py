"""Fold a trained deconvolution network into a plain CNN for inference.

In eval mode every deconvolution layer is a fixed affine map of its input, and each layer builds its plain
equivalent itself: ``FastDeconv.fuse()`` an ``nn.Conv2d`` (weight ``w D``, bias ``b - w D mu``),
``Delinear.fuse()`` an ``nn.Linear``, ``ChannelDeconv.fuse()`` a 1x1 ``nn.Conv2d`` (an ``nn.Linear`` for
(N, C) input). Folding is the walk that replaces each such layer by its ``fuse()``, the walk timm's
``reparameterize_model`` makes (same layers, same numbers), plus what a deployment tool adds around it:

- a report of what became what, and warnings about untrained whitening and train mode;
- the check: the folded outputs against the unfolded eval outputs on a batch, raising beyond rounding;
- opt-in (``fuse_batchnorm=True``), a BatchNorm pass: a BatchNorm is fused into a conv of its dimensionality
  (BatchNorm2d into Conv2d; BatchNorm1d into Conv1d, BatchNorm3d into Conv3d)
  (``torch.nn.utils.fusion.fuse_conv_bn_eval``) when *its input is the output of that conv, which nothing else
  reads, and each runs once per forward*. The dataflow comes from a torch.fx trace, not from module names. A
  BatchNorm that does not follow a conv (e.g. the pre-activation BN of PreAct-ResNet, after a residual sum)
  stays as it is.

The folded model keeps the original class and module names, so its forward code is the architecture's own.
For a zoo model that is the architecture ``timm.create_model(name, folded=True)`` builds (``DeconvSettings``'
folded form), so folded weights reload with a strict state_dict (``ndeconv.convert.folded_io``).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import BatchNormAct2d
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ndeconv.errors import NdeconvError
from ndeconv.layers import ChannelDeconv, Delinear, FastDeconv
from ndeconv.layers._conv import plain_conv_type, to_torch_convs
from ndeconv.layers.deconvolve import norm_remainder
from ndeconv.layers.fast_deconv1d import FastDeconv1d
from ndeconv.layers.fast_deconv3d import FastDeconv3d

from ._graph import ModelGraph, trace_model

__all__ = [
    "DECONV_TYPES",
    "FoldReport",
    "FoldWarning",
    "default_example_input",
    "find_conv_batchnorm_pairs",
    "fold",
    "fold_with_report",
    "fuse_batchnorms",
    "fuse_conv_batchnorm_pairs",
    "fuse_deconv_layers",
    "flatten_outputs",
    "has_identity_whitening",
    "conv_dims",
    "is_1d_conv",
    "model_input_size",
    "output_difference",
]

DECONV_TYPES = (FastDeconv, Delinear, ChannelDeconv)


class FoldWarning(UserWarning):
    """Something the user should know about a fold: untrained whitening, train mode, an unfused BatchNorm."""


@dataclass
class FoldReport:
    """What ``fold`` did, layer by layer."""

    was_training: bool = False
    traced: bool = True  # False when the BatchNorm pass was asked for and torch.fx could not trace the model
    deconv_to_conv: list[str] = field(default_factory=list)
    # name -> "what it was -> what fuse() returned", e.g. "FastDeconv1d -> Conv1d": the summary counts these, so
    # a 1-D (or any other) FastDeconv subclass is named for what it is rather than as a 2-D conv.
    conv_types: dict[str, str] = field(default_factory=dict)
    delinear_to_linear: list[str] = field(default_factory=list)
    channel_deconv: dict[str, str] = field(default_factory=dict)  # name -> what it became ("1x1 Conv2d", "Linear")
    bn_fused: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> conv it went into
    bn_kept: list[str] = field(default_factory=list)
    identity_whitening: list[str] = field(default_factory=list)
    check_max_abs: float | None = None
    check_rel: float | None = None
    fuse_batchnorm: bool = False  # whether the BatchNorm pass was asked for

    def summary(self) -> str:
        counts = Counter(self.conv_types.get(n, "FastDeconv -> Conv2d") for n in self.deconv_to_conv)
        parts = [f"{n} {label}" for label, n in counts.items()] or ["0 FastDeconv -> Conv2d"]
        parts.append(f"{len(self.delinear_to_linear)} Delinear -> Linear")
        if self.channel_deconv:
            parts.append(", ".join(f"ChannelDeconv {k} -> {v}" for k, v in self.channel_deconv.items()))
        if self.fuse_batchnorm:
            parts.append(f"{len(self.bn_fused)} BatchNorm fused into convs")
            if self.bn_kept:
                parts.append(f"{len(self.bn_kept)} BatchNorm kept (not directly after a conv)")
        elif self.bn_kept:
            parts.append(f"{len(self.bn_kept)} BatchNorm kept (BatchNorm fusion not asked for)")
        text = "folded: " + "; ".join(parts)
        if self.check_rel is not None:
            text += f"; check vs unfolded eval: max abs diff {self.check_max_abs:.3g}, rel {self.check_rel:.3g}"
        return text


def has_identity_whitening(module: nn.Module) -> bool:
    """Whether a deconvolution layer still holds its initial running statistics (it never saw training data)."""
    if isinstance(module, ChannelDeconv):
        return int(module.num_batches_tracked) == 0
    deconv = module.running_deconv
    eye = torch.eye(deconv.shape[-1], dtype=deconv.dtype, device=deconv.device).expand_as(deconv)
    return bool((module.running_mean == 0).all()) and bool(torch.equal(deconv, eye))


# Signal length of a 1-D model that does not say (no pretrained_cfg input_size): long enough for the kernels and
# strides of a small sequence net, short enough for a fast check.
DEFAULT_SIGNAL_LENGTH = 64
# (D, H, W) of a 3-D (volume or video) model that does not say: small, for a fast check.
DEFAULT_VOLUME_SIZE = (16, 16, 16)


def conv_dims(module: nn.Module) -> int:
    """The spatial dimensions (1, 2 or 3) of a convolution: ``nn.Conv1d``/``FastDeconv1d`` 1, ``nn.Conv3d``/
    ``FastDeconv3d`` 3, any other (``nn.Conv2d``, ``FastDeconv``) 2. The deconvolution layers subclass the 2-D
    FastDeconv, so their own type decides, not their base."""
    if isinstance(module, (nn.Conv1d, FastDeconv1d)):
        return 1
    if isinstance(module, (nn.Conv3d, FastDeconv3d)):
        return 3
    return 2


def is_1d_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a 1-D convolution (``nn.Conv1d`` or ``FastDeconv1d``, which subclasses FastDeconv)."""
    return conv_dims(module) == 1


def model_input_size(model: nn.Module) -> tuple[int, ...]:
    """The input of one example: (C, H, W) for an image model, (C, L) for a 1-D one and (C, D, H, W) for a 3-D one
    (by the first conv's type). Channels from the first conv, size from the pretrained_cfg (else the CIFAR
    topology's 32x32, a length of :data:`DEFAULT_SIGNAL_LENGTH` or a volume of :data:`DEFAULT_VOLUME_SIZE`); a
    model without convs (the MLP) takes its pretrained_cfg's whole input_size."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if first is None:
        if cfg.get("input_size"):
            return tuple(int(v) for v in cfg["input_size"])
        raise NdeconvError(f"{type(model).__name__} has no conv to read the input channels from and no "
                           "pretrained_cfg input_size; pass the input")
    dims = conv_dims(first)
    size = tuple(int(v) for v in cfg.get("input_size", ()))
    if len(size) == dims + 1:
        return (first.in_channels, *size[1:])
    default = {1: (DEFAULT_SIGNAL_LENGTH,), 2: (32, 32), 3: DEFAULT_VOLUME_SIZE}[dims]
    return (first.in_channels, *default)


def default_example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A seeded random batch shaped by :func:`model_input_size`, in the model's dtype and device."""
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model_input_size(model), generator=generator, dtype=torch.float64)
    return x.to(device=param.device, dtype=param.dtype)


def flatten_outputs(output: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a model's output, named, in order: a tensor is ``[("", t)]``, a dict (a segmentation model's
    ``{'out', 'aux'}``) gives its keys, a tuple/list its indices; nested containers join names with dots. The
    order is the one torch.onnx flattens outputs in, so it lines up with an ONNX session's outputs."""
    if isinstance(output, torch.Tensor):
        return [(prefix, output)]
    if isinstance(output, Mapping):
        items = [(str(k), v) for k, v in output.items()]
    elif isinstance(output, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(output)]
    else:
        raise NdeconvError(f"cannot compare a model output of type {type(output).__name__}: expected tensors, "
                           "or dicts/tuples/lists of tensors")
    flat: list[tuple[str, torch.Tensor]] = []
    for key, value in items:
        flat += flatten_outputs(value, f"{prefix}.{key}" if prefix else key)
    return flat


def output_difference(reference: Any, other: Any) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |a|): the project's relative-error measure. For dict/tuple outputs every
    tensor is compared (same names, same shapes) and the worst of each measure is returned."""
    ref_flat, other_flat = flatten_outputs(reference), flatten_outputs(other)
    if [n for n, _ in ref_flat] != [n for n, _ in other_flat]:
        raise NdeconvError(f"outputs differ in structure: {[n for n, _ in ref_flat]} vs {[n for n, _ in other_flat]}")
    worst_abs = worst_rel = 0.0
    for (name, a), (_, b) in zip(ref_flat, other_flat, strict=True):
        if a.shape != b.shape:
            raise NdeconvError(f"output {name or 'tensor'} has shape {tuple(b.shape)}, expected {tuple(a.shape)}")
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = a.double().abs().max().item() if a.numel() else 0.0
        # max() would drop a NaN; a NaN difference must fail every check, so it is kept.
        worst_abs = diff if diff != diff else max(worst_abs, diff)
        rel = diff / scale if scale > 0 else diff
        worst_rel = rel if rel != rel or worst_rel != worst_rel else max(worst_rel, rel)
    return worst_abs, worst_rel


def fold(
    model: nn.Module, example_input: torch.Tensor | None = None, check: bool = True, inplace: bool = False,
    fuse_batchnorm: bool = False,
) -> nn.Module:
    """An inference-only copy of ``model`` with every deconvolution layer replaced by its ``fuse()``.

    With ``check``, the folded outputs on ``example_input`` (default: a random batch of 2 shaped by
    :func:`default_example_input`) are compared with the unfolded eval outputs, raising if they disagree beyond
    rounding. ``fuse_batchnorm`` also fuses each BatchNorm that directly follows a conv into it (the opt-in
    pass, :func:`fuse_batchnorms`). See :func:`fold_with_report` for what was done.
    """
    return fold_with_report(model, example_input=example_input, check=check, inplace=inplace,
                            fuse_batchnorm=fuse_batchnorm)[0]


def fold_with_report(
    model: nn.Module, example_input: torch.Tensor | None = None, check: bool = True, inplace: bool = False,
    fuse_batchnorm: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """:func:`fold` plus a :class:`FoldReport`; warns (FoldWarning) about untrained whitening and train mode."""
    report = FoldReport(was_training=any(m.training for m in model.modules()), fuse_batchnorm=fuse_batchnorm)
    report.identity_whitening = [n for n, m in model.named_modules() if isinstance(m, DECONV_TYPES)
                                 and has_identity_whitening(m)]
    if report.identity_whitening:
        warnings.warn(
            f"{len(report.identity_whitening)} deconvolution layer(s) still hold their initial identity whitening "
            f"(e.g. {report.identity_whitening[0]}): the model was never trained, or its buffers were not loaded; "
            "folding is exact but whitens nothing",
            FoldWarning, stacklevel=2,
        )
    if report.was_training:
        warnings.warn(
            "the model was in training mode: it is folded from its running statistics (its eval-mode behaviour); "
            "train-mode outputs, which use batch statistics, differ",
            FoldWarning, stacklevel=2,
        )

    # A ChannelDeconv built without its channel count (the reference's constructor) folds for the input it saw:
    # only such a layer needs an example forward before folding.
    unsized = any(isinstance(m, ChannelDeconv) and m.num_channels is None for m in model.modules())
    x = None
    if check or unsized:
        x = default_example_input(model) if example_input is None else example_input
    expected = _eval_output(model, x) if check else None  # before an in-place fold changes the model
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()
    if unsized and not check:
        _eval_output(folded, x)

    fuse_deconv_layers(folded, report)
    if fuse_batchnorm:
        _batchnorm_pass(folded, type(model).__name__, report)
    report.bn_kept = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if fuse_batchnorm and report.traced and report.bn_kept:  # untraced, the trace warning said it already
        warnings.warn(
            f"{len(report.bn_kept)} BatchNorm(s) do not directly follow a conv and stay as per-channel affine layers "
            f"(e.g. {report.bn_kept[0]})",
            FoldWarning, stacklevel=2,
        )

    to_torch_convs(folded)  # the BatchNorm form's strided depthwise convs: their bf16 training path is moot here
    left = [n for n, m in folded.named_modules() if isinstance(m, DECONV_TYPES)]
    if left:  # cannot happen unless a new deconvolution type appears: never hand out a half-folded model
        raise NdeconvError(f"folding left deconvolution layers in place: {', '.join(left)}")
    for p in folded.parameters():
        p.requires_grad_(False)
    settings = getattr(folded, "deconv_settings", None)
    if dataclasses.is_dataclass(settings) and "folded" in {f.name for f in dataclasses.fields(settings)}:
        # The folded architecture, as timm.create_model(name, folded=True) builds it: a new head
        # (reset_classifier) is plain too, and save_folded records these settings; keep what it was folded from.
        folded.folded_from_settings = settings
        folded.deconv_settings = dataclasses.replace(settings, folded=True)
    folded.fold_report = report  # what save_folded records of the structure (fused BatchNorms, ChannelDeconvs)

    if expected is not None:
        _check(type(model).__name__, expected, folded, x, report)
    return folded, report


def fuse_deconv_layers(model: nn.Module, report: FoldReport | None = None) -> nn.Module:
    """Replace, in place, every FastDeconv, Delinear and ChannelDeconv of ``model`` by its ``fuse()``; return it.

    timm's ``reparameterize_model`` walk (children first found first, each replaced by ``child.fuse()``),
    restricted to the deconvolution layers so that no other module's ``fuse``/``reparameterize`` runs unasked.
    ``report`` (optional) records each layer's name under what it became.
    """
    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = prefix + child_name
            if not isinstance(child, DECONV_TYPES):
                walk(child, name + ".")
                continue
            plain = child.fuse()
            setattr(parent, child_name, plain)
            if report is None:
                continue
            if isinstance(child, FastDeconv):
                report.deconv_to_conv.append(name)
                report.conv_types[name] = f"{type(child).__name__} -> {type(plain).__name__}"
            elif isinstance(child, Delinear):
                report.delinear_to_linear.append(name)
            else:
                report.channel_deconv[name] = "1x1 Conv2d" if isinstance(plain, nn.Conv2d) else "Linear"

    walk(model, "")
    return model


# -- the opt-in BatchNorm pass ---------------------------------------------------------------------------------


def find_conv_batchnorm_pairs(model: nn.Module) -> dict[str, str]:
    """``{batchnorm name: conv name}`` for every BatchNorm of ``model`` that may be fused into the conv before it.

    The rule: the BatchNorm's input is the output of a plain conv of its dimensionality (``nn.Conv2d`` for a
    BatchNorm2d, ``nn.Conv1d``/``nn.Conv3d`` for a BatchNorm1d/3d) that nothing else reads, and each runs once per
    forward, read from a torch.fx trace (raises whatever torch.fx raises on untraceable code).
    """
    graph = trace_model(model)
    return _fusable_pairs(model, graph)


def fuse_conv_batchnorm_pairs(model: nn.Module, pairs: dict[str, str]) -> None:
    """Fuse, in place, each BatchNorm of ``pairs`` (``{bn: conv}``) into its conv: the conv gets the BatchNorm's
    eval map in its weight and bias, the BatchNorm becomes what remains of it (an Identity; a timm norm+act
    layer keeps its dropout and activation, as ``deconvolve()`` does)."""
    for bn_name, conv_name in pairs.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _replace(model, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        _replace(model, bn_name, norm_remainder(bn))


def fuse_batchnorms(model: nn.Module) -> dict[str, str]:
    """The BatchNorm pass on its own: fuse, in place, every BatchNorm that directly follows a conv
    (:func:`find_conv_batchnorm_pairs`); returns ``{bn: conv}``."""
    pairs = find_conv_batchnorm_pairs(model)
    fuse_conv_batchnorm_pairs(model, pairs)
    return pairs


def _batchnorm_pass(folded: nn.Module, model_name: str, report: FoldReport) -> None:
    try:
        graph: ModelGraph = trace_model(folded)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: fold without the BatchNorm pass
        report.traced = False
        warnings.warn(
            f"could not trace {model_name} with torch.fx ({type(err).__name__}: {err}); BatchNorms stay unfused",
            FoldWarning, stacklevel=3,
        )
        return
    pairs = _fusable_pairs(folded, graph)
    fuse_conv_batchnorm_pairs(folded, pairs)
    report.bn_fused.update(pairs)


# The BatchNorm types the pass fuses and the conv each must follow (another subclass may compute something else).
_FUSABLE_NORMS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nn.Conv1d, nn.BatchNorm2d: nn.Conv2d, BatchNormAct2d: nn.Conv2d, nn.BatchNorm3d: nn.Conv3d,
}


def _fusable_pairs(model: nn.Module, graph: ModelGraph) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for bn_node in graph.module_nodes(tuple(_FUSABLE_NORMS)):
        bn = model.get_submodule(bn_node.target)
        conv_type = _FUSABLE_NORMS.get(type(bn))
        if conv_type is None:
            continue  # another subclass may compute something else: it stays as it is
        source = bn_node.args[0] if bn_node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and graph.calls[source.target] == 1):
            continue
        conv = model.get_submodule(source.target)
        if plain_conv_type(conv) is not conv_type or conv.out_channels != bn.num_features:
            continue
        if graph.sole_reader(source) is not bn_node or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            continue  # such a BN normalises with batch statistics even in eval: not a fixed map
        pairs[bn_node.target] = source.target
    return pairs


# -- helpers ---------------------------------------------------------------------------------------


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _eval_output(model: nn.Module, x: torch.Tensor) -> Any:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _check(model_name: str, expected: Any, folded: nn.Module, x: torch.Tensor, report: FoldReport) -> None:
    with torch.no_grad():
        got = folded(x)
    report.check_max_abs, report.check_rel = output_difference(expected, got)
    # Fusing conv + BatchNorm rounds the product of weight and scale once in the model's dtype: half precision
    # differs by its own rounding (bfloat16 ~8e-3 measured on a BatchNorm network), not by a folding error.
    dtype = flatten_outputs(expected)[0][1].dtype
    tolerance = {torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)
    if not report.check_rel <= tolerance:
        raise NdeconvError(
            f"the folded {model_name} disagrees with the unfolded model in eval mode (relative error "
            f"{report.check_rel:.3g} > {tolerance:g}); please report it with the model definition"
        )
