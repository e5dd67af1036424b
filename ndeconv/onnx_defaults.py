"""The ONNX export's fixed settings, torch-free so that ``ndeconv export --help`` can print them without loading the
exporter (``ndeconv.convert.export`` re-exports them)."""

from __future__ import annotations

__all__ = [
    "AUTO_CALIBRATION_METHODS", "CALIBRATION_METHODS", "DEFAULT_CALIBRATION_IMAGES", "DEFAULT_CALIBRATION_METHOD",
    "DEFAULT_OPSET",
    "DEFAULT_SELECTION_IMAGES", "MIN_CALIBRATION_IMAGES", "MIN_OPSET", "REL_TOLERANCE",
]

# torch.onnx.export(dynamo=True) writes opset 18 and later: asked for less, it silently falls back to 18.
MIN_OPSET = 18
DEFAULT_OPSET = 20
# The verification's bound: onnxruntime against PyTorch, relative to the largest output.
REL_TOLERANCE = 1e-4

# Int8 (``ndeconv export --int8``): how activation ranges are calibrated, on how many training images by default,
# and the fewest accepted: fewer calibrate the ranges on too little of the data to mean anything (one batch of a
# single class could set them), so they are refused rather than quietly written.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "auto")
DEFAULT_CALIBRATION_IMAGES = 512
MIN_CALIBRATION_IMAGES = 32
# ``auto`` quantizes with each of these and keeps the one whose int8 file agrees best with the float32 file on
# DEFAULT_SELECTION_IMAGES further training images (neither calibration nor test images). Neither method is the
# better one for every network: minmax keeps rare large activations in range, percentile spends int8's steps on
# the bulk of the distribution.
AUTO_CALIBRATION_METHODS = ("minmax", "percentile")
DEFAULT_CALIBRATION_METHOD = "auto"
DEFAULT_SELECTION_IMAGES = 1000
