"""Data-parallel helpers for deconvolution layers."""

from __future__ import annotations

from torch import nn

from .delinear import Delinear
from .fast_deconv import FastDeconv

__all__ = ["sync_deconv"]


def sync_deconv(model: nn.Module, enabled: bool = True) -> int:
    """Make every FastDeconv/Delinear of ``model`` average its batch mean and covariance across ranks
    before the inverse square root (what SyncBatchNorm is to BatchNorm). Returns the number of layers set."""
    count = 0
    for module in model.modules():
        if isinstance(module, (FastDeconv, Delinear)):
            module.sync_stats = enabled
            count += 1
    return count
