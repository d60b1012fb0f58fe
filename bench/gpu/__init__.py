"""The GPU benchmarks that bench/gpu.sh runs on a lent machine, and what they share."""
