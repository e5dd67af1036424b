"""ndeconv: network deconvolution (Ye et al., ICLR 2020) layers, model zoo and conversion tools.

The package is layered, each layer importing only those before it:

- ``ndeconv.layers``   the layer math (torch only), with the shared ``errors``, ``io``, ``runtime`` and
                       ``datasets`` modules
- ``ndeconv.zoo``      the timm-registered networks and their pretrained weights
- ``ndeconv.convert``  fold into plain convolutions, ONNX export, the authors' checkpoints
- the application      ``ndeconv.loading``, ``ndeconv.training``, ``ndeconv.commands``, ``ndeconv.cli``

``import ndeconv`` (this face) re-exports the layers and registers the zoo's ``*_deconv`` models with timm, the
one documented convenience; nothing inside the package imports the face.

Both happen when they are needed, not at ``import ndeconv``, because the ``ndeconv`` command imports this package
first and must not pay torch's and timm's import (seconds of CPU) to print its help: the layers load on first
use (``ndeconv.FastDeconv``), and the zoo registers with timm at once if timm is imported already, else the moment
it is (``_register_with_timm``), so ``import ndeconv; timm.create_model('resnet18_deconv')`` works as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._source_tree import mount
from ._version import __version__

if TYPE_CHECKING:
    from .layers import (
        ChannelDeconv,
        Delinear,
        FastDeconv,
        FastDeconv1d,
        FastDeconv3d,
        deconvolve,
        isqrt_newton_schulz,
        isqrt_newton_schulz_batch,
        set_bf16_whitening,
        set_fast_mode,
        sync_deconv,
    )
    from .runtime import keep_freed_memory

mount(Path(__file__).resolve().parent)

# Re-exported name -> the module it lives in, imported on first access (PEP 562).
_LAZY = {name: "ndeconv.layers" for name in (
    "ChannelDeconv", "Delinear", "FastDeconv", "FastDeconv1d", "FastDeconv3d", "deconvolve", "isqrt_newton_schulz",
    "isqrt_newton_schulz_batch", "set_bf16_whitening", "set_fast_mode", "sync_deconv",
)}
_LAZY["keep_freed_memory"] = "ndeconv.runtime"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    if name in ("zoo", "convert", "layers", "loading", "training", "datasets", "io", "runtime", "viz"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ChannelDeconv",
    "Delinear",
    "FastDeconv",
    "FastDeconv1d",
    "FastDeconv3d",
    "deconvolve",
    "set_bf16_whitening",
    "set_fast_mode",
    "sync_deconv",
    "isqrt_newton_schulz",
    "isqrt_newton_schulz_batch",
    "keep_freed_memory",
    "__version__",
]



class _RegisterWithTimm:
    """A meta-path finder that sees ``import timm`` once and has timm's loader import ``ndeconv.zoo`` right after
    timm's own ``__init__`` ran, so the zoo is in timm's registry before the importer gets timm back."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once, and so that the search below finds timm itself
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            exec_timm(module)
            importlib.import_module("ndeconv.zoo")

        spec.loader.exec_module = exec_module  # this spec's loader only
        return spec


def _register_with_timm() -> None:
    if "timm" in sys.modules:
        importlib.import_module("ndeconv.zoo")  # registers the zoo's models (zoo/__init__.py)
    elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithTimm())


_register_with_timm()
