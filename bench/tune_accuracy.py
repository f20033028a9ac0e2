"""Few-shot accuracy of forward-only prompt tuning on the real model: zero-shot, ICL, tuned.

    secptune bench accuracy [--task mr] [--seeds 0,1,2] [--shots 16] [--popsize 20] [--budget 40]
                            [--backend plaintext] [--mode cached] [--icl-demos 2]

Tuning runs the exact JAX programs that SPU runs (plaintext back end by default; `--backend sim`
runs them under MPC). ICL puts ``--icl-demos`` labelled demonstrations per class (from the same
k-shot train split) before each test example, evaluated in plaintext. Every run writes its own
directory under bench/results/runs/; the table aggregates them (mean and per seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix


def prompt_accuracy(bundle, policy, task, train, test, demos_per_class: int, seed: int) -> tuple[float, float]:
    """Accuracy of a hard prompt with ``demos_per_class`` labelled demonstrations per class before
    each test text (0: zero-shot; demos drawn per seed from the k-shot train split, shuffled), raw
    and with contextual calibration (the content-free inputs after the same demos). Under the
    run's policy (attention, approximations), in plaintext, each class's words combined as the
    tuning runs combine them (log-sum-exp)."""
    from tuning.data_owner.encode import make_batch, pad_length, tokenize_prompts
    from tuning.model_owner.models import with_policy
    from tuning.transports import make_backend
    from tuning.data_owner.scorer import CONTENT_FREE, calibrated, combine_words, verbalizer_words

    rng = np.random.default_rng(seed)
    demos = []
    for label in task.labels:
        pool = [ex for ex in train if ex[1] == label]
        demos += [pool[i] for i in rng.choice(len(pool), demos_per_class, replace=False)]
    rng.shuffle(demos)
    head = "".join(task.prompt(t) + verbalizer_words(task, l)[0] + "\n\n" for t, l in demos)
    per_label = [verbalizer_words(task, l) for l in task.labels]
    words = [w for ws in per_label for w in ws]
    groups = np.array([r for r, ws in enumerate(per_label) for _ in ws])
    # plaintext: the embedding lookup is the same function either way, so the table is read directly
    # (a one-hot [8, L, V] matmul per batch would only cost time)
    policy = dataclasses.replace(policy, embedding="data_owner")
    plain = make_backend("plaintext", with_policy(bundle, policy), policy)
    prompts = [head + task.prompt(t) for t, _ in test] + [head + task.prompt(t) for t in CONTENT_FREE]
    L = pad_length(max(len(s) for s in tokenize_prompts(bundle, prompts)), 32)  # one shape: one compile
    out = []
    for i in range(0, len(prompts), 8):
        chunk = prompts[i: i + 8]
        batch = make_batch(bundle, chunk + prompts[:8 - len(chunk)], words, seq_len=L)
        out.append(plain.forward(batch)[: len(chunk)])
    logits = combine_words(np.concatenate(out)[None], groups)  # [1, E + C, R]
    y = np.array([task.labels.index(l) for _, l in test])
    n = len(test)
    raw = float((logits[0, :n].argmax(-1) == y).mean())
    cal = float((calibrated(logits[:, :n], "cf", logits[:, n:])[0].argmax(-1) == y).mean())
    return raw, cal


def run_dir(args: dict, seed) -> Path:
    """The run directory of one seed of a ``bench accuracy`` table, from the table's ``args``."""
    return (Path(args["out"]) / "runs"
            / f"{args['task']}_{args['mode']}_{args['backend']}_{args['strategy']}{args['tag']}_s{seed}")


