"""Fold a trained deconvolution network into a plain CNN for inference.

In eval mode every deconvolution layer is a fixed affine map of its input: FastDeconv and Delinear
already run as ``conv(x, w D, b - w D mu)``, ChannelDeconv is ``y = W x + b`` over channels. Folding
writes those maps into plain layers once, so inference runs no whitening code and no per-forward
matrix products on weights:

- every FastDeconv becomes an ``nn.Conv2d`` and every Delinear an ``nn.Linear`` (their ``fuse()``);
- a ChannelDeconv is merged into the Linear or padding-free Conv2d that consumes it when only spatial
  averaging, flattening or dropout stand between them (those commute with a per-pixel channel map),
  otherwise it becomes a 1x1 ``nn.Conv2d`` (an ``nn.Linear`` for (N, C) inputs); in a timm-style model
  (``forward_features``/``forward_head``) it is never merged, so its features and pre-logits stay whitened;
- a BatchNorm is fused into a Conv2d (``torch.nn.utils.fusion.fuse_conv_bn_eval``) when the rule holds:
  *the BatchNorm's input is the output of a Conv2d that nothing else reads, and each runs once per
  forward*. The dataflow comes from a torch.fx trace, not from module names. A BatchNorm that does not
  follow a conv (e.g. the pre-activation BN of PreAct-ResNet, after a residual sum) stays as it is.

The folded model keeps the original class and module names (merged modules become ``nn.Identity``),
so its forward code is the architecture's own.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from timm.layers import BatchNormAct2d
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ndeconv.errors import NdeconvError
from ndeconv.layers import ChannelDeconv, Delinear, FastDeconv
from ndeconv.layers.deconvolve import norm_remainder

from ._graph import ModelGraph, trace_model

__all__ = [
    "DECONV_TYPES",
    "FoldReport",
    "FoldWarning",
    "default_example_input",
    "fold",
    "fold_with_report",
    "has_identity_whitening",
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
    traced: bool = True
    deconv_to_conv: list[str] = field(default_factory=list)
    delinear_to_linear: list[str] = field(default_factory=list)
    channel_deconv: dict[str, str] = field(default_factory=dict)  # name -> where it went
    bn_fused: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> conv it went into
    bn_kept: list[str] = field(default_factory=list)
    identity_whitening: list[str] = field(default_factory=list)
    check_max_abs: float | None = None
    check_rel: float | None = None

    def summary(self) -> str:
        parts = [
            f"{len(self.deconv_to_conv)} FastDeconv -> Conv2d",
            f"{len(self.delinear_to_linear)} Delinear -> Linear",
        ]
        if self.channel_deconv:
            parts.append(", ".join(f"ChannelDeconv {k} -> {v}" for k, v in self.channel_deconv.items()))
        parts.append(f"{len(self.bn_fused)} BatchNorm fused into convs")
        if self.bn_kept:
            parts.append(f"{len(self.bn_kept)} BatchNorm kept (not directly after a conv)")
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


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W): channels of the first conv, size from the pretrained_cfg (else the CIFAR topology's 32x32)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, FastDeconv))), None)
    if first is None:
        raise NdeconvError(f"{type(model).__name__} has no conv to read the input channels from; pass the input")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    height, width = tuple(cfg.get("input_size", (0, 32, 32)))[1:]
    return first.in_channels, int(height), int(width)


def default_example_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A seeded random batch shaped by :func:`model_input_size`, in the model's dtype and device."""
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model_input_size(model), generator=generator, dtype=torch.float64)
    return x.to(device=param.device, dtype=param.dtype)


