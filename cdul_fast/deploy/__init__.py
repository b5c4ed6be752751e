"""Stage 4: the trained classifier as ONNX, and ONNX Runtime prediction."""
