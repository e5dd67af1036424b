"""Strided depthwise convolutions under CPU bf16 autocast take their input gradient from the float32 kernel
(ndeconv.layers._conv): the same forward and weight gradients as F.conv2d, an input gradient as close to the exact
one, in both forms of the zoo networks, and still plain convolutions to fold, deconvolve and export."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

import ndeconv  # noqa: F401 - registers the zoo
from ndeconv.convert.fold import find_conv_batchnorm_pairs
from ndeconv.layers import FastDeconv, deconvolve
from ndeconv.layers._conv import Conv2d, conv2d, plain_conv_type

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _grads(fn, x0: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, grad: torch.Tensor, stride: int, groups: int):
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
    with torch.autocast(**BF16):
        out = fn(x, w, b, stride, w0.shape[-1] // 2, 1, groups)
    out.backward(grad)
    return out.detach(), x.grad, w.grad, b.grad, out.grad_fn


def test_a_strided_depthwise_bf16_input_gradient_is_the_float32_kernels_and_the_rest_is_unchanged() -> None:
    gen = torch.Generator().manual_seed(0)
    for cin, cout, kernel in ((32, 32, 3), (16, 32, 5)):  # depthwise, and two outputs per channel (PNASNet-A)
        x = torch.randn(8, cin, 16, 16, generator=gen).to(memory_format=torch.channels_last)
        w, b = torch.randn(cout, 1, kernel, kernel, generator=gen) / kernel, torch.randn(cout, generator=gen)
        grad = torch.randn(8, cout, 8, 8, generator=gen).to(torch.bfloat16)
        ours = _grads(conv2d, x, w, b, grad, 2, cin)
        plain = _grads(F.conv2d, x, w, b, grad, 2, cin)
        assert type(ours[4]).__name__ == "_StridedDepthwiseConvBackward"
        assert ours[0].dtype == torch.bfloat16 and torch.equal(ours[0], plain[0])  # the forward, bit for bit
        assert torch.equal(ours[2], plain[2]) and torch.equal(ours[3], plain[3])  # weight and bias gradients
        # The input gradient of the same bf16 values, exact (float64), against both kernels' bf16 results.
        xd, wd = x.to(torch.bfloat16).double().requires_grad_(), w.to(torch.bfloat16).double()
        F.conv2d(xd, wd, None, 2, kernel // 2, 1, cin).backward(grad.double())
        scale = xd.grad.abs().max()
        ulp = scale * 2.0**-8  # one bf16 unit in the last place at the largest value
        assert ours[1].dtype == torch.float32 and ours[1].is_contiguous(memory_format=torch.channels_last)
        assert (ours[1] - xd.grad).abs().max() <= ulp
        assert (ours[1] - plain[1]).abs().max() <= 2 * ulp


def test_other_convolutions_run_f_conv2d_as_they_are() -> None:
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    w1, w8 = torch.randn(8, 1, 3, 3, requires_grad=True), torch.randn(8, 8, 3, 3, requires_grad=True)
    with torch.autocast(**BF16):
        assert type(conv2d(x, w1, None, 1, 1, 1, 8).grad_fn).__name__ != "_StridedDepthwiseConvBackward"  # stride 1
        assert type(conv2d(x, w8, None, 2, 1).grad_fn).__name__ != "_StridedDepthwiseConvBackward"  # not grouped
        with torch.no_grad():
            assert conv2d(x, w1, None, 2, 1, 1, 8).grad_fn is None
    assert torch.equal(conv2d(x, w1, None, 2, 1, 1, 8), F.conv2d(x, w1, None, 2, 1, 1, 8))  # float32


def test_both_forms_of_the_zoo_route_their_strided_depthwise_convolutions_and_stay_plain_convolutions() -> None:
    bn = timm.create_model("mobilenetv2_deconv", deconv=False, num_classes=10)
    strided = [n for n, m in bn.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.stride[0] > 1]
    assert strided and all(type(bn.get_submodule(n)) is Conv2d for n in strided)
    assert all(type(m) is nn.Conv2d for n, m in bn.named_modules() if isinstance(m, nn.Conv2d) and n not in strided)
    assert all(plain_conv_type(bn.get_submodule(n)) is nn.Conv2d for n in strided)
    # The BatchNorm after each is fused by fold's BatchNorm pass, and deconvolve() converts it.
    pairs = find_conv_batchnorm_pairs(bn.eval())
    assert set(strided) <= set(pairs.values())
    converted = deconvolve(timm.create_model("mobilenetv2_deconv", deconv=False, num_classes=10))
    assert not any(plain_conv_type(m) for m in converted.modules())
    assert all(isinstance(converted.get_submodule(n), FastDeconv) for n in strided)
    # The deconvolution form routes the same layers through FastDeconv's convolution.
    nd = timm.create_model("mobilenetv2_deconv", num_classes=10).train()
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    seen = []
    for name in strided:
        nd.get_submodule(name).register_forward_hook(lambda _m, _i, out: seen.append(type(out.grad_fn).__name__))
    with torch.autocast(**BF16):
        nd.to(memory_format=torch.channels_last)(x)
    assert seen == ["_StridedDepthwiseConvBackward"] * len(strided)