def output_difference(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |a|): the project's relative-error measure."""
    diff = (reference.double() - other.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return diff, diff / scale if scale > 0 else diff


def fold(
    model: nn.Module, example_input: torch.Tensor | None = None, check: bool = True, inplace: bool = False
) -> nn.Module:
    """An inference-only copy of ``model`` with every deconvolution and fusable BatchNorm folded into plain layers.

    ``example_input`` (default: a random batch of 2 shaped by :func:`default_example_input`) sizes the
    ChannelDeconv folds and, with ``check``, compares the folded outputs with the unfolded eval outputs
    (raising if they disagree beyond rounding). See :func:`fold_with_report` for what was done.
    """
    return fold_with_report(model, example_input=example_input, check=check, inplace=inplace)[0]


def fold_with_report(
    model: nn.Module, example_input: torch.Tensor | None = None, check: bool = True, inplace: bool = False
) -> tuple[nn.Module, FoldReport]:
    """:func:`fold` plus a :class:`FoldReport`; warns (FoldWarning) about untrained whitening and train mode."""
    report = FoldReport(was_training=any(m.training for m in model.modules()))
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

    x = default_example_input(model) if example_input is None else example_input
    expected = _eval_output(model, x) if check else None  # before an in-place fold changes the model
    folded = model if inplace else copy.deepcopy(model)
    folded.eval()

    # 1. The convolutions and the head: each layer's own fuse().
    for name, module in list(folded.named_modules()):
        if isinstance(module, FastDeconv):
            _replace(folded, name, module.fuse())
            report.deconv_to_conv.append(name)
        elif isinstance(module, Delinear):
            _replace(folded, name, module.fuse())
            report.delinear_to_linear.append(name)

    # 2. Dataflow, for ChannelDeconv merges and conv -> BatchNorm pairs.
    graph: ModelGraph | None
    try:
        graph = trace_model(folded)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: fold without the graph rules
        graph = None
        report.traced = False
        warnings.warn(
            f"could not trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "BatchNorms stay unfused and ChannelDeconv layers become separate 1x1 convs",
            FoldWarning, stacklevel=2,
        )
    _fold_channel_deconvs(folded, graph, x, report)
    if graph is not None:
        _fuse_batchnorms(folded, graph, report)
    report.bn_kept = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if report.bn_kept:
        warnings.warn(
            f"{len(report.bn_kept)} BatchNorm(s) do not directly follow a conv and stay as per-channel affine layers "
            f"(e.g. {report.bn_kept[0]})",
            FoldWarning, stacklevel=2,
        )

    left = [n for n, m in folded.named_modules() if isinstance(m, DECONV_TYPES)]
    if left:  # cannot happen unless a new deconvolution type appears: never hand out a half-folded model
        raise NdeconvError(f"folding left deconvolution layers in place: {', '.join(left)}")
    for p in folded.parameters():
        p.requires_grad_(False)
    settings = getattr(folded, "deconv_settings", None)
    if dataclasses.is_dataclass(settings) and hasattr(settings, "deconv"):
        # A new head (reset_classifier) on the folded model must be plain too; keep what it was folded from.
        folded.folded_from_settings = settings
        folded.deconv_settings = dataclasses.replace(settings, deconv=False, block_fc=0)

    if expected is not None:
        _check(type(model).__name__, expected, folded, x, report)
    return folded, report


# -- helpers ---------------------------------------------------------------------------------------


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _channel_deconv_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Size]:
    """Input shape of each ChannelDeconv on ``x`` (it is sized by its input, not its constructor)."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, args[0].shape)
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, ChannelDeconv)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _fold_channel_deconvs(folded: nn.Module, graph: ModelGraph | None, x: torch.Tensor, report: FoldReport) -> None:
    names = [n for n, m in folded.named_modules() if isinstance(m, ChannelDeconv)]
    if not names:
        return
    # A timm-style model's forward_features / forward_head(pre_logits=True) must stay what they were: merging
    # a ChannelDeconv of the features into the classifier would leave them unwhitened.
    timm_style = hasattr(folded, "forward_features") and hasattr(folded, "forward_head")
    nodes: dict[str, fx.Node] = {}
    if graph is not None and not timm_style:  # the graph only serves merges
        gm = fx.GraphModule(folded, graph.graph)
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
        nodes = {n.target: n for n in graph.module_nodes(ChannelDeconv)}
    shapes = _channel_deconv_shapes(folded, x)
    for name in names:
        layer: ChannelDeconv = folded.get_submodule(name)
        if name not in shapes:
            raise NdeconvError(f"ChannelDeconv {name} did not run on the example input; cannot size its fold")
        shape = shapes[name]
        exact = copy.deepcopy(layer).double()  # compose in float64, round once
        consumer = _merge_target(graph, nodes[name], shape[1]) if name in nodes else None
        if consumer is not None:
            target = folded.get_submodule(consumer.target)
            _replace(folded, consumer.target, _compose(target, *exact.affine(shape[1])))
            _replace(folded, name, nn.Identity())
            report.channel_deconv[name] = f"merged into {consumer.target}"
        else:
            plain = exact.fuse(shape[1], input_dim=len(shape))
            _replace(folded, name, plain.to(dtype=layer.running_deconv.dtype))
            report.channel_deconv[name] = "1x1 Conv2d" if len(shape) == 4 else "Linear"


def _merge_target(graph: ModelGraph, node: fx.Node, channels: int) -> fx.Node | None:
    """The Linear / padding-free Conv2d fed by ``node`` through channel-preserving linear ops only."""
    current = node
    while True:
        user = graph.sole_reader(current)
        if user is None:
            return None
        if user.op == "call_module" and graph.calls[user.target] == 1:
            module = graph.modules[user.target]
            if isinstance(module, nn.Linear):
                shape = _shape(current)
                ok = shape is not None and len(shape) == 2 and module.in_features % channels == 0
                return user if ok and shape[1] == module.in_features else None
            if isinstance(module, nn.Conv2d) and not isinstance(module, FastDeconv):
                ok = module.groups == 1 and all(p == 0 for p in module.padding) and module.in_channels == channels
                return user if ok and len(_shape(current) or ()) == 4 else None
        if not graph.is_channel_passthrough(user):
            return None
        if user.op == "call_method" and user.target in ("view", "reshape"):
            before, after = _shape(current), _shape(user)
            if before is None or after is None or len(after) != 2 or after[0] != before[0]:
                return None  # only the (N, C, h, w) -> (N, C*h*w) flatten keeps channels apart
        current = user


def _shape(node: fx.Node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def _compose(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """``layer`` applied after the channel map ``y = weight x + bias`` (carried through averaging/flattening)."""
    channels = weight.shape[0]
    w = layer.weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if layer.bias is None else layer.bias.double()
    if isinstance(layer, nn.Linear):
        # Flattened (C, h, w) features: feature c*hw + p reads channel c at pooled position p.
        per_channel = w.view(w.shape[0], channels, -1)
        new_w = torch.einsum("ocp,cd->odp", per_channel, weight).reshape(w.shape)
        new_b = b + torch.einsum("ocp,c->o", per_channel, bias)
        new = nn.Linear(layer.in_features, layer.out_features, bias=True)
    else:
        new_w = torch.einsum("ocij,cd->odij", w, weight)
        new_b = b + torch.einsum("ocij,c->o", w, bias)
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, bias=True)
    new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(new_w)
        new.bias.copy_(new_b)
    return new


def _fuse_batchnorms(folded: nn.Module, graph: ModelGraph, report: FoldReport) -> None:
    for bn_node in graph.module_nodes(nn.BatchNorm2d):
        bn = folded.get_submodule(bn_node.target)
        if type(bn) not in (nn.BatchNorm2d, BatchNormAct2d):
            continue  # another subclass may compute something else: it stays as it is
        source = bn_node.args[0] if bn_node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and graph.calls[source.target] == 1):
            continue
        conv = folded.get_submodule(source.target)
        if type(conv) is not nn.Conv2d or conv.out_channels != bn.num_features:
            continue
        if graph.sole_reader(source) is not bn_node or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            continue  # such a BN normalises with batch statistics even in eval: not a fixed map
        _replace(folded, source.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        # timm's norm+act layer keeps its dropout and activation (norm -> drop -> act), as deconvolve() does.
        _replace(folded, bn_node.target, norm_remainder(bn))
        report.bn_fused[bn_node.target] = source.target


def _eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _check(model_name: str, expected: torch.Tensor, folded: nn.Module, x: torch.Tensor, report: FoldReport) -> None:
    with torch.no_grad():
        got = folded(x)
    report.check_max_abs, report.check_rel = output_difference(expected, got)
    # Fusing conv + BatchNorm rounds the product of weight and scale once in the model's dtype: half precision
    # differs by its own rounding (bfloat16 ~8e-3 measured on a BatchNorm network), not by a folding error.
    tolerance = {torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(expected.dtype, 1e-4)
    if not report.check_rel <= tolerance:
        raise NdeconvError(
            f"the folded {model_name} disagrees with the unfolded model in eval mode (relative error "
            f"{report.check_rel:.3g} > {tolerance:g}); please report it with the model definition"
        )
