"""Quantization-aware training with brevitas (`edgeseg quantize`). Importing submodules other than
`bits` imports torch and brevitas."""
