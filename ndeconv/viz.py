"""Pictures of what a deconvolution network learned to whiten.

The paper (Fig. 3) shows that the first layer's whitening matrix, read row by row as
``k x k`` kernels, looks like the center-surround receptive fields of early vision, and
that applying it to an image removes pixel correlation and leaves edges. The first
FastDeconv of a model gives both: row ``c*k*k + centre`` of its running ``D`` is the
kernel that produces the whitened value of channel ``c`` at a pixel from its patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .layers.fast_deconv import FastDeconv

__all__ = ["first_deconv", "effective_kernels", "whiten_images", "whitening_figure"]


def first_deconv(model: nn.Module) -> FastDeconv:
    """The first FastDeconv of ``model`` in registration order (the stem in every zoo model)."""
    for module in model.modules():
        if isinstance(module, FastDeconv):
            return module
    raise UsageError("the model has no FastDeconv layer (is it the BatchNorm form?); use a deconvolution model")


def effective_kernels(layer: FastDeconv) -> torch.Tensor:
    """The running whitening matrix as kernels: (num_features, block, kh, kw), one per row of ``D``.

    Row ``f`` of ``D`` maps a patch of ``block`` channels (channel-major, as im2col lays it out for
    a single-block stem) to whitened feature ``f``.
    """
    if layer.groups != 1 or layer.in_channels != layer.block:
        raise UsageError(
            f"{layer._owner()}: kernels are drawn for a stem that whitens all its input channels as one block "
            f"(block={layer.block}, in_channels={layer.in_channels}, groups={layer.groups})"
        )
    kh, kw = layer.kernel_size
    return layer.running_deconv.detach().float().reshape(layer.num_features, layer.block, kh, kw)


def whiten_images(layer: FastDeconv, images: torch.Tensor) -> torch.Tensor:
    """Whitened images: each pixel replaced by the centre feature of its whitened patch, per channel."""
    kernels = effective_kernels(layer)
    kh, kw = layer.kernel_size
    centre = (kh // 2) * kw + kw // 2
    rows = [c * kh * kw + centre for c in range(layer.block)]
    mean = layer.running_mean.detach().float().reshape(layer.block, kh, kw)
    weight = kernels[rows]  # (C, C, kh, kw)
    bias = -(weight * mean.unsqueeze(0)).flatten(1).sum(1)
    padding = (layer.dilation[0] * (kh // 2), layer.dilation[1] * (kw // 2))
    return F.conv2d(images.float(), weight, bias, padding=padding, dilation=layer.dilation)


def whitening_figure(model: nn.Module, images: torch.Tensor, title: str = ""):
    """One matplotlib Figure: the stem's effective kernels (top) and images before/after whitening (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = first_deconv(model)
    kernels = effective_kernels(layer)
    n_k = kernels.shape[0]
    n_img = images.shape[0]
    whitened = whiten_images(layer, images)
    cols = max(math.ceil(math.sqrt(n_k)), n_img)
    k_rows = math.ceil(n_k / cols)
    fig, axes = plt.subplots(k_rows + 2, cols, figsize=(1.3 * cols, 1.3 * (k_rows + 2)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n_k):
        k = kernels[i].mean(0) if kernels.shape[1] > 1 else kernels[i, 0]
        lim = float(k.abs().max()) or 1.0
        axes[i // cols, i % cols].imshow(k.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    for j in range(n_img):
        axes[k_rows, j].imshow(_to_display(images[j]), cmap="gray")
        axes[k_rows + 1, j].imshow(_to_display(whitened[j]), cmap="gray")
    axes[k_rows, 0].set_title("input", fontsize=8, loc="left")
    axes[k_rows + 1, 0].set_title("whitened", fontsize=8, loc="left")
    axes[0, 0].set_title("effective deconvolution kernels (rows of D)", fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _to_display(img: torch.Tensor):
    img = img.detach().float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
