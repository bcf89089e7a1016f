"""pianolm.export: the torch side (models, reference decode, training, ONNX/TensorRT export)."""
