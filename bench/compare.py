"""Paired comparison of two tuned variants across seeds: is B within a margin of A?

    secptune bench compare --a accuracy_mr_cached_plaintext_cma_text_25gen,accuracy_mr_..._text25 \\
                           --b accuracy_mr_cached_plaintext_cma_text_learned32w16 \\
                           --a-name softmax --b-name "window m=32 W=16" [--margin 0.01] [--tag _w16]

``--a`` / ``--b`` name ``bench accuracy`` tables (JSON in bench/results/, or paths); several
tables of one variant are merged by seed (a seed in two of them is an error). Seeds in both
variants are paired: each seed fixes the data split, the subspace A and the search's randomness,
so B - A per seed removes the split's difficulty from the comparison.

For each metric (tuned and zero-shot test accuracy; ``--pairs`` pairs other columns, e.g.
``--pairs "tuned:tuned,zero-shot:zero-shot head"`` reads A's zero-shot against B's zero-shot
with a fitted head) it reports the per-seed differences, their
mean, standard deviation and 95% t interval, and reads the interval against ``--margin``:
``within`` (the whole interval is above -margin: B loses less than the margin),
``worse`` (the whole interval is below -margin) or ``unresolved``; with the observed spread, the
number of seeds whose interval would be no wider than +-margin. Nothing here is tuned or timed;
it reads finished runs.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix

PAIRS = "tuned:tuned,zero-shot:zero-shot"


def parse_pairs(spec: str) -> list:
    """'a:b,c:d' -> [(a, b), (c, d)]: the column of A read against the column of B."""
    out = []
    for item in [x for x in spec.split(",") if x.strip()]:
        a, sep, b = item.partition(":")
        if not sep or not a.strip() or not b.strip():
            raise ValueError(f"--pairs entry {item!r}: expected A_COLUMN:B_COLUMN")
        out.append((a.strip(), b.strip()))
    return out


def label(pair: tuple) -> str:
    return pair[0] if pair[0] == pair[1] else f"{pair[0]} / {pair[1]}"


def load_rows(names: str, results: Path = RESULTS) -> tuple[dict, list]:
    """Seed -> row over the comma-separated tables; also the tables' args (for the caption)."""
    by_seed, args = {}, []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        path = Path(name)
        if not path.suffix:
            path = results / f"{name}.json"
        if not path.exists():
            raise ValueError(f"no accuracy table {path}")
        table = json.loads(path.read_text())
        if "rows" not in table:
            raise ValueError(f"{path} is not a `bench accuracy` table (it has no per-seed rows)")
        args.append(table.get("args", {}))
        for row in table["rows"]:
            if row["seed"] in by_seed:
                raise ValueError(f"seed {row['seed']} is in two tables of one variant ({path})")
            by_seed[row["seed"]] = row
    if not by_seed:
        raise ValueError(f"no rows in {names!r}")
    return by_seed, args


def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, df))


