"""Prefix-state caching: per-generation MPC cost against text length, with and without the cache.

    secptune bench cache [--policy aby3] [--layers 2] [--lengths 32,64,128,256] [--popsize 4] [--examples 2]

Same model (SmolLM2-135M weights, first ``--layers`` layers; state it when quoting), same policy,
same population and examples, side by side in one run. ``cached`` = text -> prompt -> tail with
the text's KV prefilled once (its one-off cost is reported separately); ``prefix`` = BBT's
prompt -> text, recomputed for every candidate. Real MR review text, repeated to reach the length.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix


def truncated(bundle, layers: int):
    if not layers or layers >= bundle.config.num_hidden_layers:
        return bundle
    cfg = dataclasses.replace(bundle.config, num_hidden_layers=layers)
    m = bundle.params["model"]
    params = {**bundle.params, "model": {**m, "layers": {str(i): m["layers"][str(i)] for i in range(layers)}}}
    return dataclasses.replace(bundle, config=cfg, params=params)


def text_of_tokens(tok, base: str, n: int) -> str:
    """A real text whose tokenization is about ``n`` tokens (repeating ``base``)."""
    words, out = base.split(), []
    while len(tok(" ".join(out), add_special_tokens=False)["input_ids"]) < n:
        out.append(words[len(out) % len(words)])
    return " ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench cache")
    ap.add_argument("--policy", default="aby3")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lengths", default="32,64,128,256")
    ap.add_argument("--popsize", type=int, default=4)
    ap.add_argument("--examples", type=int, default=2)
    ap.add_argument("--n-tokens", type=int, default=5)
    ap.add_argument("--tag", default="", type=tag_suffix, help="suffix of the result files")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from tuning.model_owner.models import load_model, with_policy
    from tuning.data_owner.tasks import load_task
    from tuning.transports import make_backend
    from tuning.data_owner.scorer import SecureScorer
    from tuning.policy import load_policy

    policy = load_policy(args.policy)
    bundle = truncated(with_policy(load_model(args.model), policy), args.layers)
    task = load_task("mr", max_words=None)
    base = " ".join(t for t, _ in task.train[:20])
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(args.popsize, args.n_tokens, bundle.config.hidden_size)).astype(np.float32) * 0.02
    rows = []
    session = make_backend("sim", bundle, policy)
    for L in [int(x) for x in args.lengths.split(",")]:
        text = text_of_tokens(bundle.tokenizer, base, L)
        examples = [(text, task.labels[i % len(task.labels)]) for i in range(args.examples)]
        for mode in ("cached", "prefix"):
            sc = SecureScorer(session, bundle, task, mode, args.n_tokens, p0_ids=list(range(100, 100 + args.n_tokens)))
            n0 = len(session.costs)
            sc.add_examples(f"L{L}{mode}", examples)
            setup = session.costs[n0:]
            sc.score(f"L{L}{mode}", delta)  # compile + warm
            sc.score(f"L{L}{mode}", delta)
            gen = session.costs[-1]
            rows.append({"text tokens": L, "placement": mode, "gen wall s": round(gen.wall_s, 2),
                         "gen MB (busiest party)": round(gen.send_bytes / 1e6, 2), "gen rounds": gen.rounds,
                         "one-off prefill s": round(sum(c.wall_s for c in setup), 2),
                         "one-off prefill MB": round(sum(c.send_bytes for c in setup) / 1e6, 2)})
            print(rows[-1], flush=True)
    for L in sorted({r["text tokens"] for r in rows}):
        c, p = [r for r in rows if r["text tokens"] == L]
        c["prefix/cached time"] = round(p["gen wall s"] / max(c["gen wall s"], 1e-9), 2)
        c["prefix/cached MB"] = round(p["gen MB (busiest party)"] / max(c["gen MB (busiest party)"], 1e-9), 2)
    cols = ["text tokens", "placement", "gen wall s", "gen MB (busiest party)", "gen rounds", "one-off prefill s",
            "one-off prefill MB", "prefix/cached time", "prefix/cached MB"]
    note = (f"\n{args.model}, first {bundle.config.num_hidden_layers} layers, policy {policy.name} "
            f"({policy.protocol}), population {args.popsize} x {args.examples} examples, {args.n_tokens} prompt tokens. "
            "Per-generation figures are one call after a warm-up call.\n")
    name = f"cache_{policy.name}{args.tag}"
    save(name, {"rows": rows, "args": vars(args)}, markdown_table(rows, cols) + note, args.out)
    _plot(rows, f"{args.out}/{name}.png")
    session.close()


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.3))
    for mode in ("cached", "prefix"):
        r = [x for x in rows if x["placement"] == mode]
        ax[0].plot([x["text tokens"] for x in r], [x["gen wall s"] for x in r], "o-", label=mode)
        ax[1].plot([x["text tokens"] for x in r], [x["gen MB (busiest party)"] for x in r], "o-", label=mode)
    ax[0].set(xlabel="text tokens", ylabel="seconds per generation", xscale="log", yscale="log")
    ax[1].set(xlabel="text tokens", ylabel="MB per generation (busiest party)", xscale="log", yscale="log")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