def table_run_dir(table: Path, args: dict, seed) -> Path:
    """A seed's run directory of the ``bench accuracy`` table at ``table``: ``runs/`` beside the table,
    where ``bench accuracy`` writes both, wherever the table now lives (its recorded ``--out`` may be
    another checkout's or relative to another working directory)."""
    return run_dir({**args, "out": str(Path(table).parent)}, seed)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench accuracy")
    ap.add_argument("--task", default="mr")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--backend", default="plaintext")
    ap.add_argument("--policy", default="aby3")
    ap.add_argument("--mode", default="cached")
    ap.add_argument("--strategy", default="cma")
    ap.add_argument("--icl-demos", type=int, default=2)
    ap.add_argument("--init", default="vocab", help="P0: vocab or text:<words>")
    ap.add_argument("--prompt-depth", type=int, default=None, help="deep prompt in the top K layers (default: input)")
    ap.add_argument("--prompt-form", default="kv", choices=["kv", "hidden", "virtual"])
    ap.add_argument("--train-batch", type=int, default=0, help="training examples per generation (0: all)")
    ap.add_argument("--dev-eval", default="all", choices=["all", "mean"])
    ap.add_argument("--sigma0", type=float, default=1.0)
    ap.add_argument("--d", type=int, default=500)
    ap.add_argument("--calibrate", default="none", choices=["none", "cf", "batch"])
    ap.add_argument("--label-words", default=None, help="label=word|word,... (several words per class)")
    ap.add_argument("--head", default="words", choices=["words", "fit"])
    ap.add_argument("--probe-words", default=None)
    ap.add_argument("--select", default="dev-loss", choices=["dev-loss", "final-mean"])
    ap.add_argument("--objective", default="words", choices=["words", "head", "refit"])
    ap.add_argument("--tag", default="", type=tag_suffix, help="suffix for the run directories and table (variants)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from tuning.model_owner.models import load_model
    from tuning.data_owner.rundir import RunDir
    from tuning.data_owner.trainer import TuneConfig, split_examples, task_of, tune
    from tuning.policy import load_policy

    rows = []
    bundle = None
    policy = load_policy(args.policy)
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = run_dir(vars(args), seed)
        cfg = TuneConfig.of(model=args.model, task=args.task, backend=args.backend, policy=args.policy,
                            shots=args.shots, n_test=args.n_test, popsize=args.popsize, budget=args.budget,
                            mode=args.mode, strategy=args.strategy, init=args.init, seed=seed, out=str(run),
                            prompt_depth=args.prompt_depth, prompt_form=args.prompt_form, train_batch=args.train_batch,
                            dev_eval=args.dev_eval, sigma0=args.sigma0, d=args.d, calibrate=args.calibrate,
                            label_words=args.label_words, head=args.head, probe_words=args.probe_words,
                            select=args.select, objective=args.objective)
        done = RunDir(run).read_summary()
        if done is not None and done["generations"] >= args.budget:
            s = done
        elif RunDir(run).has_checkpoint():  # an interrupted run, or a finished one given a larger --budget
            s = tune(cfg, resume=True, budget=args.budget)
        else:
            s = tune(cfg)
        if bundle is None:
            bundle = load_model(args.model)
        task = task_of(cfg)
        train, _, test = split_examples(cfg, task)
        zs = prompt_accuracy(bundle, policy, task, train, test, 0, seed)  # the same seed's baselines
        icl = {}
        if args.icl_demos:  # --icl-demos 0: no ICL columns
            acc, cal = prompt_accuracy(bundle, policy, task, train, test, args.icl_demos, seed)
            icl = {f"ICL ({args.icl_demos}/class)": round(acc, 3), f"ICL cal ({args.icl_demos}/class)": round(cal, 3)}
        rows.append({"task": args.task, "seed": seed, "zero-shot": round(s["zero_shot_test_acc"], 3),
                     "zero-shot raw": round(zs[0], 3), "zero-shot cal": round(zs[1], 3), **icl,
                     "tuned": round(s["tuned_test_acc"], 3),
                     **({"zero-shot head": round(s["fitted_head"]["zero_shot_head_test_acc"], 3),
                         "tuned words": round(s["tuned_words_test_acc"], 3)} if s.get("fitted_head") else {}),
                     "best dev": round(s["best_dev_acc"], 3), "generations": s["generations"],
                     "backend": args.backend, "placement": args.mode})
        print(rows[-1], flush=True)
    name = f"accuracy_{args.task}_{args.mode}_{args.backend}_{args.strategy}{args.tag}"
    rows = merge_rows(Path(args.out) / f"{name}.json", rows, vars(args))
    keys = [k for k in rows[0] if k not in ("task", "seed", "generations", "backend", "placement")]
    mean = {"task": args.task, "seed": "mean", **{k: round(float(np.mean([r[k] for r in rows])), 3) for k in keys},
            "generations": "", "backend": args.backend, "placement": args.mode}
    table = markdown_table(rows + [mean], list(rows[0]))
    table += (f"\n{args.model}; {args.shots}-shot per class (dev: as many again); popsize {args.popsize}, "
              f"budget {args.budget} generations, {args.strategy}; test: {args.n_test} stratified test examples; "
              f"seeds {', '.join(str(r['seed']) for r in rows)}. 'zero-shot': the run's own (through its back end, "
              f"with its calibration: {args.calibrate}); 'zero-shot raw / cal'"
              + (" and 'ICL / ICL cal'" if args.icl_demos else "") + ": the same seed's "
              "test set in plaintext, uncalibrated and with contextual calibration (content-free inputs); "
              f"head {args.head}, selection {args.select}, search objective {args.objective}"
              + ("; 'tuned' reads the fitted head, 'tuned words' the same prompt's verbalizer alone, 'zero-shot head' "
                 "the head fitted at P0" if args.head == "fit" else "") + ".\n")
    args.seeds = ",".join(str(r["seed"]) for r in rows)
    save(name, {"rows": rows, "mean": mean, "args": vars(args)}, table, args.out)


# what makes two invocations' rows one table (the seeds and the output place may differ)
SAME_RUN = ("task", "model", "shots", "popsize", "budget", "n_test", "backend", "policy", "mode", "strategy",
            "icl_demos", "init", "tag", "prompt_depth", "prompt_form", "train_batch", "dev_eval", "sigma0", "d",
            "calibrate", "label_words", "head", "probe_words", "select", "objective")


def merge_rows(path: Path, rows: list, args: dict) -> list:
    """This invocation's rows plus the seeds an earlier invocation of the same table measured:
    ``--seeds 3,4`` adds to a table of seeds 0-2 instead of replacing it. A table of other
    settings is replaced (and said so)."""
    from tuning.data_owner.config import absent_value  # what a setting a table lacks ran with, as for a run

    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    old_args = old.get("args", {})
    differ = [k for k in SAME_RUN if old_args.get(k, absent_value(k)) != args.get(k, absent_value(k))]
    if differ:
        print(f"note: {path.name} held a run with other settings ({', '.join(differ)}); replacing it")
        return rows
    by_seed = {r["seed"]: r for r in old.get("rows", [])}
    by_seed.update({r["seed"]: r for r in rows})
    return [by_seed[s] for s in sorted(by_seed)]