def paired(a: np.ndarray, b: np.ndarray, margin: float) -> dict:
    """B - A per seed: mean, sd, 95% t interval, the verdict against -margin, seeds needed."""
    d = b - a
    n = len(d)
    out = {"n": n, "mean_diff": float(d.mean()), "diffs": [float(x) for x in d]}
    if n < 2:
        return {**out, "sd": float("nan"), "ci95": [float("nan")] * 2, "verdict": "unresolved (1 seed)",
                "seeds_for_margin": None}
    sd = float(d.std(ddof=1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    lo, hi = float(d.mean() - half), float(d.mean() + half)
    verdict = "within" if lo > -margin else "worse" if hi < -margin else "unresolved"
    need = None
    if sd > 0:  # smallest k whose 95% half-width t_{k-1} sd / sqrt(k) is at most the margin
        k = 2
        while t_quantile(k - 1) * sd / math.sqrt(k) > margin and k < 100000:
            k += 1
        need = k
    return {**out, "sd": sd, "ci95": [lo, hi], "verdict": verdict, "seeds_for_margin": need}


def plot(a_rows: dict, b_rows: dict, seeds: list, names: tuple, path: Path, pairs: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), sharey=True, squeeze=False)
    for ax, (ca, cb) in zip(axes[0], pairs):
        for s in seeds:
            ax.plot([0, 1], [a_rows[s][ca], b_rows[s][cb]], "o-", color="0.6", lw=1)
            ax.annotate(f"s{s}", (1.03, b_rows[s][cb]), fontsize=7, va="center")
        ax.plot([0, 1], [np.mean([a_rows[s][ca] for s in seeds]), np.mean([b_rows[s][cb] for s in seeds])],
                "s-", color="C3", lw=2, label="mean")
        ax.set_xticks([0, 1], names)
        ax.set_xlim(-0.3, 1.3)
        ax.set_title(f"{label((ca, cb))} test accuracy", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench compare")
    ap.add_argument("--a", required=True, help="variant A: accuracy table name(s), comma-separated")
    ap.add_argument("--b", required=True, help="variant B: accuracy table name(s), comma-separated")
    ap.add_argument("--a-name", default="A")
    ap.add_argument("--b-name", default="B")
    ap.add_argument("--margin", type=float, default=0.01, help="allowed loss of B against A (accuracy, 0.01 = 1 point)")
    ap.add_argument("--vary", default="", help="a setting the two variants may differ in (the one compared), "
                                               "e.g. budget")
    ap.add_argument("--pairs", default=PAIRS, help="A_COLUMN:B_COLUMN,... the columns read against each other")
    ap.add_argument("--tag", default="", type=tag_suffix)
    ap.add_argument("--results", default=str(RESULTS), help="where the accuracy tables are")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.margin < 0:
        raise ValueError("--margin must be >= 0")

    pairs = parse_pairs(args.pairs)
    a_rows, a_args = load_rows(args.a, Path(args.results))
    b_rows, b_args = load_rows(args.b, Path(args.results))
    seeds = sorted(set(a_rows) & set(b_rows))
    if len(seeds) < 2:
        raise ValueError(f"the variants share {len(seeds)} seed(s) ({seeds}); a paired comparison needs >= 2")
    for key in [k for k in ("task", "shots", "popsize", "budget", "n_test", "init") if k != args.vary]:
        va, vb = {x.get(key) for x in a_args}, {x.get(key) for x in b_args}
        if len(va | vb) > 1:
            raise ValueError(f"the tables differ in {key}: {sorted(map(str, va | vb))}; they are not comparable")

    for ca, cb in pairs:
        if any(ca not in a_rows[s] for s in seeds) or any(cb not in b_rows[s] for s in seeds):
            raise ValueError(f"column {ca!r} (A) or {cb!r} (B) is missing from a seed's row")
    rows, stats = [], {}
    for s in seeds:
        rows.append({"seed": s, **{f"{ca} {args.a_name}": a_rows[s][ca] for ca, _ in pairs},
                     **{f"{cb} {args.b_name}": b_rows[s][cb] for _, cb in pairs},
                     **{f"{label(p)} B-A": round(b_rows[s][p[1]] - a_rows[s][p[0]], 3) for p in pairs}})
    for p in pairs:
        stats[label(p)] = paired(np.array([a_rows[s][p[0]] for s in seeds]), np.array([b_rows[s][p[1]] for s in seeds]),
                                 args.margin)
    cols = list(rows[0])
    mean = {"seed": "mean", **{c: round(float(np.mean([r[c] for r in rows])), 3) for c in cols[1:]}}
    table = markdown_table(rows + [mean], cols)
    table += "\n| metric | seeds | mean B-A (points) | sd | 95% interval | vs -margin | seeds for +-margin |\n" \
             "|---|---|---|---|---|---|---|\n"
    for m, st in stats.items():
        lo, hi = st["ci95"]
        table += (f"| {m} | {st['n']} | {100 * st['mean_diff']:+.1f} | {100 * st['sd']:.1f} | "
                  f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {st['verdict']} | {st['seeds_for_margin']} |\n")
    a0 = a_args[0]
    table += (f"\nA = {args.a_name} ({args.a}); B = {args.b_name} ({args.b}). {a0.get('task')}, "
              f"{a0.get('shots')}-shot per class, popsize {a0.get('popsize')} x {a0.get('budget')} generations, "
              f"{a0.get('n_test')} test examples"
              + (f" ({args.vary}: A {a_args[0].get(args.vary)}, B {b_args[0].get(args.vary)})" if args.vary else "")
              + f"; margin {100 * args.margin:g} point(s). Paired by seed "
              f"(same split, subspace and search seed); t interval over the per-seed differences.\n")
    name = f"compare_{a0.get('task')}{args.tag}"
    out = save(name, {"a": {"name": args.a_name, "tables": args.a}, "b": {"name": args.b_name, "tables": args.b},
                      "margin": args.margin, "rows": rows, "stats": stats, "args": vars(args)}, table, args.out)
    plot(a_rows, b_rows, seeds, (args.a_name, args.b_name), out / f"{name}.png", pairs)
    print(f"saved {out / name}.png")


if __name__ == "__main__":
    main()
