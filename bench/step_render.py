"""``bench step``: its tables (per method, and the ratios between methods) and plot."""
from __future__ import annotations

import numpy as np

from bench.common import markdown_table, save

METHOD_ROWS = [  # (key, label, what one iteration is, divide by P)
    ("sft", "SFT step", "1 Adam step, all weights, E examples", False),
    ("pt", "PT step (prefix)", "1 Adam step, prompt only, E examples", False),
    ("gen_prefix", "forward-only prefix: generation", "P candidates x E examples", False),
    ("gen_prefix", "forward-only prefix: per candidate", "generation / P", True),
    ("gen_cached", "forward-only cached: generation", "P candidates x E examples", False),
    ("gen_cached", "forward-only cached: per candidate", "generation / P", True),
]


def build_rows(results: list, P: int) -> list:
    from tuning.transports.cost import NETWORKS

    rows = []
    for r in results:
        if "sft_skipped" in r:
            sk = r["sft_skipped"]
            rows.append({"policy": r["policy"], "method": "SFT step: NOT RUN, lower bound",
                         "one iteration": "Adam sqrt+divide only, probed, scaled to all weights",
                         "wall s": ">= " + _fmt(sk["lower_bound_wall_s"]),
                         "MB (busiest party)": ">= " + _fmt(sk["lower_bound_send_bytes"] / 1e6)})
        for key, label, what, per in METHOD_ROWS:
            if key not in r["methods"]:
                continue
            c = r["methods"][key]
            div = P if per else 1
            row = {"policy": r["policy"], "method": label, "one iteration": what,
                   "wall s": _fmt(c["wall_s"] / div), "MB (busiest party)": _fmt(c["send_bytes"] / 1e6 / div),
                   "rounds": _fmt(c["rounds"] / div)}
            row.update({f"{n} s": _fmt(c["estimate_s"][n] / div) for n in NETWORKS})
            rows.append(row)
        pf = r.get("prefill")  # absent under --no-forward
        if pf is None:
            continue
        row = {"policy": r["policy"], "method": "cached: one-off prefill", "one iteration": "once per example set",
               "wall s": _fmt(pf["wall_s"]), "MB (busiest party)": _fmt(pf["send_bytes"] / 1e6),
               "rounds": _fmt(pf["rounds"])}
        row.update({f"{n} s": _fmt(pf["estimate_s"][n]) for n in NETWORKS})
        rows.append(row)
    return rows


def build_ratios(results: list, P: int) -> list:
    rows = []
    for r in results:
        m = r["methods"]
        if "sft_skipped" in r:
            sk, row = r["sft_skipped"], {"policy": r["policy"], "method": "SFT step (lower bound, not run)"}
            for ref in ("cached", "prefix"):
                g = m[f"gen_{ref}"]
                for unit, div in (("gen", 1), ("cand", P)):
                    row[f"time / {ref} {unit}"] = ">= " + _fmt(sk["lower_bound_wall_s"] / (g["wall_s"] / div))
                    row[f"MB / {ref} {unit}"] = ">= " + _fmt(sk["lower_bound_send_bytes"] / (g["send_bytes"] / div))
            rows.append(row)
        for key, label in (("sft", "SFT step"), ("pt", "PT step")):
            if key not in m:
                continue
            row = {"policy": r["policy"], "method": label}
            for ref in ("cached", "prefix"):
                if f"gen_{ref}" not in m:  # --no-forward
                    continue
                g = m[f"gen_{ref}"]
                for unit, div in (("gen", 1), ("cand", P)):
                    row[f"time / {ref} {unit}"] = _fmt(m[key]["wall_s"] / (g["wall_s"] / div))
                    row[f"MB / {ref} {unit}"] = _fmt(m[key]["send_bytes"] / (g["send_bytes"] / div))
                    row[f"WAN-100 / {ref} {unit}"] = _fmt(m[key]["estimate_s"]["wan-100mbps"]
                                                         / (g["estimate_s"]["wan-100mbps"] / div))
            rows.append(row)
    return rows


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01:
        return f"{x:.2f}"
    return f"{x:.2g}"


