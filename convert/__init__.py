"""Deployment: fold deconvolution into plain conv weights, export ONNX, convert the authors' checkpoints."""
