"""ndeconv: network deconvolution (Ye et al., ICLR 2020) layers, model zoo and conversion tools.

``import ndeconv`` also registers the zoo's ``*_deconv`` models with timm.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .channel_deconv import ChannelDeconv
from .deconvolve import deconvolve
from .delinear import Delinear
from .distributed import sync_deconv
from .fast_deconv import FastDeconv, set_fast_mode
from .isqrt import isqrt_newton_schulz, isqrt_newton_schulz_batch
from .runtime import keep_freed_memory

try:
    __version__ = version("ndeconv")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ChannelDeconv",
    "Delinear",
    "FastDeconv",
    "deconvolve",
    "set_fast_mode",
    "sync_deconv",
    "isqrt_newton_schulz",
    "isqrt_newton_schulz_batch",
    "keep_freed_memory",
    "__version__",
]

# Registers the zoo's ``*_deconv`` models with timm. Last, because the zoo is built from the layers above.
import zoo  # noqa: E402, F401
