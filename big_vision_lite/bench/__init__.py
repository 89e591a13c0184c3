"""Benchmarks that time our JAX side and its PyTorch peer on the same weights in one run."""
