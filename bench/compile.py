"""Compile time of the tuning programs: layer runs scanned against unrolled, for XLA (the plaintext
back end) and for SPU, side by side in one run (issue 29).

    secptune bench compile [--layers 30] [--programs prefill_deep,score_deep] [--no-tune]

Each compile runs in a fresh process with no compilation cache, at SmolLM2-135M's shapes (the
weights' shapes only: nothing is loaded), the shipped deep placement (virtual prompt in the top 4
layers), 16 examples of 64 tokens and 20 candidates. ``--no-tune`` leaves out the end-to-end
check: the smallest plaintext tuning run (the demo's configuration, 1 example per class, 1
generation of 2 candidates) from an empty compile cache, whose target is 120 s.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from bench.common import markdown_table, save

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
               hidden_act="silu")
E, LP, TAIL, POP, DEPTH = 16, 64, 8, 20, 4


def compile_once(backend: str, scan: bool, program: str, layers: int) -> dict:
    """Compile ``program`` once here (call in a fresh process): seconds and program size."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from spu_models.forward import make_tuning_programs
    from spu_models.llama import LlamaConfig, init_params
    from tuning.policy import load_policy

    ex = dataclasses.replace(load_policy("aby3-fast").execution, scan_layers=scan)
    cfg = LlamaConfig(num_hidden_layers=layers, **SMOLLM2)
    shapes = jax.eval_shape(lambda: init_params(cfg, 0, 4, ex))
    progs = make_tuning_programs(cfg, ex, depth=DEPTH, form="virtual")
    H, KV, D = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim
    if program == "prefill_deep":
        args = dict(text=(E, LP, H), text_mask=(E, LP), tail=(TAIL, H), head=(2, H))
    else:
        args = dict(head=(2, H), text_mask=(E, LP), deep_h=(E, TAIL, H), delta=(POP, DEPTH, 2, 5, KV, D),
                    deep_scale=(DEPTH, 2, KV, D))
        args.update({f"cache_{kv}{i}": (E, LP, KV, D) for i in progs["top"] for kv in "kv"})
    fn = progs[program]
    t0 = time.perf_counter()
    if backend == "xla":
        specs = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in args.items()}
        size = len(jax.jit(lambda p, a: fn(p, **a)).lower(shapes, specs).compile().as_text())
    else:
        from tuning.programs import compile_session_program

        outs = list(jax.eval_shape(lambda p, a: fn(p, **a), shapes,
                                   {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in args.items()}))
        params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)
        size = len(compile_session_program(fn, params, args, outs).code)
    return {"compile_s": round(time.perf_counter() - t0, 1), "program_kB": size // 1000}


def _fresh(backend, scan, program, layers) -> dict:
    code = ("import json, sys, tuning; tuning.configure_jax(False)\n"
            "from bench.compile import compile_once\n"
            f"print('RESULT ' + json.dumps(compile_once({backend!r}, {scan!r}, {program!r}, {layers})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"compile of {program} ({backend}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[0][7:])


def smallest_tune() -> dict:
    """The smallest plaintext tuning run of the demo's configuration, from an empty compile cache."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys, tuning\n"
                f"orig = tuning.configure_jax; tuning.configure_jax = lambda cache_dir=None: orig({tmp + '/cache'!r})\n"
                "from tuning.cli import main\nsys.exit(main(sys.argv[1:]))\n")
        argv = ["tune", "--task", "mr", "--model", "smollm2-135m", "--policy", "aby3-fast", "--backend", "plaintext",
                "--prompt-form", "virtual", "--prompt-depth", "4", "--init", "text: Is this review positive or negative?",
                "--train-batch", "16", "--dev-eval", "mean", "--shots", "1", "--n-test", "2", "--popsize", "2",
                "--budget", "1", "--out", f"{tmp}/run"]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"the smallest tuning run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": round(wall, 1), "target_s": 120, "slow_compile_alarms": proc.stderr.count("Very slow compile")}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--programs", default="prefill_deep,score_deep")
    ap.add_argument("--no-tune", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for program in args.programs.split(","):
        for backend in ("xla", "spu"):
            r = {"program": program, "backend": backend}
            for scan in (True, False):
                res = _fresh(backend, scan, program, args.layers)
                tag = "scanned" if scan else "unrolled"
                r.update({f"{tag} s": res["compile_s"], f"{tag} kB": res["program_kB"]})
                print(f"{program} {backend} {tag}: {res}", flush=True)
            r["speed-up"] = round(r["unrolled s"] / max(r["scanned s"], 0.1), 1)
            rows.append(r)
    tune = None if args.no_tune else smallest_tune()
    cols = ["program", "backend", "scanned s", "unrolled s", "speed-up", "scanned kB", "unrolled kB"]
    table = (f"# Compile time, {args.layers} layers (SmolLM2-135M shapes; virtual prompt in the top {DEPTH}; "
             f"{E} examples x {LP} tokens, {POP} candidates; fresh process, no cache)\n\n"
             + markdown_table(rows, cols)
             + ("" if tune is None else f"\nSmallest plaintext tuning run from an empty compile cache: "
                f"{tune['wall_s']} s (target {tune['target_s']} s), {tune['slow_compile_alarms']} slow-compile alarms.\n")
             + "\nThe plaintext back end runs layer runs scanned; SPU runs them unrolled (a scan would "
               "stack, i.e. copy, every weight share).\n")
    save(f"compile_{args.layers}l", {"layers": args.layers, "rows": rows, "smallest_tune": tune}, table)