def render(results: list, args, total: float, environment=None):
    """Table (markdown), note, JSON and chart of measured ``results``."""
    policies = [r["policy"] for r in results]
    r0 = results[0]
    rows = build_rows(results, args.popsize)
    ratios = build_ratios(results, args.popsize)
    cols = ["policy", "method", "one iteration", "wall s", "MB (busiest party)", "rounds", "lan s",
            "wan-100mbps s", "wan-200mbps s"]
    rcols = ["policy", "method"] + [f"{q} / {ref} {u}" for ref in ("cached", "prefix") for u in ("gen", "cand")
                                    for q in ("time", "MB", "WAN-100")]
    sh = r0["shapes"]
    ids = "/".join(map(str, r0["verbalizer_ids"]))
    if r0["vocab"] >= r0["full_vocab"]:
        vocab_note = f"the full {r0['vocab']}-row vocabulary"
    else:
        vocab_note = (f"only the first {r0['vocab']} rows of the tied {r0['full_vocab']}-row embedding (token ids "
                      f"taken mod {r0['vocab']}; the verbalizer ids {ids} are "
                      + ("in range, unchanged)" if max(r0["verbalizer_ids"]) < r0["vocab"] else "remapped too)"))
        if "n_params_full_vocab" in r0 and "sft" in r0["methods"]:
            nf = r0["n_params_full_vocab"]
            ops = r0["methods"]["sft"]["ops"]
            adam_s = sum(ops.get(k, {}).get("seconds", 0.0) for k in ("pphlo.sqrt", "pphlo.divide"))
            table = r0["full_vocab"] * (nf - r0["n_params"]) // (r0["full_vocab"] - r0["vocab"])  # V x H
            share_b = {"ABY3": 48, "SEMI2K": 16, "CHEETAH": 16}.get(r0["protocol"], 16)  # all parties, per value
            vocab_note += (f". With the full table SFT would train {nf / 1e6:.1f}M weights instead of "
                           f"{r0['n_params'] / 1e6:.1f}M: 4 resident shared copies (weights, trained copy, 2 Adam "
                           f"moments) alone are ~{4 * nf * share_b / 1e9:.1f} GB under {r0['protocol']}, before the "
                           f"update's sqrt/divide temporaries over the {table / 1e6:.1f}M-element table (peak RSS of this run: "
                           f"{r0.get('peak_rss_gb', float('nan')):.1f} GB), more than this machine has free next to the "
                           f"other jobs; and Adam's sqrt + divide ran at {adam_s / r0['n_params'] * 1e6:.0f} us per "
                           f"weight here: ~{adam_s / r0['n_params'] * nf / 60:.0f} min per step for that part alone")
    sft_note = (f"{r0['n_params'] / 1e6:.2f}M weights trained by SFT" if "n_params" in r0 else "SFT not run")
    for r in results:
        if "sft_skipped" in r:
            sk = r["sft_skipped"]
            sft_note += (f". SFT not run under {r['policy']} (--no-sft): Adam's element-wise sqrt + divide alone, "
                         f"probed on {sk['probe_elements']} elements, costs {sk['probe_wall_s'] / sk['probe_elements'] * 1e6:.0f} us "
                         f"and {sk['probe_send_bytes'] / sk['probe_elements']:.0f} B per weight, i.e. at least "
                         f"{sk['lower_bound_wall_s'] / 60:.0f} min and {sk['lower_bound_send_bytes'] / 1e9:.1f} GB per "
                         f"step for its {sk['n_params'] / 1e6:.2f}M weights (a lower bound: no forward/backward)")
    if args.warmup:
        runs = ("SFT/PT: step 2 measured after step 1 (warm-up, non-zero Adam state); forward-only: generation 2 "
                "measured after generation 1.")
    else:
        runs = ("No warm-up (--warmup 0): the first run of each program is measured (SFT/PT: step 1, zero Adam "
                "state, same program and cost as any later step; forward-only: generation 1)"
                + (", after a small session warm-up program that absorbs one-off protocol set-up"
                   if "session_warmup" in r0 else "") + "; under ABY3 first and second runs "
                "agree within the machine's noise (measured with 1 layer, ~16 tokens, E 4, P 20: generation "
                "prefix 358/357 s, cached 86/82 s, PT 23/21 s, SFT 285/339 s), bytes and rounds are identical.")
    note = (f"\n{args.model}, first {r0['layers']} layers, {vocab_note}; {sft_note}. Same E = {args.examples} "
            f"real MR training examples (text repeated to ~{args.seq} tokens) in every method; n = {args.n_tokens} "
            f"soft-prompt tokens; P = {args.popsize}. Shapes: "
            + (f"SFT {sh['sft']['seq_len']} tokens per example (one-hot [E, L, V] shared; the lookup is a matmul "
               "in MPC because the table is trained); " if "sft" in sh else "")
            + f"PT and forward-only prefix {sh['prefix']['seq_len']} tokens (prompt + the same right-padded text); "
            + (f"forward-only cached: text prefilled once ({sh['cached']['prefix_len']} tokens), "
               f"{sh['cached']['tokens_per_candidate']} tokens per candidate. " if "cached" in sh else
               "forward-only not measured (--no-forward). ")
            + "PT and forward-only share text embeddings (policy embedding: data_owner).\n\n"
            f"One iteration: SFT = one Adam step (optax.adam's update, bias correction of v after the sqrt; lr "
            f"{args.lr:g}, eps {args.eps:g}, loss scale {args.loss_scale:g} for fixed point) of all weights on the "
            "E examples (forward, CE over the verbalizer logits against secret one-hot labels, jax.grad, update; "
            "weights and moments stay secret and resident); PT = the same on the n x H soft prompt only (BBT "
            "placement: prompt then text); forward-only = one generation: P candidates scored on the E examples, "
            "only the [P, E, R] verbalizer logits opened. 'per candidate' = generation / P (amortised, rounds "
            f"included). {runs} Compilation never timed. MB and rounds (send actions) of the busiest party; "
            "LAN/WAN = wall + bytes/bandwidth + rounds x latency (tuning.transports.cost.NETWORKS); wall times are the SPU "
            "simulator's, all parties on one 2-core machine shared with other jobs (inflated by contention; bytes "
            f"and rounds are not). "
            + (f"Measured in {len(environment)} runs (one process per policy), {total / 60:.1f} min in all.\n"
               if isinstance(environment, list) and len(environment) > 1 else f"Whole run {total / 60:.1f} min.\n"))
    measured_ratios = any(len(r) > 2 for r in ratios)  # none under --no-forward
    table = markdown_table(rows, cols) + (("\nRatios (SFT or PT step over forward-only; gen = one generation of P, "
                                           "cand = per candidate):\n\n" + markdown_table(ratios, rcols))
                                          if measured_ratios else "") + note
    config = {"model": args.model, "layers": r0["layers"], "vocab": r0["vocab"], "seq": args.seq,
              "examples": args.examples, "popsize": args.popsize, "n_tokens": args.n_tokens, "policy": policies,
              "lr": args.lr, "eps": args.eps, "loss_scale": args.loss_scale, "warmup": args.warmup, "shapes": sh}
    name = "step_" + "_".join(policies) + args.tag
    payload = {"config": config, "rows": rows, "ratios": ratios, "results": results, "total_wall_s": total,
               "args": vars(args)}
    if environment:  # re-rendered: keep the measuring runs' environment (date, versions)
        payload["measured_environment"] = environment
    save(name, payload, table, args.out)
    _plot(results, args.popsize, f"{args.out}/{name}.png",
          f"{args.model} ({r0['layers']} layers, vocab {r0['vocab']}), E={args.examples}, ~{args.seq} tokens, "
          f"P={args.popsize}")


