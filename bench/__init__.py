"""Benchmarks: each prints figures measured side by side in one run (ours vs a baseline)."""
