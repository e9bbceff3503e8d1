"""Data layer: finding cases on disk, reading and validating volumes, preprocessing, phantoms.

This package imports nothing on purpose. `discovery`, `io`, `preprocess` and `phantoms` are
torch-free (numpy, scipy, nibabel, PIL) because the device runtime shares them with training;
torch-only modules (the training Dataset) live beside them, and importing one submodule must
never drag in another.
"""
