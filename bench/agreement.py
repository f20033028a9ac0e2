"""Do the logits opened from MPC match the plaintext programs on the same candidates?

    secptune bench agreement --run DIR     # DIR: a `secptune tune --backend sim --save-logits` run

Re-scores every saved generation's candidates (same examples, same subspace, same placement) on
the plaintext back end and reports argmax agreement and logit error over all population x example
predictions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, save


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench agreement")
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from tuning.assets.models import load_model, with_policy
    from tuning.backends import make_backend
    from tuning.loop.scorer import SecureScorer
    from tuning.loop.trainer import TuneConfig, build_subspace, minibatches, split_examples, task_of
    from tuning.policy import load_policy

    run = Path(args.run)
    cfg = TuneConfig(**{**json.loads((run / "config.json").read_text()), "out": str(run)})
    files = sorted((run / "logits").glob("gen*.npz"))
    if not files:
        raise ValueError(f"{run}: no saved logits; run `secptune tune ... --save-logits` first")
    task = task_of(cfg)
    train, dev, _ = split_examples(cfg, task)
    bundle = with_policy(load_model(cfg.model), load_policy(cfg.policy))
    plain = make_backend("plaintext", bundle, load_policy(cfg.policy))
    sub = build_subspace(cfg, bundle, plain.embedding_stats())
    scorer = SecureScorer(plain, bundle, task, cfg.mode, cfg.n_tokens, p0_ids=sub.init_ids, depth=cfg.prompt_depth,
                          form=cfg.prompt_form, calibrate=cfg.calibrate, combine=cfg.combine)
    scorer.add_examples("train", train, minibatches([l for _, l in train], cfg.train_batch, cfg.seed)
                        if cfg.train_batch else None)
    scorer.add_examples("dev", dev)
    agree, errs, n = 0, [], 0
    rows = []
    for f in files:
        d = np.load(f)
        delta = sub.offsets(d["Z"])
        tr = scorer.score("train", delta, [int(c) for c in d["train_chunks"]])
        dv = scorer.score("dev", delta[d["dev_rows"]])
        want = np.concatenate([tr.reshape(-1, tr.shape[-1]), dv.reshape(-1, dv.shape[-1])])
        got = np.concatenate([d["train_logits"].reshape(-1, tr.shape[-1]), d["dev_logits"].reshape(-1, dv.shape[-1])])
        a = int((want.argmax(-1) == got.argmax(-1)).sum())
        agree, n = agree + a, n + len(want)
        errs.append(float(np.abs(want - got).max()))
        diff_err = float(np.abs(np.diff(want, axis=-1) - np.diff(got, axis=-1)).max())  # what CE and argmax see
        rows.append({"generation": f.stem, "predictions": len(want), "argmax agree": round(a / len(want), 4),
                     "max abs logit err": f"{errs[-1]:.2e}", "max abs logit-difference err": f"{diff_err:.2e}"})
    rows.append({"generation": "all", "predictions": n, "argmax agree": round(agree / n, 4),
                 "max abs logit err": f"{max(errs):.2e}",
                 "max abs logit-difference err": f"{max(float(r['max abs logit-difference err']) for r in rows):.2e}"})
    note = (f"\nrun {run} ({cfg.model}, {cfg.policy}, {cfg.backend}, {cfg.mode}, prompt depth {cfg.prompt_depth or 'all'}); "
            "per generation: the candidates x the training examples scored, and the dev rows scored.\n")
    save("agreement_" + run.name, {"rows": rows, "config": dataclasses.asdict(cfg)},
         markdown_table(rows, list(rows[0])) + note, args.out)
