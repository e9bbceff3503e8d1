"""Training (PyTorch). Importing this package imports torch; the runtime never does."""
