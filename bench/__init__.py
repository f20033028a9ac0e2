"""Benchmarks, run through ``secptune bench NAME``; each prints a table and writes JSON + PNG to bench/results/."""
