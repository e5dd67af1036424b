"""Exact conversion of a trained conv (+ BatchNorm) network into deconvolution: ``deconvolve(model, calibrate=...)``.

In eval a FastDeconv is a fixed affine map of each input patch ``x``: with its running mean ``mu`` and running
whitening matrix ``D`` it runs ``conv(x, w D, b - (w D) mu)`` (``folded_weight_bias``: per channel block, the
blocks sharing ``D``; per group for a grouped conv). A conv followed by an eval-mode BatchNorm is the affine map
``W' x + b'`` with the BatchNorm folded in (``s = gamma / sqrt(running_var + eps)``, ``W' = W s``,
``b' = (b - running_mean) s + beta``). Setting

    w = W' D^{-1}   and   b = b' + W' mu

makes ``w D = W'`` and ``b - (w D) mu = b'``: the FastDeconv computes the conv+BatchNorm's eval output, for any
invertible ``D`` and any ``mu``, zero padding included (the same folded weight reads the same padded patches).
``D`` is invertible whatever the data: the layer's Newton–Schulz polynomial is positive on the spectrum of the
normalised ``Cov + eps I`` (its eigenvalues lie between ``1`` and ``1.5**n_iter`` over the square root of that
matrix's Frobenius norm, so ``D``'s condition number is at most ``1.5**n_iter``), and averages of such matrices
stay positive definite. ``D^{-1}`` is taken by a float64 solve against the ``D`` stored in the layer (rounded to
its dtype first), so the only error left is the rounding of ``w`` and of the layer's own fold.

Calibration gives ``mu`` and ``D`` the values a training run's running averages reach on the calibration
batches: each batch's statistics come from the layer's own code (``FastDeconv._batch_statistics``: its patch
sampler, ``eps``, block layout, groups and Newton–Schulz iterations), and the buffers are their plain average
over the batches. That average is the limit of the running averages on those batches: with momentum
``1/(k+1)`` at step ``k`` (a cumulative average) exactly, and with a constant momentum cycling over the batches
it is the average of the running values over one cycle once the start is forgotten (summing the update
``R' = (1 - m) R + m S`` over a cycle of the limit cycle gives ``sum R = sum S``). It is not the whitening of the
pooled covariance: ``D`` is not linear in the covariance, and training averages ``D``, not the covariance.

The batches go through the original network, once each, in eval mode: its function is the converted network's,
so each conv sees the input its FastDeconv will see in eval (up to rounding), in one forward per batch instead of
one per layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils.hooks import RemovableHandle

from ._common import full_precision
from .fast_deconv import FastDeconv

__all__ = ["CalibrationError", "conv_bn_affine", "invert_fold", "swap_in_calibrated"]


class CalibrationError(ValueError):
    """A conversion that cannot be exact (a BatchNorm without running statistics, a conv its norm does not
    directly follow, no calibration data); the model is left unchanged."""


# Relative output error (max |a - b| / max |b|) beyond which the end-to-end check calls a conversion wrong. A wrong
# layout or a mis-paired BatchNorm changes the outputs by order one; rounding through a deep float32 network stays
# below 1e-5 on the tested models (docs/conversion.md).
_CHECK_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


@dataclass
class _Pending:
    """One conv to convert: where it sits, its BatchNorm, the FastDeconv that replaces it, its statistics' sums."""

    parent: nn.Module
    name: str
    norm_name: str | None
    layer: FastDeconv
    label: str  # the conv's qualified name, for messages
    norm_label: str | None
    mean_sum: torch.Tensor | None = None
    deconv_sum: torch.Tensor | None = None
    count: int = 0
    norm_calls: int = 0
    last_output: torch.Tensor | None = None
    hooks: list[RemovableHandle] = field(default_factory=list)

    @property
    def conv(self) -> _ConvNd:
        return self.parent._modules[self.name]  # type: ignore[return-value]

    @property
    def norm(self) -> _BatchNorm | None:
        return None if self.norm_name is None else self.parent._modules[self.norm_name]  # type: ignore[return-value]


