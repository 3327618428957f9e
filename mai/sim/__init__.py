"""Simulated hardware and servers: the GPU ledger and wire-faithful doubles used by tests and `mai demo`."""
