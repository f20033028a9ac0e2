"""Where the prompt enters, and what one generation costs under MPC: input-layer vs deep prompts.

    secptune bench placement [--policy aby3] [--configs input,kv:8,kv:4,kv:2,hidden:4]
                             [--popsize 4] [--examples 2] [--layers 0]

Side by side in one run and one SPU session (the weights shared once), on the real SmolLM2-135M
(all 30 layers unless ``--layers``), the same MR examples at the task's text length and the same
initial prompt (``--init``, default the text prompt of the accuracy runs):

- ``input``: today's cached placement: the text prefilled once, prompt + tail through all L
  layers per candidate;
- ``kv:K`` / ``hidden:K``: a deep prompt in the top K layers (``secptune tune --prompt-depth K
  --prompt-form kv|hidden``): everything below them prefilled once per example.

For each, the one-off prefill of the examples and one generation of ``--popsize`` candidates x
``--examples`` examples (after a warm-up generation that compiles) are measured; a generation's
secure work is linear in its candidate x example rows, so the *per-row* cost is what is compared
(``--check-linear`` measures twice the candidates to show it). From it, one generation of the standard
job (popsize 20 + the mean, 16-shot MR: 32 train + 32 dev) is derived for each placement, with
the row counts of ``--job``: ``all`` (every candidate on all 64 examples, today) and
``batch16-mean`` (``--train-batch 16 --dev-eval mean``: 21 x 16 + 32 rows). The table states that
these are derived from measured per-row costs, not measured generations.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix

INIT = "text: Is this review positive or negative?"
JOBS = {"all": dict(train_batch=0, dev_eval="all"), "batch16-mean": dict(train_batch=16, dev_eval="mean")}


def _merge_ops(costs) -> dict:
    """One per-op table (count, seconds, bytes) over several calls."""
    out: dict = {}
    for c in costs:
        for k, v in (c.ops or {}).items():
            o = out.setdefault(k, {"count": 0, "seconds": 0.0, "send_bytes": 0})
            for f in o:
                o[f] += v.get(f, 0)
    return out


def parse_configs(text: str, layers: int) -> list[tuple[str, int]]:
    out = []
    for c in [c.strip() for c in text.split(",") if c.strip()]:
        if c == "input":
            out.append(("input", layers))
            continue
        form, _, k = c.partition(":")
        if form not in ("kv", "hidden", "virtual") or not k.isdigit() or not 1 <= int(k) < layers:
            raise ValueError(f"--configs: {c!r} is not input, kv:K, hidden:K or virtual:K with 1 <= K < {layers}")
        out.append((form, int(k)))
    if not out:
        raise ValueError("--configs is empty")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench placement")
    ap.add_argument("--policy", default="aby3")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=0, help="first N layers only (0: all)")
    ap.add_argument("--configs", default="input,kv:8,kv:4,kv:2,hidden:4")
    ap.add_argument("--popsize", type=int, default=4)
    ap.add_argument("--examples", type=int, default=2)
    ap.add_argument("--check-linear", action="store_true", help="also measure 2x the candidates per placement")
    ap.add_argument("--init", default=INIT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", type=tag_suffix)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from bench.cache import truncated
    from tuning.model_owner.models import load_model, with_policy
    from tuning.data_owner.tasks import kshot, load_task
    from tuning.transports import make_backend
    from tuning.transports.cost import top_ops
    from tuning.data_owner.scorer import SecureScorer, delta_shape
    from tuning.data_owner.report import FULL_BUDGET, rows_per_generation
    from tuning.policy import load_policy

    policy = load_policy(args.policy)
    bundle = truncated(with_policy(load_model(args.model), policy), args.layers)
    cfg = bundle.config
    L = cfg.num_hidden_layers
    configs = parse_configs(args.configs, L)
    task = load_task("mr")
    sizes = [args.popsize] + ([2 * args.popsize] if args.check_linear else [])
    examples = kshot(task.train, args.examples, args.seed, task.labels)
    p0 = list(bundle.tokenizer(args.init[len("text:"):], add_special_tokens=False)["input_ids"])
    rng = np.random.default_rng(args.seed)
    k = FULL_BUDGET["shots_per_class"] * len(task.labels)
    job_rows = {j: rows_per_generation(FULL_BUDGET["popsize"], k, k, **kw) for j, kw in JOBS.items()}
    rows, ops = [], {}
    session = make_backend("sim", bundle, policy)
    try:
        for form, depth in configs:
            name = "input" if form == "input" else f"{form}:{depth}"
            sc = SecureScorer(session, bundle, task, "cached", len(p0), p0_ids=p0, depth=depth,
                              form="kv" if form == "input" else form)
            set_name = name.replace(":", "")
            n0 = len(session.costs)
            sc.add_examples(set_name, examples, groups=[list(range(args.examples))])
            setup = session.costs[n0:]
            for P in sizes:
                delta = 0.3 * rng.normal(size=(P, *delta_shape(cfg, len(p0), depth, sc.form)))
                sc.score(set_name, delta)  # compile + warm-up
                sc.score(set_name, delta)
                gen = session.costs[-1]
                n_rows = P * args.examples
                row = {"placement": name, "depth K": depth, "rows (P x E)": f"{P} x {args.examples}",
                       "gen s": round(gen.wall_s, 2), "gen MB": round(gen.send_bytes / 1e6, 2), "gen rounds": gen.rounds,
                       "s / row": round(gen.wall_s / n_rows, 3), "MB / row": round(gen.send_bytes / 1e6 / n_rows, 3),
                       "prefill s / example": round(sum(c.wall_s for c in setup) / args.examples, 1),
                       "prefill MB / example": round(sum(c.send_bytes for c in setup) / 1e6 / args.examples, 1)}
                rows.append(row)
                ops[name] = {"generation": dict(top_ops(gen.ops, 8)), "prefill": dict(top_ops(_merge_ops(setup), 8))}
                print(row, flush=True)
            sc.drop_examples(set_name)
    finally:
        session.close()
    first = f"{args.popsize} x {args.examples}"
    base = next((r for r in rows if r["placement"] == "input" and r["rows (P x E)"] == first), None)
    derived = []
    for r in rows:
        if r["rows (P x E)"] != first:
            continue
        for job, n in job_rows.items():
            if r["placement"] == "input" and job != "all":
                continue
            d = {"placement": r["placement"], "job rows": f"{job} ({n})", "derived gen s": round(r["s / row"] * n, 1),
                 "derived gen MB": round(r["MB / row"] * n, 1)}
            if base is not None:
                d["x fewer bytes than input/all"] = round(base["MB / row"] * job_rows["all"] / (r["MB / row"] * n), 1)
                d["x less time than input/all"] = round(base["s / row"] * job_rows["all"] / (r["s / row"] * n), 1)
            derived.append(d)
    cols = list(rows[0])
    table = markdown_table(rows, cols)
    table += "\n" + markdown_table(derived, list(derived[0]))
    table += (f"\n{args.model}, {L} layers, policy {policy.name} ({policy.protocol}), SPU simulator (party 0's "
              f"traffic); MR examples at the task's text length; P0 = {args.init!r} ({len(p0)} tokens). Measured: "
              f"one generation of {args.popsize} candidates per example count, after a warm-up generation, and the "
              f"one-off prefill. Derived (second table): a generation of the standard job (popsize "
              f"{FULL_BUDGET['popsize']} + mean, {FULL_BUDGET['shots_per_class']}-shot MR) = measured per-row cost x "
              f"its rows: 'all' = 21 x 64, 'batch16-mean' = 21 x 16 train + 32 dev (the mean only).\n")
    name = f"placement_{policy.name}{args.tag}"
    save(name, {"rows": rows, "derived": derived, "job_rows": job_rows, "top_ops": ops, "args": vars(args)}, table,
         args.out)
    _plot(rows, derived, f"{args.out}/{name}.png")


def _plot(rows, derived, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    labels = [f"{d['placement']}\n{d['job rows'].split(' ')[0]}" for d in derived]
    ax[0].bar(labels, [d["derived gen s"] for d in derived], color="C0")
    ax[1].bar(labels, [d["derived gen MB"] / 1e3 for d in derived], color="C1")
    ax[0].set(ylabel="seconds per generation (derived)", yscale="log")
    ax[1].set(ylabel="GB per generation (derived)", yscale="log")
    for a in ax:
        a.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
