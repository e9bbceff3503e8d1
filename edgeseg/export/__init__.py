"""Export trained and quantized models into verified bundles (`edgeseg export`, `edgeseg bundle`).

Importing `edgeseg.export.run_export` imports torch (and brevitas for quantized models);
`bundle_writer`, `third_party`, `trt_rules`, `packing`, `graph`, `cpu_form` and `trt_form` need
only `onnx`, `numpy` and onnxruntime.
"""
