"""Real SmolLM2-135M-Instruct, one short MR input, secure forward in SPU's simulator vs plaintext.

    secptune bench forward [--policy aby3] [--words 16] [--layers 30] [--n 1]

Records wall time, bytes and rounds (busiest party), the LAN/WAN estimates, the top ops (party 0), and the
agreement of the opened verbalizer logits with the plaintext back end on the same inputs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import RESULTS, markdown_table, save


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench forward")
    ap.add_argument("--policy", default="aby3")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="mr")
    ap.add_argument("--n", type=int, default=1, help="test examples in the batch")
    ap.add_argument("--words", type=int, default=16, help="truncate each text to this many words")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from bench.cache import truncated
    from tuning.backends import make_backend
    from tuning.cost import NETWORKS, top_ops
    from tuning.encode import make_batch
    from tuning.models import load_model, with_policy
    from tuning.policy import load_policy
    from tuning.tasks import load_task, truncate_words

    policy = load_policy(args.policy)
    bundle = truncated(with_policy(load_model(args.model), policy), args.layers)
    task = load_task(args.task)
    texts = [truncate_words(t, args.words) for t, _ in task.test[: args.n]]
    prompts = [task.prompt(t) for t in texts]
    words = [task.verbalizer[l] for l in task.labels]
    batch = make_batch(bundle, prompts, words, policy.embedding)
    L = batch["select"].shape[1]
    print(f"{args.model}: {bundle.config.num_hidden_layers} layers, batch {args.n} x {L} tokens, policy {policy.name}")

    plain = make_backend("plaintext", bundle, policy)
    want = plain.forward(batch)
    t0 = time.perf_counter()
    sim = make_backend("sim", bundle, policy)
    setup_s = time.perf_counter() - t0
    got = sim.forward(batch)
    cost = sim.costs[-1]
    err = float(np.abs(got - want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    row = {"model": args.model, "layers": bundle.config.num_hidden_layers, "policy": policy.name,
           "protocol": policy.protocol, "batch": args.n, "seq_len": L, "setup_s (share weights)": round(setup_s, 1),
           "wall_s": round(cost.wall_s, 1), "MB sent (busiest party)": round(cost.send_bytes / 1e6, 1),
           "rounds": cost.rounds, "max abs logit err": f"{err:.2e}", "argmax agree": agree}
    row.update({f"est {n} s": round(cost.estimate(n), 1) for n in NETWORKS})
    table = markdown_table([row], list(row))
    ops = [{"op": k, "count": v["count"], "seconds": round(v["seconds"], 2), "MB sent": round(v["send_bytes"] / 1e6, 2)}
           for k, v in top_ops(cost.ops, 10)]
    table += "\nTop ops (party 0):\n\n" + markdown_table(ops, ["op", "count", "seconds", "MB sent"])
    name = f"forward_real_{policy.name}"
    save(name, {"row": row, "prompts": prompts, "words": words, "plaintext_logits": want.tolist(),
                "spu_logits": got.tolist(), "cost": cost.to_json()}, table, args.out)
    _plot(ops, f"{args.out}/{name}.png", f"{args.model} under {policy.name}: time per op (party 0)")
    sim.close()


def _plot(ops, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([o["op"] for o in ops][::-1], [o["seconds"] for o in ops][::-1])
    ax.set_xlabel("seconds")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
