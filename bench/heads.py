"""Which classifier should read the opened logits? Finished ``--head fit`` runs, re-scored.

    secptune bench heads --table accuracy_mr_cached_plaintext_cma_v4t_b16m_fast_fit [--tag _fit]

For each seed's run of a ``bench accuracy`` table (``--head fit``), on the plaintext back end (the
programs SPU runs), the same test examples read five ways:
- ``words P0`` / ``words tuned``: the verbalizer's words at P0 (zero-shot) and at the kept prompt;
- ``head P0``: the head fitted on train + dev at P0, on P0's test logits;
- ``head P0 @ tuned``: that same head on the tuned prompt's test logits (what ``--objective head``
  searched against);
- ``head refit @ tuned``: the head fitted again at the kept prompt (what ``--head fit`` reports);
- ``ensemble``: the mean of the log-probabilities of ``head P0`` and ``head refit @ tuned``.
Under MPC every one of them reads the same opened logits: the reading is free; ``ensemble``
and ``head P0 @ tuned`` need no rows beyond the run's, ``head refit`` the train + dev rows once.

``--curve RUN [RUN ...]``: selection's ceiling. For finished ``--head fit --save-logits`` runs, the
head refitted at every generation's search mean (the rows it was scored on are in logits/), read on
the test set: the best of them is what a perfect selection rule could have kept, to set beside the
kept prompt and the head at P0. If that ceiling is not above the head at P0, no selection lever can
make the search pay; only what the search finds (objective, capacity) can. Beside it, two selection
rules that read no test example (``lowest``, P0 among the candidates): k-fold over train + dev, and
a head fitted on train scored on dev.

``--cost``: what the wider secret head costs under SPU's simulator (the run's policy and model):
the one-off ``head`` program (the one-hot word rows times the embedding table) with the
verbalizer's R words and with all W words, side by side; per scored row the W - R more logits
are a few more products in the last matmul and W - R more opened values.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, rescorer, save, tag_suffix
from bench.tune_accuracy import table_run_dir

READS = ("words P0", "words tuned", "head P0", "head P0 @ tuned", "head refit @ tuned", "ensemble")


def read_run(run: Path) -> dict:
    """Test accuracy of every reading for one finished run (see the module doc)."""
    from tuning.data_owner import head as fitted
    from tuning.data_owner.rundir import RunDir
    from tuning.data_owner.trainer import fit_head

    if RunDir(run).read_config().get("head") != "fit":
        raise ValueError(f"{run}: not a --head fit run")
    r = rescorer(run, zero_shot=True)
    cfg, sc = r.cfg, r.scorer
    y = sc.sets["test"].labels
    delta = r.subspace.offsets(RunDir(run).read_best_z()[None])
    w0, wt = sc.score_words("test", None), sc.score_words("test", delta)
    h0, ht = fit_head(sc, None, cfg.seed), fit_head(sc, delta, cfg.seed)
    lp = {"head P0": fitted.apply(h0, fitted.features(w0[0][0])),
          "head P0 @ tuned": fitted.apply(h0, fitted.features(wt[0][0])),
          "head refit @ tuned": fitted.apply(ht, fitted.features(wt[0][0]))}
    lp["ensemble"] = (lp["head P0"] + lp["head refit @ tuned"]) / 2
    acc = {"words P0": sc.class_scores(*w0)[0], "words tuned": sc.class_scores(*wt)[0], **lp}
    return {k: round(float((v.argmax(-1) == y).mean()), 4) for k, v in acc.items()}


def prompt_reading(sc, delta, seed: int) -> dict:
    """The head refitted at one prompt (None: P0), as ``--head fit`` fits it: its k-fold
    cross-entropy over train + dev (the loss its C was chosen by; no test example is read) and its
    test accuracy."""
    from tuning.data_owner import head as fitted
    from tuning.data_owner.trainer import head_examples, head_predictions

    X, y = head_examples(sc, delta)
    R, n = len(sc.task.labels), len(sc.sets["train"].labels)
    c = fitted.choose_c(X, y, R, seed=seed)
    held = -fitted.out_of_fold(X, y, R, c, seed=seed)[np.arange(len(y)), y]  # per example: how noisy the rule is
    test = head_predictions(fitted.fit(X, y, R, c), sc.score_words("test", delta)[0][0]) == sc.sets["test"].labels
    # a head fitted on train alone, scored on dev: dev is no example the search's objective read
    on_train = fitted.fit(X[:n], y[:n], R, fitted.choose_c(X[:n], y[:n], R, seed=seed))
    dev = -fitted.apply(on_train, X[n:])[np.arange(len(y) - n), y[n:]]
    return {"cv loss": float(held.mean()), "held-out losses": held.round(5).tolist(),
            "dev head loss": float(dev.mean()), "test": float(test.mean())}


def lowest(losses) -> int:
    """A selection rule's pick: the prompt with the lowest loss (the first on ties). Index 0 is P0,
    so a rule may keep no soft prompt. ``k-fold``: the refitted head's held-out cross-entropy over
    train + dev; ``dev-head``: the cross-entropy on dev of a head fitted on train alone."""
    return int(np.argmin(np.asarray(losses, float)))


def generation_curve(run: Path) -> dict:
    """P0 and each saved generation's search mean read through their refitted heads (``--curve``):
    the kept prompt, the k-fold and dev-head selections' picks and the best on test (the ceiling)."""
    from tuning.data_owner.rundir import RunDir

    d = RunDir(run)
    cfg = d.read_config()
    if cfg.get("head") != "fit" or not d.generation_logits():
        raise ValueError(f"{run}: not a finished --head fit --save-logits run")
    r = rescorer(run, zero_shot=True)
    sc, seed = r.scorer, r.cfg.seed
    reads = [prompt_reading(sc, None, seed)] + [prompt_reading(sc, r.subspace.offsets(np.load(f)["Z"][-1:]), seed)
                                                for f in d.generation_logits()]  # each mean rides last
    curve = [x["test"] for x in reads[1:]]
    cv, dev = [x["cv loss"] for x in reads], [x["dev head loss"] for x in reads]
    pick, dev_pick = lowest(cv), lowest(dev)
    kept = prompt_reading(sc, r.subspace.offsets(d.read_best_z()[None]), seed)["test"]
    g = 1 + lowest(cv[1:])  # the generation k-fold likes best
    diff = np.asarray(reads[0]["held-out losses"]) - np.asarray(reads[g]["held-out losses"])
    return {"run": str(run), "task": cfg.get("task"), "seed": cfg.get("seed"), "head P0": reads[0]["test"],
            "kept": kept, "k-fold": reads[pick]["test"], "k-fold generation": pick,
            "dev-head": reads[dev_pick]["test"], "dev-head generation": dev_pick,
            "ceiling": max(curve), "best generation": int(np.argmax(curve)) + 1, "curve": curve,
            # what the best generation gains on train + dev by k-fold, and the paired standard error of that
            "cv gain": float(diff.mean()), "cv gain se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "cv loss": cv, "held-out losses": [x["held-out losses"] for x in reads], "dev head loss": dev}


def cached_curve(run: Path) -> dict:
    """``generation_curve``, kept in the run's logits/curve.json (the data owner's own files) and
    reused while the run has the same generations, so a curve over many runs can be built up."""
    from tuning.data_owner.rundir import RunDir

    path = run / "logits" / "curve.json"
    if path.exists():
        c = json.loads(path.read_text())
        if len(c["curve"]) == len(RunDir(run).generation_logits()):
            return c
    c = generation_curve(run)
    path.write_text(json.dumps(c))
    return c


CURVE_READS = ("kept", "k-fold", "dev-head", "ceiling")


def curve_summary(rows: list) -> list:
    """Points over the head at P0 per task (mean, 95% t half-width, runs), and over the seeds that
    have every task, each seed's average over them."""
    from bench.fewshot import interval

    tasks = sorted({r["task"] for r in rows})
    out = []
    for t in tasks:
        sel = [r for r in rows if r["task"] == t]
        out.append({"task": t, **{k: _pts(interval([100 * (r[k] - r["head P0"]) for r in sel]), len(sel))
                                  for k in CURVE_READS}})
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["task"]] = r
    full = [v for v in by_seed.values() if set(v) == set(tasks)]
    if len(tasks) > 1 and full:
        out.append({"task": f"average ({len(tasks)} tasks)",
                    **{k: _pts(interval([np.mean([100 * (r[k] - r["head P0"]) for r in v.values()]) for v in full]),
                               len(full)) for k in CURVE_READS}})
    return out


