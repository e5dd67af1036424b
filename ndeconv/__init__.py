"""ndeconv: network deconvolution (Ye et al., ICLR 2020) layers, model zoo and conversion tools.

The package is layered, each layer importing only those before it:

- ``ndeconv.layers``   the layer math (torch only), with the shared ``errors``, ``io``, ``runtime`` and
                       ``datasets`` modules
- ``ndeconv.zoo``      the timm-registered networks and their pretrained weights
- ``ndeconv.convert``  fold into plain convolutions, ONNX export, the authors' checkpoints
- the application      ``ndeconv.loading``, ``ndeconv.training``, ``ndeconv.commands``, ``ndeconv.cli``

``import ndeconv`` (this face) re-exports the layers and registers the zoo's ``*_deconv`` models with timm, the
one documented convenience; nothing inside the package imports the face.
"""

from __future__ import annotations

from pathlib import Path

from ._source_tree import mount
from ._version import __version__
from .layers import (
    ChannelDeconv,
    Delinear,
    FastDeconv,
    FastDeconv1d,
    FastDeconv3d,
    deconvolve,
    isqrt_newton_schulz,
    isqrt_newton_schulz_batch,
    set_fast_mode,
    sync_deconv,
)
from .runtime import keep_freed_memory

mount(Path(__file__).resolve().parent)


__all__ = [
    "ChannelDeconv",
    "Delinear",
    "FastDeconv",
    "FastDeconv1d",
    "FastDeconv3d",
    "deconvolve",
    "set_fast_mode",
    "sync_deconv",
    "isqrt_newton_schulz",
    "isqrt_newton_schulz_batch",
    "keep_freed_memory",
    "__version__",
]

# Registers the zoo's ``*_deconv`` models with timm. Last, because the zoo is built from the layers above.
from . import zoo  # noqa: E402, F401
