"""Benchmarks built into the package: measure methods on a GPU (or the CPU) and write VRAM comparison reports."""