def conv_bn_affine(conv: _ConvNd, norm: _BatchNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``W'`` and bias ``b'`` (float64) of the eval-mode map ``norm(conv(x))`` (``conv(x)`` without a norm)."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(conv.out_channels)
    if norm is None:
        return weight, bias
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    return weight * scale.view(-1, *(1,) * (weight.dim() - 1)), bias * scale + shift


def invert_fold(layer: FastDeconv, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight ``w`` and bias ``b`` (float64) for which ``layer.folded_weight_bias`` with the layer's running
    statistics gives ``weight`` and ``bias``: ``w D = weight`` block by block (group by group), ``b = bias +
    weight mu``. The layouts are ``folded_weight_bias``'s, read backwards."""
    mean = layer.running_mean.double()
    deconv = layer.running_deconv.double()
    out, nf = layer.out_channels, layer.num_features
    if layer.groups == 1:
        blocks = layer.in_channels // layer.block
        rows = weight.reshape(out, nf, blocks).transpose(1, 2).reshape(-1, nf)  # one row per (output, block)
        w = torch.linalg.solve(deconv, rows, left=False)  # w D = rows
        shift = (rows @ mean).view(out, blocks).sum(1)
        w = w.view(out, blocks, nf).transpose(1, 2).reshape(weight.shape)
    else:
        rows = weight.reshape(layer.groups, -1, nf)  # (groups, outputs per group, nf)
        w = torch.linalg.solve(deconv, rows, left=False).reshape(weight.shape)
        shift = (rows @ mean.view(-1, nf, 1)).view(out)
    return w, bias + shift


def _check_norm(label: str, norm: _BatchNorm) -> None:
    if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
        raise CalibrationError(
            f"deconvolve: the BatchNorm after {label} keeps no running statistics (track_running_stats=False), so "
            "its eval output depends on the batch and is no fixed affine map a FastDeconv could take over; "
            "nothing was changed")


def _first_tensor(batch: object, label: int) -> torch.Tensor:
    # A DataLoader yields (images, labels): the images are the input.
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise CalibrationError(f"deconvolve: calibration batch {label} is a {type(batch).__name__}, not a tensor "
                               "(give an iterable of input tensors, or of (input, ...) tuples); nothing was changed")
    return batch


def _outputs(y: object) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuples/lists/dicts of them), in order."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _outputs(v)]
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _outputs(v)]
    return []


