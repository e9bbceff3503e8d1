"""edgeseg: medical image segmentation from training to the edge.

Importing the package is cheap and torch-free: heavy stages (train, quantize,
export) import torch inside their own modules, so the device runtime never loads it.
"""

__version__ = "0.1.0"
