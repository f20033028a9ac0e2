"""The end-to-end bill: SFT, gradient prompt tuning and forward-only tuning, each to the same dev
accuracy, priced at its measured per-step MPC cost on the full 30-layer model.

    secptune bench e2e curves [--seeds 0,1,2] [--sft-steps 40] [--pt-steps 60]
    secptune bench e2e bill --fo TABLE --steps STEP_L1,STEP_L2,STEP_L4 --placement PLACEMENT [--fo-config virtual:4]

``curves`` (plaintext, the real SmolLM2 and the real 16-shot MR split of each seed: 16 + 16
examples per class for train and dev, as ``secptune tune`` draws them):
- SFT: Adam on every weight (tied embedding included), full batch of the 32 training examples
  per step, cross-entropy over the verbalizer logits (the loss ``bench.baselines`` runs);
- PT: Adam on an n-token soft prompt placed before the template (BBT placement, as the MPC PT
  step), initialised at the same hard prompt P0 the forward-only runs start from;
- forward-only: read from finished ``bench accuracy`` runs (``--fo``): the dev accuracy of the
  search mean, per generation.
Dev accuracy on the 32 dev examples after every step. Learning rates: ``--sft-lr``, ``--pt-lr``.

``bill``: the target is the highest dev accuracy (seed-mean curve) that all three methods reach;
each method's steps to reach it, times its per-step MPC cost under ABY3 on all 30 layers:
- SFT and PT steps: ``bench step`` measured at 1, 2 and 4 layers (``--steps``, the first rows of
  the embedding only); cost is fitted as a + b * layers (the fit's error at the measured points is
  reported) and taken at 30 layers; SFT adds the cost of the full vocabulary's rows, measured per
  row from one more ``bench step`` run with a wider vocabulary at the same layers; both are scaled
  from the measured E examples per step to the 32 of a full-batch step (linearly: it overstates
  the per-weight Adam part, which does not grow with E, and is stated). Dev evaluations are not
  charged to SFT or PT (conservative: it only makes them cheaper).
- forward-only: ``bench placement`` (``--placement``, all 30 layers) gives the per-row cost of a
  generation and the per-example prefill; a generation scores the rows of the run's settings
  (``tune``'s ``rows_per_generation``); the 64 train + dev examples are prefilled once.
LAN and WAN figures use ``tuning.transports.cost``'s network model on the measured bytes and rounds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix
from bench.tune_accuracy import table_run_dir

INIT = "text: Is this review positive or negative?"


# ------------------------------------------------------------------------------------- curves
def _encode(bundle, task, examples, n_prompt: int = 0):
    """Token ids [E, L] right-padded, the index of each last real token (after ``n_prompt`` soft
    tokens), and labels."""
    from tuning.data_owner.encode import pad_length

    seqs = [list(bundle.tokenizer(task.prompt(t), add_special_tokens=False)["input_ids"]) for t, _ in examples]
    L = pad_length(max(len(s) for s in seqs), 16)
    ids = np.full((len(seqs), L), bundle.tokenizer.pad_token_id or 0, np.int32)
    for e, s in enumerate(seqs):
        ids[e, : len(s)] = s
    last = np.array([n_prompt + len(s) - 1 for s in seqs])
    y = np.array([task.labels.index(l) for _, l in examples])
    return ids, last, y


def learning_curves(seed: int, sft_steps: int, pt_steps: int, sft_lr: float, pt_lr: float, log=print) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from spu_models import llama
    from tuning.data_owner.encode import verbalizer_ids
    from tuning.model_owner.models import load_model
    from tuning.data_owner.trainer import TuneConfig, split_examples, task_of

    cfg = TuneConfig.of(task="mr", shots=16, seed=seed)
    task = task_of(cfg)
    train, dev, _ = split_examples(cfg, task)
    bundle = load_model("smollm2-135m")
    model = llama.LlamaForCausalLM(bundle.config)
    rows = jnp.asarray(verbalizer_ids(bundle.tokenizer, [task.verbalizer[l] for l in task.labels]))
    p0_ids = list(bundle.tokenizer(INIT[len("text:"):], add_special_tokens=False)["input_ids"])
    n = len(p0_ids)

    def logits_of(params, ids, last, prompt=None):
        x = model.apply({"params": params}, ids, method=model.embed)
        if prompt is not None:
            x = jnp.concatenate([jnp.broadcast_to(prompt[None], (x.shape[0],) + prompt.shape), x], axis=1)
        h = model.apply({"params": params}, inputs_embeds=x, method=model.hidden)
        picked = h[jnp.arange(h.shape[0]), last]
        return model.apply({"params": params}, picked, rows, method=model.head_rows)

    def ce(z, y):
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])

    def curve(name, loss_fn, acc_fn, x0, lr, steps):
        """Adam on ``x0`` for ``steps`` full-batch steps of ``loss_fn``; dev accuracy before and after each."""
        opt = optax.adam(lr)

        @jax.jit
        def step(x, state):
            loss, g = jax.value_and_grad(loss_fn)(x)
            upd, state = opt.update(g, state, x)
            return optax.apply_updates(x, upd), state, loss

        acc = jax.jit(acc_fn)
        x, state = x0, opt.init(x0)
        accs = [float(acc(x))]
        for s in range(steps):
            x, state, loss = step(x, state)
            accs.append(float(acc(x)))
            log(f"[seed {seed}] {name} step {s + 1}: train loss {float(loss):.3f}, dev acc {accs[-1]:.3f}")
        return accs

    def dev_acc(dv, params, prompt=None):
        return jnp.mean(jnp.argmax(logits_of(params, dv[0], dv[1], prompt), -1) == dv[2])

    # SFT: every weight
    tr, dv = _encode(bundle, task, train), _encode(bundle, task, dev)
    out = {"sft": curve("SFT", lambda p: ce(logits_of(p, tr[0], tr[1]), tr[2]), lambda p: dev_acc(dv, p),
                        bundle.params, sft_lr, sft_steps)}
    # PT: the soft prompt only, before the template (BBT placement), from P0's embeddings
    tr, dv = _encode(bundle, task, train, n), _encode(bundle, task, dev, n)
    frozen = bundle.params
    p0 = jnp.asarray(frozen["model"]["embed_tokens"]["embedding"])[jnp.asarray(p0_ids)]
    out["pt"] = curve("PT", lambda pr: ce(logits_of(frozen, tr[0], tr[1], pr), tr[2]),
                      lambda pr: dev_acc(dv, frozen, pr), p0, pt_lr, pt_steps)
    return out


def forward_only_curves(table: str, results: Path) -> dict:
    """Seed -> dev accuracy of the search mean after each generation (index 0: before any), from
    the runs of a ``bench accuracy`` table."""
    from tuning.data_owner.rundir import RunDir

    path = Path(table) if Path(table).suffix else results / f"{table}.json"
    d = json.loads(path.read_text())
    a = d["args"]
    out = {}
    for r in d["rows"]:
        run = table_run_dir(path, a, r["seed"])
        ms = RunDir(run).read_metrics()
        out[r["seed"]] = [ms[0]["dev_acc_of_mean"]] + [m["dev_acc_of_mean"] for m in ms]  # gen 1 scores z = 0
    return out, a


def steps_to(curve: np.ndarray, target: float):
    hit = np.nonzero(curve >= target - 1e-9)[0]
    return int(hit[0]) if len(hit) else None


# --------------------------------------------------------------------------------------- bill
def fit_layers(step_runs: list, method: str, unit: str) -> dict:
    """cost = a + b * layers through the measured runs (least squares), and its error there."""
    L = np.array([r["layers"] for r in step_runs], float)
    y = np.array([r["methods"][method][unit] for r in step_runs], float)
    b, a = np.polyfit(L, y, 1)
    rel = np.abs(a + b * L - y) / np.maximum(y, 1e-12)
    return {"a": float(a), "b": float(b), "max_rel_err_at_measured": float(rel.max()),
            "measured": dict(zip([int(x) for x in L], [float(v) for v in y]))}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench e2e")
    ap.add_argument("what", choices=["curves", "bill"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--pt-steps", type=int, default=60)
    ap.add_argument("--sft-lr", type=float, default=2e-5)
    ap.add_argument("--pt-lr", type=float, default=3e-3)
    ap.add_argument("--fo", help="bill: the forward-only bench accuracy table")
    ap.add_argument("--steps", help="bill: bench step results at 1, 2, 4 layers (comma list)")
    ap.add_argument("--placement", help="bill: bench placement result (all 30 layers)")
    ap.add_argument("--fo-config", default="virtual:4", help="bill: the forward-only placement row to price")
    ap.add_argument("--policy", default="aby3")
    ap.add_argument("--tag", default="", type=tag_suffix)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.what == "curves":
        return curves_main(args)
    return bill_main(args)


def curves_main(args):
    path = Path(args.out) / f"e2e_curves{args.tag}.json"
    done = json.loads(path.read_text()) if path.exists() else {"curves": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        if str(seed) in done["curves"]:
            continue
        done["curves"][str(seed)] = learning_curves(seed, args.sft_steps, args.pt_steps, args.sft_lr, args.pt_lr,
                                                    log=lambda s: print(s, flush=True))
        done["args"] = vars(args)
        path.write_text(json.dumps(done))  # after every seed: a kill loses at most one seed
    print(f"saved {path}")


def _mean_curve(curves: list) -> np.ndarray:
    n = min(len(c) for c in curves)
    return np.mean([c[:n] for c in curves], 0)


def bill_main(args):
    from tuning.transports.cost import NETWORKS
    from tuning.data_owner.report import FULL_BUDGET, rows_per_generation

    res = Path(args.results)
    load = lambda n: json.loads((Path(n) if Path(n).suffix else res / f"{n}.json").read_text())  # noqa: E731
    curves = load(f"e2e_curves{args.tag}")["curves"]
    fo, fo_args = forward_only_curves(args.fo, res)
    seeds = sorted(set(int(s) for s in curves) & set(fo))
    if len(seeds) < 2:
        raise ValueError(f"the curves and the forward-only runs share seeds {seeds}; need >= 2")
    mean = {"SFT": _mean_curve([curves[str(s)]["sft"] for s in seeds]),
            "PT": _mean_curve([curves[str(s)]["pt"] for s in seeds]),
            "forward-only": _mean_curve([fo[s] for s in seeds])}
    target = min(float(c.max()) for c in mean.values())
    steps = {m: steps_to(c, target) for m, c in mean.items()}

    # per-step MPC costs on 30 layers
    step_runs = []
    for name in args.steps.split(","):
        d = load(name)
        r = next(x for x in d["results"] if x["policy"] == args.policy)
        step_runs.append({**r, "examples": d["args"]["examples"]})
    E = step_runs[0]["examples"]
    if any(r["examples"] != E for r in step_runs):
        raise ValueError("the bench step runs differ in --examples")
    base_vocab = min(r["vocab"] for r in step_runs)
    by_layers = [r for r in step_runs if r["vocab"] == base_vocab]
    wide = [r for r in step_runs if r["vocab"] != base_vocab]  # the same layers with more embedding rows
    full_layers, full_vocab = 30, step_runs[0]["full_vocab"]
    k = FULL_BUDGET["shots_per_class"] * 2  # 32 training examples per full-batch step
    per_step, fits, per_row = {}, {}, {}
    for method, key in (("SFT", "sft"), ("PT", "pt")):
        cost = {}
        for unit in ("wall_s", "send_bytes", "rounds"):
            fit = fit_layers(by_layers, key, unit)
            fits[f"{method} {unit}"] = fit
            cost[unit] = fit["a"] + fit["b"] * full_layers
            if wide and method == "SFT":  # every op on the trained table (lookup, its gradient, Adam) grows with it
                w = wide[0]
                same = next(r for r in by_layers if r["layers"] == w["layers"])
                per_row[unit] = (w["methods"][key][unit] - same["methods"][key][unit]) / (w["vocab"] - same["vocab"])
                cost[unit] += per_row[unit] * (full_vocab - base_vocab)
        # a full-batch step: the measured E examples scaled to 32 (rounds do not grow with the batch)
        per_step[method] = {u: v * (k / E) if u != "rounds" else v for u, v in cost.items()}
    pl = load(args.placement)
    row = next(r for r in pl["rows"] if r["placement"] == args.fo_config.replace(":", ":"))
    n_rows = rows_per_generation(fo_args["popsize"], k, k, fo_args.get("train_batch", 0), fo_args.get("dev_eval", "all"))
    per_step["forward-only"] = {"wall_s": row["s / row"] * n_rows, "send_bytes": row["MB / row"] * 1e6 * n_rows,
                                "rounds": row["gen rounds"]}
    prefill = {"wall_s": row["prefill s / example"] * 2 * k, "send_bytes": row["prefill MB / example"] * 1e6 * 2 * k}
    rows = []
    for m in ("SFT", "PT", "forward-only"):
        s = steps[m]
        c = per_step[m]
        once = prefill if m == "forward-only" else {"wall_s": 0.0, "send_bytes": 0.0}
        tot = {u: (c[u] * s if s is not None else float("nan")) + once.get(u, 0.0) for u in ("wall_s", "send_bytes")}
        tot["rounds"] = c["rounds"] * s if s is not None else float("nan")
        net = {n: tot["wall_s"] + tot["send_bytes"] * 8 / bw + tot["rounds"] * lat for n, (bw, lat) in NETWORKS.items()}
        rows.append({"method": m, "steps to target": s, "per step s": round(c["wall_s"], 1),
                     "per step GB": round(c["send_bytes"] / 1e9, 2), "total h": round(tot["wall_s"] / 3600, 2),
                     "total TB": round(tot["send_bytes"] / 1e12, 3),
                     **{f"{n} h": round(v / 3600, 1) for n, v in net.items()}})
    fo_row = rows[2]
    for r in rows:
        r["x bytes vs forward-only"] = round(r["total TB"] / fo_row["total TB"], 2) if fo_row["total TB"] else None
    table = markdown_table(rows, list(rows[0]))
    table += (f"\nTarget dev accuracy {target:.3f}: the highest that the seed-mean curves of all three reach "
              f"(seeds {seeds}; max: {', '.join(f'{m} {c.max():.3f}' for m, c in mean.items())}). Per step: "
              f"SFT and PT fitted as a + b x layers from bench step at {[r['layers'] for r in step_runs]} layers "
              f"(E={E}, " + (f"max relative fit error at those points "
                             f"{max(f['max_rel_err_at_measured'] for f in fits.values()):.1%}"
                             if len(by_layers) >= 3 else "a line through 2 points: the linear scaling is NOT "
                             "checked against a third layer count") + "), taken at 30 layers and scaled to "
              f"{k} examples; SFT adds the cost of the full vocabulary's embedding rows "
              f"({'measured per row from a wider bench step run' if per_row else 'NOT measured: no wider run given'}). "
              f"Forward-only: "
              f"{args.fo_config} from bench placement (30 layers, measured per row) x {n_rows} rows per generation "
              f"({fo_args.get('train_batch') or 'all'} train / dev: {fo_args.get('dev_eval', 'all')}), plus the "
              f"one-off prefill of {2 * k} examples. Policy {args.policy}. Dev evaluations of SFT/PT are not charged.\n")
    name = f"e2e_{args.policy}{args.tag}"
    save(name, {"rows": rows, "target": target, "steps": steps, "per_step": per_step, "fits": fits,
                "sft_cost_per_embedding_row": per_row,
                "curves_mean": {m: c.tolist() for m, c in mean.items()}, "args": vars(args)}, table, args.out)
    _plot(mean, target, rows, Path(args.out) / f"{name}.png")


def _plot(mean, target, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    for m, c in mean.items():
        ax[0].plot(np.arange(len(c)), c, label=m)
    ax[0].axhline(target, color="0.5", ls="--", lw=1, label="target")
    ax[0].set(xlabel="steps (SFT, PT) / generations (forward-only)", ylabel="dev accuracy (seed mean)")
    ax[0].legend(fontsize=8, loc="lower right")
    names = [r["method"] for r in rows]
    ax[1].bar(names, [r["total TB"] for r in rows], color=["C0", "C1", "C2"])
    ax[1].set(ylabel="TB sent to reach the target (ABY3, 30 layers)", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
