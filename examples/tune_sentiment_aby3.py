"""Tune a soft prompt for movie-review sentiment on SmolLM2-135M, privately, under ABY3.

The model owner's weights and your examples are secret-shared among three simulated compute
parties (SPU's ABY3 protocol); only the verbalizer logits come back, to you. Prerequisite:
`secptune prepare` (or `make demo`). Small defaults so it finishes in minutes on 2 cores; raise
--budget / --shots / --popsize for accuracy.

    python examples/tune_sentiment_aby3.py --budget 4
"""
import argparse

import tuning
from tuning.data_owner.trainer import TuneConfig, tune

tuning.configure_jax()  # CPU, XLA flags, compilation cache: before JAX computes anything

ap = argparse.ArgumentParser()
ap.add_argument("--policy", default="aby3")
ap.add_argument("--backend", default="sim", choices=["plaintext", "sim", "cluster"])
ap.add_argument("--budget", type=int, default=4)
ap.add_argument("--out", default="runs/example-mr-aby3")
args = ap.parse_args()

summary = tune(TuneConfig.of(model="smollm2-135m", task="mr", policy=args.policy, backend=args.backend,
                             shots=2, n_test=8, max_words=12, popsize=4, budget=args.budget, out=args.out))
print(f"zero-shot {summary['zero_shot_test_acc']:.3f} -> tuned {summary['tuned_test_acc']:.3f}; "
      f"MPC per generation {summary['mpc']['per_generation_median']['mpc_s']:.0f}s")