def _pts(mh: tuple, n: int) -> str:
    m, h = mh
    return f"{m:+.1f} ({n})" if np.isnan(h) else f"{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}] ({n})"


def curve_main(args) -> None:
    rows = []
    for run in args.curve:
        rows.append(cached_curve(Path(run)))
        print({k: v for k, v in rows[-1].items() if k not in ("curve", "cv loss", "held-out losses")}, flush=True)
    cols = ["task", "seed", "head P0", "kept", "k-fold", "k-fold generation", "dev-head", "dev-head generation",
            "ceiling", "best generation", "cv gain", "cv gain se"]
    text = markdown_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k in cols}
                           for r in rows], cols)
    text += ("\nTest accuracy of the head refitted at P0, at the kept prompt, at the prompt k-fold selection picks "
             "(the lowest held-out cross-entropy of the refitted head over train + dev, among P0 and every "
             "generation's search mean; generation 0 is P0), at the prompt dev-head picks (the lowest dev "
             "cross-entropy of a head fitted on train alone, same candidates) and at the best of the generations' "
             "means on test (selection's ceiling: what a perfect selection rule could keep); re-scored on the plaintext back "
             "end. cv gain: the held-out cross-entropy at P0 minus the lowest of the generations', over train + dev, "
             "and its paired standard error over those examples (how finely the rule can tell prompts apart).\n")
    summary = curve_summary(rows)
    text += "\nPoints over the head at P0 (mean [95% t interval] (runs)):\n\n"
    text += markdown_table(summary, ["task", *CURVE_READS])
    by_gen = None
    if len({len(r["curve"]) for r in rows}) == 1:
        by_gen = np.mean([100 * (np.asarray(r["curve"]) - r["head P0"]) for r in rows], 0).round(2).tolist()
        text += f"\nMean points over the head at P0 by generation: {', '.join(f'{x:+.1f}' for x in by_gen)}\n"
    save(f"heads_curve{args.tag}", {"rows": rows, "summary": summary, "mean gain by generation": by_gen}, text,
         args.out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in rows:
        gain = 100 * (np.asarray(r["curve"]) - r["head P0"])
        ax.plot(range(1, len(gain) + 1), gain, lw=0.8, alpha=0.6, label=f"{r['task']} s{r['seed']}")
    if by_gen and len(rows) > 1:  # the budget question: where the mean plateaus
        ax.plot(range(1, len(by_gen) + 1), by_gen, color="k", lw=2.2, label="mean over runs")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="generation", ylabel="test points over the head at P0\n(head refitted at the mean)")
    if len(rows) <= 8:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(args.out) / f"heads_curve{args.tag}.png", dpi=120)


