"""Benchmarks and the trace simulator: see bench/README.md."""
