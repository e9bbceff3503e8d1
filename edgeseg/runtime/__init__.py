"""The device runtime: torch-free (numpy, nibabel, onnxruntime; TensorRT where present)."""
