"""Benchmarks, run through ``secptune bench NAME``; each prints a table and writes JSON + MD + PNG
to bench/results/. ``BENCHES`` is the one registry of them (the CLI reads it)."""
from __future__ import annotations

import importlib

BENCHES = {
    "forward": "bench.forward_real", "cache": "bench.cache", "accuracy": "bench.tune_accuracy",
    "agreement": "bench.agreement", "attention": "bench.attention", "step": "bench.step", "swap": "bench.swap",
    "compare": "bench.compare", "placement": "bench.placement", "approx": "bench.approx", "e2e": "bench.e2e",
    "job": "bench.job", "sfjob": "bench.sfjob", "heads": "bench.heads", "fewshot": "bench.fewshot",
    "compile": "bench.compile", "resume": "bench.resume", "checks": "bench.checks", "setup": "bench.setup_cost",
}


def run(name: str, argv: list) -> None:
    """Run benchmark ``name`` with its own command-line arguments."""
    if name not in BENCHES:
        from tuning.errors import UserError

        raise UserError(f"unknown benchmark {name!r} (known: {', '.join(BENCHES)})")
    importlib.import_module(BENCHES[name]).main(argv)
