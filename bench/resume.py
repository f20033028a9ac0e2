"""A resumed private run restores its set-up instead of prefilling again (issue 29).

    secptune bench resume [--backend sim] [--model smollm2-135m] [--out DIR]

Runs the demo's private job (late-layer virtual prompt, ``aby3-fast``, 1 example per class, texts
cut to 8 words) for one generation, then ``--resume`` to two, as two processes; records each
process's set-up cost (MPC bytes, rounds, seconds) and wall time, and the size of the shares the
parties kept. Target: the resumed set-up's bytes at most 5% of the first's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import markdown_table, save

JOB = ["--task", "mr", "--policy", "aby3-fast", "--prompt-form", "virtual", "--prompt-depth", "4",
       "--init", "text: Is this review positive or negative?", "--train-batch", "16", "--dev-eval", "mean",
       "--shots", "1", "--n-test", "2", "--max-words", "8", "--popsize", "4"]


def _tune(argv: list) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tuning.cli", "tune", *argv, "--json"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"tune failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench resume", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="sim", choices=["sim", "cluster"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=None, help="the run directory (default: a temporary one, deleted)")
    args = ap.parse_args(argv)
    from tuning.data_owner.rundir import RunDir

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.out or Path(tmp) / "run")
        first, w1 = _tune(["--model", args.model, "--backend", args.backend, *JOB, "--budget", "1", "--out", str(run)])
        again, w2 = _tune(["--resume", str(run), "--budget", "2"])
        state = RunDir(run).state_dir
        kept = sum(f.stat().st_size for f in state.rglob("*.share")) if state.exists() else 0
    rows = [{"process": name, "set-up MB": round(s["mpc"]["setup"]["bytes"] / 1e6, 1),
             "set-up rounds": s["mpc"]["setup"]["rounds"], "set-up s": s["mpc"]["setup"]["seconds"],
             "wall s": round(w, 1), "generations": s["generations"], "zero-shot test acc": s["zero_shot_test_acc"]}
            for name, s, w in (("first (1 generation)", first, w1), ("resumed (to 2)", again, w2))]
    ratio = again["mpc"]["setup"]["bytes"] / max(first["mpc"]["setup"]["bytes"], 1)
    table = (f"# Resume without a second prefill ({args.model}, {args.backend}, aby3-fast, virtual:4, "
             f"{first['n_train']} + {first['n_dev']} + {first['n_test']} examples)\n\n"
             + markdown_table(rows, list(rows[0]))
             + f"\nResumed set-up bytes / first: {ratio:.3f} (target <= 0.05). Shares kept on the parties' "
               f"disks: {kept / 1e6:.1f} MB in all.\n")
    save(f"resume_{args.backend}_{args.model}", {"rows": rows, "ratio": ratio, "kept_bytes": kept,
                                                 "first": first["mpc"], "resumed": again["mpc"]}, table)