def _plot(results, P, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("SFT step", "sft", 1), ("PT step", "pt", 1), ("gen prefix", "gen_prefix", 1),
            ("gen cached", "gen_cached", 1), ("cand prefix", "gen_prefix", P), ("cand cached", "gen_cached", P)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(results)
    x = np.arange(len(bars))
    for j, r in enumerate(results):
        m = r["methods"]
        get = lambda k, f, d: f(m[k]) / d if k in m else np.nan  # noqa: E731  (missing: --no-sft)
        vals = [[get(k, lambda c: c["wall_s"], d) for _, k, d in bars],
                [get(k, lambda c: c["send_bytes"] / 1e6, d) for _, k, d in bars],
                [get(k, lambda c: c["estimate_s"]["wan-100mbps"], d) for _, k, d in bars]]
        for ax, v in zip(axes, vals):
            ax.bar(x + (j - (len(results) - 1) / 2) * width, v, width, label=r["policy"], color=f"C{j}")
        if "sft_skipped" in r:  # not measured: the lower bound, hatched
            sk = r["sft_skipped"]
            for ax, v in zip(axes[:2], (sk["lower_bound_wall_s"], sk["lower_bound_send_bytes"] / 1e6)):
                ax.bar(x[0] + (j - (len(results) - 1) / 2) * width, v, width, color=f"C{j}", alpha=0.35,
                       hatch="//", label=f"{r['policy']} SFT: lower bound, not run")
    for ax, yl in zip(axes, ["wall s (sim)", "MB sent (busiest party)", "WAN 100 Mbps estimate s"]):
        ax.set_yscale("log")
        ax.set_ylabel(yl)
        ax.set_xticks(x, [b[0] for b in bars], rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + " (per iteration)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
