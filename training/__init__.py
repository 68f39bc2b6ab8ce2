"""Offline training: archived ticks -> the same features -> labels -> ONNX models in MLflow."""
