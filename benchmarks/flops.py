"""Arithmetic of one training step: convolutions versus the whitening that network deconvolution adds.

Counted from the layer shapes of one forward pass (multiply-adds x 2), for the exact mode:

- convolutions and linear layers: forward, input gradient and weight gradient (3x the forward);
- per FastDeconv/Delinear: the covariance of the ``n`` sampled rows (``2 n d^2``; FastDeconv on CPU takes
  the split symmetric product, ``1.5 n d^2``), its backward ``dX = Xc S`` (``2 n d^2``), the weight fold ``w D``
  and its two backward products (``3 x 2 rows d^2``), and the inverse square root (one ``eigh`` of
  ``d x d`` plus 5 products of ``2 d^3``, counted as products only).

``1 + whitening / convolution`` is the ND/BN step-time ratio if every FLOP cost the same and nothing but
products cost anything: for networks of dense 3x3 convolutions (ResNet-18, VGG-16), whose convolutions
run at about the rate of the whitening's matrix products on this CPU (~160 GFLOP/s), a floor no exact
implementation goes under; for depthwise and grouped convolutions, which run far below that rate, only
a measure of how much arithmetic deconvolution adds.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ndeconv import Delinear, FastDeconv


def _conv_flops(m: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> float:
    kh, kw = m.kernel_size
    return 2.0 * y.numel() * (m.in_channels // m.groups) * kh * kw


def _sampled_rows(m: FastDeconv, x: torch.Tensor) -> int:
    n, c, h, w = x.shape
    blocks = 1 if m.groups > 1 else c * m.kernel_size[0] * m.kernel_size[1] // m.num_features
    if m.kernel_size == (1, 1):
        return -(-n * h * w // m.sampling_stride**2) * blocks
    grid = [(size + 2 * p - d * (k - 1) - 1) // m.sampling_stride + 1
            for size, p, d, k in zip((h, w), m.padding, m.dilation, m.kernel_size, strict=True)]
    return n * grid[0] * grid[1] * blocks


def _product_flops(n: int, d: int, matrices: int, weight_rows: int, split: bool) -> float:
    """The whitening's products but the inverse square root's: Gram, its backward, the fold and its backward."""
    gram = (1.5 if split and d >= 256 else 2.0) * n * d * d
    backward = 2.0 * n * d * d
    fold = 3 * 2.0 * weight_rows * d * d
    return matrices * (gram + backward) + fold


def _isqrt_flops(d: int) -> float:
    return 5 * 2.0 * d**3


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[float, list[dict]]:
    """One forward pass of a training-mode copy of ``model`` on ``x``: FLOP of the convolutions and linears (forward,
    input and weight gradient), and one ``whitening_layers`` record per whitening layer."""
    model = copy.deepcopy(model).train()
    split = x.device.type == "cpu"
    conv = 0.0
    layers: list[dict] = []

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal conv
        inp = inputs[0]
        if isinstance(m, nn.Conv2d | FastDeconv):
            conv += 3 * _conv_flops(m, inp, out)
        else:  # nn.Linear | Delinear
            conv += 3 * 2.0 * out.numel() * m.in_features
        if isinstance(m, FastDeconv):
            n, d, matrices = _sampled_rows(m, inp), m.num_features, m.groups
            rows = m.out_channels * (1 if m.groups > 1 else m.in_channels // m.block)
        elif isinstance(m, Delinear):
            d, matrices = m.block, 1
            n = inp.shape[0] * (m.in_features // d)
            rows = m.out_features * (m.in_features // d)
        else:
            return
        layers.append({"rows": n, "features": d, "matrices": matrices, "weight_rows": rows, "grouped": matrices > 1,
                       "product_flops": _product_flops(n, d, matrices, rows, split and isinstance(m, FastDeconv))})

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear | FastDeconv | Delinear)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return conv, layers


def whitening_layers(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """One record per whitening layer of a training step on ``x``: ``rows`` sampled, ``features`` (d), ``matrices``
    (one per group), ``weight_rows`` of the fold, ``grouped`` (grouped convs whiten in float32 even with
    ndeconv.set_bf16_whitening), and ``product_flops``: the whitening's products but the inverse square root's."""
    return _trace(model, x)[1]


def step_flops(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """GFLOP of one training step on ``x``: ``conv`` (convs + linears), ``whitening`` (ND's addition)."""
    conv, layers = _trace(model, x)
    whitening = sum(r["product_flops"] + r["matrices"] * _isqrt_flops(r["features"]) for r in layers)
    return {"conv_gflop": round(conv / 1e9, 2), "whitening_gflop": round(whitening / 1e9, 2),
            "flop_ratio_nd_over_bn": round(1 + whitening / max(conv, 1.0), 3)}
