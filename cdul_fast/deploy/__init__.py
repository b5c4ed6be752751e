"""Stage 4: the trained classifier as ONNX, ONNX Runtime prediction, and per-image tags from a label store."""
