"""ONNX scoring: sessions and providers, the MLflow model source."""
