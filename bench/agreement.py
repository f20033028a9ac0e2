"""Do the logits opened from MPC match the plaintext programs on the same candidates?

    secptune bench agreement --run DIR     # DIR: a `secptune tune --backend sim --save-logits` run

Re-scores every saved generation's candidates (same examples, same subspace, same placement) on
the plaintext back end and reports argmax agreement and logit error over all population x example
predictions.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, rescorer, save


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench agreement")
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    run = Path(args.run)
    files = sorted((run / "logits").glob("gen*.npz"))
    if not files:
        raise ValueError(f"{run}: no saved logits; run `secptune tune ... --save-logits` first")
    cfg, sub, scorer, _ = rescorer(run)
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
