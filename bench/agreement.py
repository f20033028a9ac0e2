"""Do the logits opened from MPC match the plaintext programs on the same candidates?

    secptune bench agreement --run DIR     # DIR: a `secptune tune --backend sim --save-logits` run

Re-scores every saved generation's candidates (same examples, same subspace, same placement) on
the plaintext back end and reports argmax agreement and logit error over all population x example
predictions.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.common import RESULTS, markdown_table, rescorer, save


def _row(name, n, agree, err, diffs):
    """A table row; ``diffs``: each prediction's largest logit-difference error."""
    return {"generation": name, "predictions": n, "argmax agree": round(agree / n, 4),
            "max abs logit err": f"{err:.2e}", "max abs logit-difference err": f"{diffs.max():.2e}",
            "median / p99 logit-difference err": f"{np.median(diffs):.1e} / {np.quantile(diffs, 0.99):.1e}",
            "predictions over 0.05": int((diffs > 0.05).sum())}


def main(argv=None):
    from tuning.data_owner.rundir import RunDir
    from tuning.data_owner.trainer import score_candidates

    ap = argparse.ArgumentParser(prog="secptune bench agreement")
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    run = RunDir(args.run)
    files = run.generation_logits()
    if not files:
        raise ValueError(f"{run.path}: no saved logits; run `secptune tune ... --save-logits` first")
    r = rescorer(run.path)
    cfg = r.cfg
    agree, errs, diffs, n = 0, [], [], 0
    rows = []
    for f in files:
        d = np.load(f)
        # the generation's candidates on its own training chunks and dev rows, read as its search read them
        tr, dv, _ = score_candidates(r.scorer, r.objective, r.subspace.offsets(d["Z"]),
                                     [int(c) for c in d["train_chunks"]], d["dev_rows"])
        want = np.concatenate([tr.reshape(-1, tr.shape[-1]), dv.reshape(-1, dv.shape[-1])])
        got = np.concatenate([d["train_logits"].reshape(-1, tr.shape[-1]), d["dev_logits"].reshape(-1, dv.shape[-1])])
        a = int((want.argmax(-1) == got.argmax(-1)).sum())
        agree, n = agree + a, n + len(want)
        errs.append(float(np.abs(want - got).max()))
        diffs.append(np.abs(np.diff(want, axis=-1) - np.diff(got, axis=-1)).max(-1))  # what CE and argmax see
        rows.append(_row(f.stem, len(want), a, errs[-1], diffs[-1]))
    rows.append(_row("all", n, agree, max(errs), np.concatenate(diffs)))
    note = (f"\nrun {run.path} ({cfg.model}, {cfg.policy}, {cfg.backend}, {cfg.mode}, prompt depth {cfg.prompt_depth or 'all'}); "
            "per generation: the candidates x the training examples scored, and the dev rows scored.\n")
    save("agreement_" + run.path.name, {"rows": rows, "config": cfg.flat()},
         markdown_table(rows, list(rows[0])) + note, args.out)
