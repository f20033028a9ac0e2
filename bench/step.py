"""Per-iteration MPC cost of fine-tuning vs gradient prompt tuning vs our forward-only generation.

    secptune bench step [--policy aby3,cheetah] [--layers 2] [--seq 32] [--examples 4] [--popsize 20]
                        [--n-tokens 5] [--vocab 4096] [--check]

Side by side in one run, on the same model (SmolLM2-135M weights, first ``--layers`` layers, first
``--vocab`` rows of the tied embedding), the same policy, the same E examples of real MR text at
the same padded length, every input secret-shared, costs recorded by the ``sim`` back end:

- ``SFT``: one full fine-tuning step inside MPC: one-hot tokens -> embedding lookup (a matmul, as
  the table itself is trained), forward, CE loss over the verbalizer logits against secret one-hot
  labels, ``jax.grad`` w.r.t. every weight (tied embedding included), Adam update of all of them
  (``fixed_point_adam``: optax's Adam update, reordered for fixed point; see below). New weights
  and Adam moments are outputs that stay resident as shares.
- ``PT``: gradient prompt tuning: same loss, BBT placement (soft prompt, then text: ``score_full``),
  ``jax.grad`` w.r.t. the n x H soft prompt only, Adam on the prompt only; weights frozen.
- forward-only (ours): one generation = P candidate prompts scored on the E examples, only the
  [P, E, R] verbalizer logits opened; ``prefix`` (``score_full``, recomputed per candidate) and
  ``cached`` (``score_cached`` against a prefill done once; the prefill is reported separately).

SFT and PT: step 1 is the warm-up (and compiles), step 2 (non-zero Adam state) is measured;
forward-only: generation 1 warms up, generation 2 is measured. With ``--warmup 0`` the first run
is the measured one (ABY3 has no one-off run cost: warm-up and measured runs agree to within
the machine's noise); a small program with every op kind runs first in each session either way.
Compilation is never timed. ``--no-sft cheetah`` skips SFT under the listed policies (Cheetah:
Adam's sqrt + divide alone runs at ~1.5 ms per weight here, hours per step) and reports a lower
bound instead, clearly marked. ``--check`` compares SFT step 1 with plaintext. ``--from-json
a.json[,b.json]`` re-renders (and merges per-policy runs of one configuration) without measuring.
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from bench.common import RESULTS, tag_suffix
from bench.step_data import one_hot_labels, sft_inputs, vocab_truncated
from bench.step_drivers import (
    adam_probe,
    check_against_plaintext,
    pt_run,
    pt_setup,
    session_warmup,
    sft_run,
    sft_setup,
)
from bench.step_render import render
from bench.baselines import EPS, LOSS_SCALE, LR


def _peak_rss_gb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _timed(fn):
    t0 = time.perf_counter()
    cost = fn()
    return cost, time.perf_counter() - t0


def _summary(cost, div: int = 1) -> dict:
    from tuning.transports.cost import NETWORKS

    d = {"wall_s": cost.wall_s / div, "send_bytes": cost.send_bytes / div, "rounds": cost.rounds / div}
    d.update({f"est_{n}_s": cost.estimate(n) / div for n in NETWORKS})
    return d


def measure_policy(policy_name: str, args, task, log=print) -> dict:
    """Every method under one policy, in one sim session. Returns raw figures (JSON-ready)."""
    from bench.cache import text_of_tokens, truncated
    from spu_models.forward import embedding_table
    from tuning.data_owner.encode import verbalizer_ids
    from tuning.model_owner.models import load_model, with_policy
    from tuning.transports import make_backend
    from tuning.data_owner.scorer import SecureScorer
    from tuning.policy import load_policy

    policy = load_policy(policy_name)
    full = with_policy(load_model(args.model), policy)
    bundle = vocab_truncated(truncated(full, args.layers), args.vocab)
    cfg, n, P = bundle.config, args.n_tokens, args.popsize
    examples = [(text_of_tokens(bundle.tokenizer, t, args.seq), l) for t, l in task.train[: args.examples]]
    p0_ids = list(range(100, 100 + n))
    words = [task.verbalizer[l] for l in task.labels]
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(P, n, cfg.hidden_size)).astype(np.float32) * 0.02
    res = {"policy": policy.name, "protocol": policy.protocol, "layers": cfg.num_hidden_layers,
           "vocab": cfg.vocab_size, "full_vocab": full.config.vocab_size,
           "verbalizer_ids": verbalizer_ids(full.tokenizer, words), "methods": {}, "warm": {}, "compile_s": {}, "shapes": {}}
    t0 = time.perf_counter()
    session = make_backend("sim", bundle, policy)
    res["share_weights_s"] = time.perf_counter() - t0
    log(f"[{policy.name}] weights shared in {res['share_weights_s']:.1f}s "
        f"({cfg.num_hidden_layers} layers, vocab {cfg.vocab_size})")
    res["session_warmup"] = session_warmup(session).to_json()

    def record(name, first, first_s, measured):
        """``first``: cost of the first run (``first_s``: its call time, compile included);
        ``measured``: the run after it, or None with --warmup 0 (then the first run is measured)."""
        res["compile_s"][name] = round(first_s - first.wall_s, 2)
        if measured is None:
            measured = first
        else:
            res["warm"][name] = first.to_json()
        res["methods"][name] = measured.to_json()
        log(f"[{policy.name}] {name}: first run {first.wall_s:.1f}s, measured {measured.wall_s:.1f}s, "
            f"{measured.send_bytes / 1e6:.1f} MB, {measured.rounds} rounds (compile ~{res['compile_s'][name]:.0f}s)")

    # forward-only, both placements (--no-forward: the prefix placement's texts are shared, for PT, unscored)
    for mode in ("prefix",) if args.no_forward else ("prefix", "cached"):
        sc = SecureScorer(session, bundle, task, mode, n, p0_ids=p0_ids)
        n0 = len(session.costs)
        sc.add_examples(f"ex_{mode}", examples)
        if mode == "cached":
            setup = session.costs[n0:]
            res["prefill"] = {"wall_s": sum(c.wall_s for c in setup), "send_bytes": sum(c.send_bytes for c in setup),
                              "rounds": sum(c.rounds for c in setup),
                              "estimate_s": {k: sum(c.estimate(k) for c in setup) for k in setup[0].to_json()["estimate_s"]}}
            res["shapes"]["cached"] = {"prefix_len": session.shapes[f"ex_{mode}0_mask"][1],
                                       "tokens_per_candidate": n + session.shapes["tail"][0]}
        else:
            text_len = session.shapes["ex_prefix0_text"][1]
            res["shapes"]["prefix"] = {"text_len": text_len, "seq_len": n + text_len}
            if args.no_forward:
                continue
        t = time.perf_counter()
        sc.score(f"ex_{mode}", delta)
        first_s = time.perf_counter() - t
        first = session.costs[-1]
        if args.warmup:
            sc.score(f"ex_{mode}", delta)
        record(f"gen_{mode}", first, first_s, session.costs[-1] if args.warmup else None)

    # PT: on the prefix scorer's shared texts, prompt initialised at P0
    pt_setup(session, bundle, np.asarray(embedding_table(cfg, bundle.params))[p0_ids], one_hot_labels(task, examples))
    hp = {"lr": args.lr, "eps": args.eps, "scale": args.loss_scale}
    first, first_s = _timed(lambda: pt_run(session, cfg, "ex_prefix0", 1, **hp))
    record("pt", first, first_s, pt_run(session, cfg, "ex_prefix0", 2, **hp) if args.warmup else None)
    res["pt_loss"] = float(session.unsafe_open("pt_loss", "PT loss, a check of the step"))  # a real run keeps it

    res["peak_rss_gb"] = _peak_rss_gb()
    res["adam_probe"] = adam_probe(session, bundle, log, policy.name)  # Adam's per-weight cost (bench e2e)
    if policy.name in args.no_sft or "all" in args.no_sft:
        res["sft_skipped"] = res["adam_probe"]
        session.close()
        return res
    # SFT
    sin = sft_inputs(bundle, task, examples, n)
    res["shapes"]["sft"] = {"seq_len": sin["tokens"].shape[1], "onehot": list(sin["tokens"].shape)}
    assert sin["tokens"].shape[1] == res["shapes"]["prefix"]["text_len"], "SFT and prefix text layouts differ"
    n_leaves = sft_setup(session, bundle, sin)
    res["n_params"] = int(sum(int(np.prod(session.shapes[f"sft_p{i}"])) for i in range(n_leaves)))
    res["n_params_full_vocab"] = res["n_params"] + (res["full_vocab"] - cfg.vocab_size) * cfg.hidden_size
    first, first_s = _timed(lambda: sft_run(session, cfg, n_leaves, 1, **hp))
    if args.check:
        res["check"] = check_against_plaintext(session, bundle, policy, sin, n_leaves, hp, log)
    record("sft", first, first_s, sft_run(session, cfg, n_leaves, 2, **hp) if args.warmup else None)
    res["peak_rss_gb"] = _peak_rss_gb()
    session.close()
    del session
    gc.collect()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench step")
    ap.add_argument("--policy", default="aby3,cheetah", help="comma list of policies")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=2, help="keep only the first N layers (0: all)")
    ap.add_argument("--seq", type=int, default=32, help="text tokens per example (real MR text, repeated)")
    ap.add_argument("--examples", type=int, default=4, help="E: examples per step / generation")
    ap.add_argument("--popsize", type=int, default=20, help="P: candidates per generation")
    ap.add_argument("--n-tokens", type=int, default=5, help="soft prompt tokens")
    ap.add_argument("--vocab", type=int, default=4096,
                    help="keep the first N embedding rows (0: full vocabulary); token ids are taken mod N")
    ap.add_argument("--lr", type=float, default=LR, help="Adam learning rate (SFT and PT)")
    ap.add_argument("--eps", type=float, default=EPS, help="Adam eps (unscaled units)")
    ap.add_argument("--loss-scale", type=float, default=LOSS_SCALE, help="loss scaling for fixed-point Adam")
    ap.add_argument("--warmup", type=int, default=1, choices=[0, 1],
                    help="1: measure the run after a warm-up run; 0: measure the first run (compile excluded)")
    ap.add_argument("--no-sft", default="", type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                    help="comma list of policies (or 'all') under which the SFT step is skipped (too slow)")
    ap.add_argument("--no-forward", action="store_true",
                    help="measure SFT and PT only (bench e2e prices forward-only from bench placement)")
    ap.add_argument("--check", action="store_true",
                    help="compare SFT step 1 in MPC against plaintext (opens the new weights; not timed)")
    ap.add_argument("--tag", default="", type=tag_suffix, help="suffix of the output name")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--from-json", help="re-render the table, note and chart of a saved run (no measuring)")
    args = ap.parse_args(argv)

    if args.from_json:  # one saved run, or several (same configuration, e.g. one per policy) merged
        import json

        runs = [json.load(open(p)) for p in args.from_json.split(",")]
        keys = ("model", "layers", "seq", "examples", "popsize", "n_tokens", "vocab", "lr", "eps", "loss_scale")
        for r in runs[1:]:
            diff = [k for k in keys if r["args"].get(k) != runs[0]["args"].get(k)]
            if diff:
                raise SystemExit(f"cannot merge runs with different {', '.join(diff)}")
        out, tag = args.out, args.tag
        args = argparse.Namespace(**runs[0]["args"])
        args.out, args.tag = out, tag
        args.warmup = min(r["args"].get("warmup", 1) for r in runs)
        envs = [e for r in runs for e in (r.get("measured_environment") or [r["environment"]])]
        return render([x for r in runs for x in r["results"]], args, sum(r["total_wall_s"] for r in runs), envs)

    from tuning.data_owner.tasks import load_task

    task = load_task("mr", max_words=None)
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    t_start = time.perf_counter()
    results = []
    for pol in policies:
        t = time.perf_counter()
        results.append(measure_policy(pol, args, task, log=lambda s: print(s, flush=True)))
        results[-1]["policy_wall_s"] = time.perf_counter() - t
        if len(results) < len(policies):  # keep what is measured if a later policy fails (e.g. out of memory)
            render(results, argparse.Namespace(**{**vars(args), "tag": args.tag + "_partial"}),
                   time.perf_counter() - t_start)
    render(results, args, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