def head_cost(model: str, policy_name: str, word_counts: list) -> list:
    """Bytes, rounds and seconds of the one-off secure ``head`` program for each number of word
    rows, in one simulator session (the weights shared once)."""
    from tuning.model_owner.models import load_model, with_policy
    from tuning.transports import make_backend
    from tuning.policy import load_policy

    policy = load_policy(policy_name)
    bundle = with_policy(load_model(model), policy)
    sim = make_backend("sim", bundle, policy)
    try:
        out = []
        for w in word_counts:
            rows = np.zeros((w, bundle.config.vocab_size), np.float32)
            rows[np.arange(w), np.arange(100, 100 + w)] = 1.0
            sim.put("rows", rows)
            sim.run("head", {"rows": "rows"}, ["head"])  # as the model owner approves it: rows checked one-hot
            c = sim.costs[-1]
            out.append({"words": w, "MB sent": round(c.send_bytes / 1e6, 2), "rounds": int(c.rounds),
                        "seconds": round(c.wall_s, 2)})
            sim.drop("rows", "head")
        return out
    finally:
        sim.close()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench heads")
    ap.add_argument("--table", help="a `bench accuracy` table of --head fit runs (name or path)")
    ap.add_argument("--cost", action="store_true", help="measure the wider head's one-off cost under the simulator")
    ap.add_argument("--curve", nargs="+", help="--head fit --save-logits runs: the head at every generation's mean")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--tag", default="", type=tag_suffix)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.cost:
        return cost_main(args)
    if args.curve:
        return curve_main(args)
    if not args.table:
        ap.error("--table is required (or --cost, --curve)")

    path = Path(args.table) if Path(args.table).suffix else Path(args.results) / f"{args.table}.json"
    table = json.loads(path.read_text())
    a = table["args"]
    rows = []
    for r in table["rows"]:
        run = table_run_dir(path, a, r["seed"])
        rows.append({"seed": r["seed"], **read_run(run)})
        print(rows[-1], flush=True)
    mean = {"seed": "mean", **{k: round(float(np.mean([r[k] for r in rows])), 3) for k in READS}}
    text = markdown_table(rows + [mean], ["seed", *READS])
    text += (f"\n{path.stem}: {a['task']}, popsize {a['popsize']} x {a['budget']} generations, search objective "
             f"{a.get('objective', 'words')}, selection {a.get('select', 'dev-loss')}; {a['n_test']} test examples "
             "per seed, re-scored on the plaintext back end. Readings: see bench/heads.py.\n")
    save(f"heads_{a['task']}{args.tag}", {"rows": rows, "mean": mean, "table": str(path)}, text, args.out)


def cost_main(args):
    """--cost: the head program with the verbalizer's words and with the whole probe pool."""
    from tuning.data_owner.tasks import TASKS

    table = json.loads(Path(args.table).read_text()) if args.table else {"args": {}}
    a = table["args"]
    model, policy, task = a.get("model", "smollm2-135m"), a.get("policy", "aby3-fast"), a.get("task", "mr")
    spec = TASKS[task]
    r, w = len(spec.verbalizer), len(spec.verbalizer) + len(spec.probe_words)
    rows = head_cost(model, policy, [r, w])
    text = markdown_table(rows, list(rows[0]))
    text += (f"\nThe one-off secure head program of {model} under {policy} (simulator, one session): {r} verbalizer "
             f"word rows against {w} (verbalizer + {task}'s probe words), the rows checked one-hot inside MPC. It "
             "runs once per job, at set-up.\n")
    save(f"heads_cost_{task}_{policy}{args.tag}", {"rows": rows, "model": model, "policy": policy}, text, args.out)


if __name__ == "__main__":
    main()
