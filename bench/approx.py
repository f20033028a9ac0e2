"""Per-element MPC cost and error of every named approximation of a non-linear op.

    secptune bench approx [--policy aby3] [--elements 16384]

Side by side in one SPU session: each approximation (``spu_models.approx``) runs once on
``--elements`` secret values drawn from the range the real model feeds it, after a warm-up call;
the table gives time, bytes and send actions per element, and the max error against the exact
function over that range (in plaintext, float64 reference). Inputs: SiLU on SmolLM2's measured
gate pre-activations (mostly |x| < 8, tails to |x| ~ 50, see ``tests/test_approx.py``), exp on
[-14, 0] (softmax after the max subtraction), GeLU on [-6, 6].
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix


def cases(n: int, seed: int = 0):
    import jax.numpy as jnp

    from spu_models import approx

    rng = np.random.default_rng(seed)
    gate = np.concatenate([rng.normal(0, 2.0, n - n // 64), rng.uniform(-50, 50, n // 64)]).astype(np.float32)
    neg = rng.uniform(-14, 0, n).astype(np.float32)
    g = rng.uniform(-6, 6, n).astype(np.float32)
    ref_silu = lambda x: x / (1 + np.exp(-x.astype(np.float64)))  # noqa: E731
    from scipy.special import erf

    ref_gelu = lambda x: 0.5 * x * (1 + erf(x.astype(np.float64) / np.sqrt(2)))  # noqa: E731
    out = [(f"silu {m}", (lambda m: lambda x: approx.silu(x, m))(m), gate, ref_silu) for m in approx.SILU_MODES]
    out += [("exp exact", jnp.exp, neg, np.exp), ("exp limit", approx.exp_limit, neg, np.exp)]
    out += [(f"gelu {m}", (lambda m: lambda x: approx.gelu(x, m))(m), g, ref_gelu) for m in approx.GELU_MODES]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench approx")
    ap.add_argument("--policy", default="aby3")
    ap.add_argument("--elements", type=int, default=16384)
    ap.add_argument("--tag", default="", type=tag_suffix)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import jax

    from tuning.model_owner.models import load_model, with_policy
    from tuning.transports import make_backend
    from tuning.policy import load_policy

    policy = load_policy(args.policy)
    bundle = with_policy(load_model("tiny-llama"), policy)  # the session needs some weights; unused here
    rows = []
    session = make_backend("sim", bundle, policy)
    try:
        for name, fn, x, ref in cases(args.elements):
            session.put("x", x)
            prog = lambda params, x, fn=fn: {"y": fn(x)}  # noqa: E731
            session.run(prog, {"x": "x"}, {"y": "y"}, key=name)  # warm-up (and compile)
            c = session.run(prog, {"x": "x"}, {"y": "y"}, key=name)
            got = session.unsafe_open("y", "approximation error check")
            plain = np.asarray(jax.jit(fn)(x), np.float64)
            n = len(x)
            rows.append({"op": name, "us / element": round(1e6 * c.wall_s / n, 2),
                         "bytes / element": round(c.send_bytes / n, 1), "send actions": c.rounds,
                         "max error (formula)": float(f"{np.abs(plain - ref(x)).max():.2e}"),
                         "max error under MPC": float(f"{np.abs(got - ref(x)).max():.2e}")})
            print(rows[-1], flush=True)
            session.drop("x", "y")
    finally:
        session.close()
    table = markdown_table(rows, list(rows[0]))
    table += (f"\nPolicy {policy.name} ({policy.protocol}, {policy.field}, {policy.fxp_fraction_bits} fraction bits), "
              f"SPU simulator, party 0's traffic, {args.elements} elements per call, one call after a warm-up. "
              "Errors against a float64 reference on the same inputs: the formula in plaintext float32, and the "
              "opened MPC result (fixed point included).\n")
    save(f"approx_{policy.name}{args.tag}", {"rows": rows, "args": vars(args)}, table, args.out)
