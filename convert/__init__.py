"""Deployment: fold deconvolution into plain conv weights, export ONNX, convert the authors' checkpoints.

``fold(model)`` gives an inference-only plain CNN computing the model's eval outputs: every deconvolution layer
replaced by its own ``fuse()`` (``fuse_deconv_layers``, the walk timm's ``reparameterize_model`` makes), checked
against the unfolded model, with BatchNorm fusion as an opt-in pass (``fuse_batchnorm=True``, ``fuse_batchnorms``).
A folded zoo model is the architecture ``timm.create_model(name, folded=True)`` builds; ``save_folded`` /
``load_folded`` store it as one safetensors file whose metadata names it and its model_args
(``read_folded_config``). ``export_onnx`` / ``verify_onnx`` write and check a self-contained ONNX file;
``export_int8`` / ``quantize_onnx`` quantize one to int8 with onnxruntime.
"""

from __future__ import annotations

from .export import ExportResult, VerifyResult, export_onnx, onnx_op_types, verify_onnx, verify_onnx_for_model
from .fold import (
    FoldReport,
    FoldWarning,
    default_example_input,
    fold,
    fold_with_report,
    fuse_batchnorms,
    fuse_deconv_layers,
    model_input_size,
    output_difference,
)
from .folded_io import is_folded_file, load_folded, read_folded_config, save_folded
from .quantize import export_int8, quantize_onnx

__all__ = [
    "ExportResult",
    "FoldReport",
    "FoldWarning",
    "VerifyResult",
    "default_example_input",
    "export_int8",
    "export_onnx",
    "fold",
    "fold_with_report",
    "fuse_batchnorms",
    "fuse_deconv_layers",
    "is_folded_file",
    "load_folded",
    "model_input_size",
    "onnx_op_types",
    "output_difference",
    "quantize_onnx",
    "read_folded_config",
    "save_folded",
    "verify_onnx",
    "verify_onnx_for_model",
]
