"""The layer math of network deconvolution (torch only, no timm): the deconvolution layers, the inverse square
root, the sampled patch statistics, model surgery (``deconvolve``), gradient checkpointing and the running
statistics' synchronisation across processes. Everything else in ndeconv builds on this package; it imports
nothing from the rest of ndeconv but the shared utilities (``ndeconv.errors``, ``ndeconv.runtime``)."""

from __future__ import annotations

from .channel_deconv import ChannelDeconv
from .deconvolve import deconvolve
from .delinear import Delinear
from .fast_deconv import FastDeconv, set_bf16_whitening, set_fast_mode
from .fast_deconv1d import FastDeconv1d
from .fast_deconv3d import FastDeconv3d
from .isqrt import isqrt_newton_schulz, isqrt_newton_schulz_batch
from .sync import sync_deconv

__all__ = [
    "ChannelDeconv",
    "Delinear",
    "FastDeconv",
    "FastDeconv1d",
    "FastDeconv3d",
    "deconvolve",
    "isqrt_newton_schulz",
    "isqrt_newton_schulz_batch",
    "set_bf16_whitening",
    "set_fast_mode",
    "sync_deconv",
]
