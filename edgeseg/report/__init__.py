"""Accuracy / memory / latency trade-off report over bit-width settings (`edgeseg report`)."""
