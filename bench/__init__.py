"""Benchmarks, run through ``secptune bench NAME``; each prints a table and writes JSON + PNG to bench/results/."""
import tuning  # noqa: F401  (sets the XLA CPU flags before JAX starts)