def _relative_error(reference: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(reference, got, strict=True):
        scale = a.double().abs().max().item() if a.numel() else 0.0
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


class _Modes:
    """Every module's training flag, set to eval for a pass and put back after (model.train(mode) cannot restore a
    model whose parts are in different modes)."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = {m: m.training for m in model.modules()}

    def restore(self) -> None:
        for m, mode in self.modes.items():
            m.training = mode


def _hook(p: _Pending) -> tuple[Callable[..., None], Callable[..., None], Callable[..., None]]:
    # What the layer's training forward does with its input: FastDeconv1d takes its statistics from an (N, C, 1, L)
    # view of the signal, FastDeconv3d from its sampled depth windows viewed as images.
    view = getattr(p.layer, "_statistics_input", None)

    def pre_hook(_conv: nn.Module, args: tuple) -> None:
        x = args[0] if view is None else view(args[0])
        mean, deconv = p.layer._batch_statistics(x)
        mean, deconv = mean.detach().double(), deconv.detach().double()
        p.mean_sum = mean if p.mean_sum is None else p.mean_sum + mean
        p.deconv_sum = deconv if p.deconv_sum is None else p.deconv_sum + deconv
        p.count += 1

    def post_hook(_conv: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        p.last_output = output

    def norm_hook(_norm: nn.Module, args: tuple) -> None:
        # The removed BatchNorm must read exactly what the conv wrote, or folding it into the conv changes the network.
        x, out = args[0], p.last_output
        p.last_output = None
        p.norm_calls += 1
        if out is None or not (x is out or (x.shape == out.shape and torch.equal(x, out))):
            raise CalibrationError(
                f"deconvolve: {p.norm_label} follows {p.label} in the module list but does not read its "
                "output in the forward, so it cannot be folded into that conv; nothing was changed")

    return pre_hook, post_hook, norm_hook


def _calibrate(model: nn.Module, pending: list[_Pending], batches: Iterable[object]) -> tuple[torch.Tensor, object]:
    """Pass ``batches`` through the original model in eval mode, summing each conv's batch statistics; returns
    the first batch and the model's output on it (the end-to-end check's reference)."""
    for p in pending:
        pre_hook, post_hook, norm_hook = _hook(p)
        p.hooks.append(p.conv.register_forward_pre_hook(pre_hook))
        p.hooks.append(p.conv.register_forward_hook(post_hook))
        if p.norm is not None:
            p.hooks.append(p.norm.register_forward_pre_hook(norm_hook))
    param = next(iter(p.layer.weight for p in pending))
    modes = _Modes(model)
    first: tuple[torch.Tensor, object] | None = None
    try:
        model.eval()
        with torch.no_grad(), full_precision(param.device):
            for i, batch in enumerate(batches):
                x = _first_tensor(batch, i)
                if x.is_floating_point():
                    x = x.to(device=param.device, dtype=param.dtype)
                y = model(x)
                if first is None:
                    first = (x, y)
    finally:
        for p in pending:
            for h in p.hooks:
                h.remove()
            p.hooks.clear()
            p.last_output = None
        modes.restore()
    if first is None:
        raise CalibrationError("deconvolve: calibrate= gave no batches; pass an iterable of input tensors (calibration "
                               "data, e.g. a few hundred training images); nothing was changed")
    return first


def _set_statistics(p: _Pending) -> None:
    layer = p.layer
    with torch.no_grad():
        if p.count == 0:
            # Never reached (a branch the calibration data did not take): identity statistics keep the map exact.
            warnings.warn(f"deconvolve: calibration never ran {p.label}; its FastDeconv keeps the identity whitening "
                          "and zero mean (still the same eval function)", UserWarning, stacklevel=4)
        else:
            layer.running_mean.copy_(p.mean_sum / p.count)
            layer.running_deconv.copy_((p.deconv_sum / p.count).view_as(layer.running_deconv))
        # A BatchNorm the forward never calls (PreAct-ResNet's stem norm) is no part of the function: nothing to fold.
        norm = p.norm if p.norm_calls else None
        if norm is not None and p.norm_calls != p.count:
            raise CalibrationError(f"deconvolve: {p.norm_label} normalised {p.label}'s output in {p.norm_calls} of its "
                                   f"{p.count} calls, so it cannot be folded into that conv; nothing was changed")
        # From the stored (rounded) statistics: the fold in eval multiplies by exactly these.
        target_w, target_b = conv_bn_affine(p.conv, norm)
        w, b = invert_fold(layer, target_w, target_b)
        layer.weight.copy_(w)
        layer.bias.copy_(b)


def swap_in_calibrated(
    model: nn.Module, replacements: list[tuple[nn.Module, str, str | None, FastDeconv]], batches: Iterable[object],
    remainder: Callable[[nn.Module], nn.Module],
) -> nn.Module:
    """``deconvolve``'s ``calibrate=`` path: calibrate each replacement FastDeconv on ``batches``, give it the weight
    and bias that make it compute its conv's (and BatchNorm's) eval output, swap it in and the BatchNorm out
    (``remainder(norm)``, deconvolve's ``norm_remainder``: what stays of a norm+act layer), and check the converted
    model's eval output on the first batch against the original's. Any failure leaves ``model`` as it was."""
    names = {m: n for n, m in model.named_modules()}
    pending = []
    for parent, name, norm_name, layer in replacements:
        if layer.bias is None:
            raise CalibrationError("deconvolve: calibrate= needs a bias in every FastDeconv (the patch mean's shift "
                                   "goes there); drop bias=False; nothing was changed")
        label = names.get(parent._modules[name], name)
        norm_label = None if norm_name is None else names.get(parent._modules[norm_name], norm_name)
        p = _Pending(parent, name, norm_name, layer, label, norm_label)
        if p.norm is not None:
            _check_norm(label, p.norm)
        pending.append(p)
    x, y = _calibrate(model, pending, batches)
    for p in pending:
        _set_statistics(p)

    originals = [(p.parent, p.name, p.conv, p.norm_name, p.norm) for p in pending]
    for p in pending:
        norm = p.norm
        setattr(p.parent, p.name, p.layer)
        if norm is not None:
            # In the norm's mode: a new Identity would start in train mode in an eval model (fold warns of that).
            setattr(p.parent, p.norm_name, remainder(norm).train(norm.training))
    modes = _Modes(model)
    try:
        model.eval()
        with torch.no_grad(), full_precision(x.device):
            got = model(x)
    finally:
        modes.restore()
    reference, converted = _outputs(y), _outputs(got)
    error = _relative_error(reference, converted) if len(reference) == len(converted) else float("inf")
    tolerance = _CHECK_TOLERANCE.get(x.dtype, 1e-3)
    if not error <= tolerance:
        for parent, name, conv, norm_name, norm in originals:
            setattr(parent, name, conv)
            if norm_name is not None:
                setattr(parent, norm_name, norm)
        raise CalibrationError(
            f"deconvolve: the converted model's eval output differs from the original's by {error:.3g} (relative, "
            f"> {tolerance:g}) on the first calibration batch: some conv's output is read by more than the "
            "BatchNorm after it, or the model computes something deconvolve cannot see; the model was restored")
    return model
