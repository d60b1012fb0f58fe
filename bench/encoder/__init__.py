"""Benchmarks of the encoder: service overhead, runtimes, the JPEG header reader."""
