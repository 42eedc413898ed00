"""Inference backends: each has a builder (ONNX file -> engine file) and a Runner."""
