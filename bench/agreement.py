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
    from tuning.loop.trainer import TuneConfig, _examples, _load_task, build_subspace
    from tuning.policy import load_policy

    run = Path(args.run)
    cfg = TuneConfig(**{**json.loads((run / "config.json").read_text()), "out": str(run)})
    files = sorted((run / "logits").glob("gen*.npz"))
    if not files:
        raise ValueError(f"{run}: no saved logits; run `secptune tune ... --save-logits` first")
    task = _load_task(cfg)
    train, dev, _ = _examples(cfg, task)
    bundle = with_policy(load_model(cfg.model), load_policy(cfg.policy))
    plain = make_backend("plaintext", bundle, load_policy(cfg.policy))
    sub = build_subspace(cfg, bundle, plain.embedding_stats())
    scorer = SecureScorer(plain, bundle, task, cfg.mode, cfg.n_tokens, p0_ids=sub.init_ids)
    scorer.add_examples("train+dev", train + dev)
    agree, errs, n = 0, [], 0
    rows = []
    for f in files:
        d = np.load(f)
        want = scorer.score("train+dev", sub.offsets(d["Z"]))
        got = d["logits"]
        a = int((want.argmax(-1) == got.argmax(-1)).sum())
        agree, n = agree + a, n + want[..., 0].size
        errs.append(float(np.abs(want - got).max()))
        rows.append({"generation": f.stem, "predictions": want[..., 0].size, "argmax agree": round(a / want[..., 0].size, 4),
                     "max abs logit err": f"{errs[-1]:.2e}"})
    rows.append({"generation": "all", "predictions": n, "argmax agree": round(agree / n, 4),
                 "max abs logit err": f"{max(errs):.2e}"})
    note = f"\nrun {run} ({cfg.model}, {cfg.policy}, {cfg.backend}, {cfg.mode}); population x (train + dev) per generation.\n"
    save("agreement_" + run.name, {"rows": rows, "config": dataclasses.asdict(cfg)},
         markdown_table(rows, list(rows[0])) + note, args.out)
