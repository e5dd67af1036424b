"""The ONNX export's fixed settings, torch-free so that ``ndeconv export --help`` can print them without loading the
exporter (``ndeconv.convert.export`` re-exports them)."""

from __future__ import annotations

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "REL_TOLERANCE"]

# torch.onnx.export(dynamo=True) writes opset 18 and later: asked for less, it silently falls back to 18.
MIN_OPSET = 18
DEFAULT_OPSET = 20
# The verification's bound: onnxruntime against PyTorch, relative to the largest output.
REL_TOLERANCE = 1e-4
