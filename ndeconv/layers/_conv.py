"""2-D convolution with the input gradient of strided depthwise convolutions taken in float32 under CPU bf16.

With torch 2.14's oneDNN, the bf16 backward-data of a depthwise convolution (``groups == in_channels``, one or more
output channels per group) with a stride above 1 runs on a general grouped-convolution kernel, many times slower than
oneDNN's float32 depthwise kernel (``python benchmarks/depthwise_bf16.py``, in docs/benchmarks.md): a third or more
of a MobileNetV2 or EfficientNet-B0 training step under bf16 autocast went there. The forward and the weight
gradient have fast bf16 kernels and stay as they are; only the input gradient is computed from the same bf16 values
in float32 and rounded to bf16, which is what the bf16 kernel computes too (bf16 products are exact in float32, and
it accumulates in float32): the two differ only by the order of each sum of at most ``kernel area`` products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["Conv2d", "conv2d", "plain_conv_type", "to_torch_convs"]

# Off: every convolution runs F.conv2d as it is (benchmarks/depthwise_bf16.py times both).
ROUTE_INPUT_GRADIENT = True


def _is_bf16(x: torch.Tensor) -> bool:
    """Whether ``F.conv2d`` on ``x`` here would compute in bf16 (a bf16 input, or CPU bf16 autocast)."""
    if x.dtype == torch.bfloat16:
        return True
    return (x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def routes_input_gradient(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], groups: int) -> bool:
    """Whether ``conv2d`` takes this convolution's input gradient in float32: a strided depthwise convolution
    computed in bf16 on the CPU, with a gradient to take."""
    return (ROUTE_INPUT_GRADIENT and x.device.type == "cpu" and groups > 1 and weight.shape[1] == 1 and x.dim() == 4
            and x.shape[1] == groups and max(stride) > 1 and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad) and _is_bf16(x))


class _StridedDepthwiseConv(torch.autograd.Function):
    """``F.conv2d`` in bf16 whose input gradient is computed in float32 (module docstring)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)  # autocast's casts for conv2d
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # noqa: ANN001, ANN205 - autograd.Function
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_shape = None if bias is None else bias.shape
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd.Function
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, ctx.bias_shape, stride, padding, dilation, False, [0, 0], groups,
                [False, need_w, need_b])
        if need_x:
            # The input tensor only gives the shape and memory format; float32 picks oneDNN's depthwise kernel.
            shape_of_x = torch.empty_like(x, dtype=torch.float32)
            grad_x = torch.ops.aten.convolution_backward(
                grad.float(), shape_of_x, weight.float(), None, stride, padding, dilation, False, [0, 0], groups,
                [True, False, False])[0].to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
           dilation: int | tuple[int, int] = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` (numeric padding), with a strided depthwise convolution's bf16 input gradient taken in float32
    on the CPU (module docstring). The forward output is ``F.conv2d``'s, bit for bit."""
    stride = _pair(stride)
    if isinstance(padding, str) or not routes_input_gradient(x, weight, stride, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _StridedDepthwiseConv.apply(x, weight, bias, stride, list(_pair(padding)), list(_pair(dilation)), groups)


torch.fx.wrap("conv2d")  # a leaf call for torch.fx tracing: its routing reads tensor attributes


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose zero-padded convolution is ``conv2d``: the same parameters, state_dict and export (outside
    CPU bf16 training it runs ``F.conv2d``). The zoo builds its strided depthwise convolutions with it."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def fuse(self) -> nn.Conv2d:
        """torch's own ``nn.Conv2d`` holding these parameters: the inference form (timm's ``reparameterize_model``
        calls it, as ``ndeconv.convert.fold`` does)."""
        plain = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, self.bias is not None, self.padding_mode,
                          device=self.weight.device, dtype=self.weight.dtype)
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)


def plain_conv_type(module: nn.Module) -> type[nn.Module] | None:
    """``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` for a plain convolution of that dimensionality (``Conv2d`` above
    counts as ``nn.Conv2d``: it computes the same), None for anything else (a FastDeconv, another subclass that
    may compute something else)."""
    kind = type(module)
    if kind is Conv2d:
        return nn.Conv2d
    return kind if kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else None


def to_torch_convs(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``Conv2d`` above in ``model`` by its ``fuse()`` (what folding leaves: stock torch
    modules only); return ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Conv2d:
                setattr(parent, name, child.fuse())
    return model
