"""Tune on your own labelled CSV (or JSONL): a text column, a label column, a verbalizer map.

    python examples/tune_own_csv.py reviews.csv --label-column stars --verbalizer "good=great,bad=terrible"

Equivalent CLI: secptune tune --train reviews.csv --label-column stars --verbalizer ... --template "{text} It was"
"""
import argparse

import tuning
from tuning.data_owner.trainer import TuneConfig, tune

tuning.configure_jax()  # CPU, XLA flags, compilation cache: before JAX computes anything

ap = argparse.ArgumentParser()
ap.add_argument("train")
ap.add_argument("--test")
ap.add_argument("--text-column", default="text")
ap.add_argument("--label-column", default="label")
ap.add_argument("--verbalizer", default="positive=great,negative=terrible")
ap.add_argument("--template", default="{text}\nIt was")
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--policy", default="aby3")
ap.add_argument("--backend", default="sim")
ap.add_argument("--shots", type=int, default=4)
ap.add_argument("--budget", type=int, default=4)
ap.add_argument("--out", default="runs/example-own-csv")
a = ap.parse_args()

s = tune(TuneConfig.of(model=a.model, task=None, train=a.train, test=a.test, text_column=a.text_column,
                       label_column=a.label_column, verbalizer=a.verbalizer, template=a.template, policy=a.policy,
                       backend=a.backend, shots=a.shots, n_test=16, max_words=32, popsize=4, budget=a.budget,
                       out=a.out))
print(f"zero-shot {s['zero_shot_test_acc']:.3f} -> tuned {s['tuned_test_acc']:.3f}")
