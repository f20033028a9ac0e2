"""The real job, measured: one tuning run through SPU beside the plaintext run of the same seed.

    secptune bench job --spu runs/real_mr --plain runs/real_mr_plain [--tag _mr]

Both are ordinary ``secptune tune`` run directories with the same settings except the back end
(the SPU one usually ``--backend sim``, resumed as often as needed). The table gives the SPU run's
wall time (all sessions), its MPC time, bytes and rounds by phase (set-up of every session,
zero-shot evaluation, generations, final evaluation), and both runs' zero-shot and tuned test
accuracy, their agreement per test example, and the search path: the generation-by-generation
training losses of the two runs, which differ only by fixed-point noise in the opened logits.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import RESULTS, markdown_table, save, tag_suffix

SAME = ("task", "model", "policy", "shots", "popsize", "budget", "n_test", "seed", "prompt_depth", "prompt_form",
        "train_batch", "dev_eval", "calibrate", "init", "d", "strategy", "verbalizer", "head", "objective", "select")


def agreement(spu: Path, plain: Path) -> dict | None:
    """The two runs' reported test predictions compared example by example (``--save-logits``
    keeps them in logits/test_tuned.npz), or None when either run did not keep them."""
    paths = [Path(r, "logits", "test_tuned.npz") for r in (spu, plain)]
    if not all(p.exists() for p in paths):
        return None
    a, b = (np.load(p) for p in paths)
    if "predictions" not in a or "predictions" not in b or not np.array_equal(a["labels"], b["labels"]):
        return None
    same = a["predictions"] == b["predictions"]
    return {"equal": int(same.sum()), "n": int(same.size), "fraction": float(same.mean()),
            "differ_at": np.flatnonzero(~same).tolist()}


def _load(run: Path):
    """A finished run's stored settings, summary and per-generation metrics."""
    from tuning.data_owner.rundir import RunDir

    d = RunDir(run)
    summary = d.read_summary()
    if summary is None:
        raise ValueError(f"{run}: no {d.summary_path.name}; the run is unfinished")
    return d.read_config(), summary, d.read_metrics()


def setup_row(mpc: dict) -> dict:
    """The job's set-up (sharing the examples, prefill) as if run in one go: what the last process
    computed plus what the outputs it restored cost when an earlier process computed them (the
    run's ledger); a run without a ledger: the set-up of every session that reached the search."""
    if "setup_job" not in mpc:
        c, kept = mpc["setup_all_sessions"], {}
    else:
        c, kept = mpc["setup_job"], mpc["setup"].get("kept") or {}
    phase = "set-up (sharing, prefill)"
    if kept.get("calls"):
        phase += f", {kept['calls']} outputs kept by earlier processes"
        if kept.get("estimated") or kept.get("unknown"):
            phase += (f" ({kept['estimated']} priced from the same program's record, "
                      f"{kept['unknown']} unrecorded: counted as 0)")
    return {"phase": phase, "MPC s": c["seconds"], "GB": round(c["bytes"] / 1e9, 2), "rounds": c["rounds"]}


def projection_check(demo: dict, job: dict, measured: dict) -> dict:
    """What a small run's linear projection (``secptune tune``'s "at full budget" line, e.g. the
    demo's part 1) says this job costs, at this job's popsize, shots, generations and test set,
    against the job's measured MPC seconds and bytes (``measured``: the total row)."""
    from tuning.data_owner.report import project_full_budget

    full = {k: job[k] for k in ("popsize", "shots_per_class", "generations", "n_test")}
    pr = project_full_budget(demo, job["n_train"] // job["shots_per_class"], full)
    return {"projected": {"seconds": pr["seconds"], "bytes": pr["bytes"]},
            "measured": {"seconds": measured["MPC s"], "bytes": int(measured["GB"] * 1e9)},
            "ratio": {"seconds": round(pr["seconds"] / max(measured["MPC s"], 1e-9), 3),
                      "bytes": round(pr["bytes"] / max(measured["GB"] * 1e9, 1), 3)}}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="secptune bench job")
    ap.add_argument("--spu", required=True, help="the run through SPU (sim or cluster back end)")
    ap.add_argument("--plain", required=True, help="the same run on the plaintext back end")
    ap.add_argument("--demo", help="a small run of the same configuration (the demo's part 1): its projection checked")
    ap.add_argument("--tag", default="", type=tag_suffix)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    (cs, ss, ms), (cp, sp, mp) = _load(Path(args.spu)), _load(Path(args.plain))
    differ = [k for k in SAME if cs.get(k) != cp.get(k)]
    if differ:
        raise ValueError(f"the runs differ in {', '.join(differ)}: not the same job")
    mpc = ss["mpc"]
    gen = mpc["generations_total"]
    rows = [
        setup_row(mpc),
        {"phase": "zero-shot test evaluation", "MPC s": mpc["zero_shot_eval"]["seconds"],
         "GB": round(mpc["zero_shot_eval"]["bytes"] / 1e9, 2), "rounds": mpc["zero_shot_eval"]["rounds"]},
        {"phase": f"{ss['generations']} generations", "MPC s": gen["seconds"], "GB": round(gen["bytes"] / 1e9, 2),
         "rounds": int(sum(m["mpc_rounds"] for m in ms))},
        {"phase": "tuned test evaluation", "MPC s": mpc["final_eval"]["seconds"],
         "GB": round(mpc["final_eval"]["bytes"] / 1e9, 2), "rounds": mpc["final_eval"]["rounds"]},
    ]
    total = {"phase": "total MPC", "MPC s": round(sum(r["MPC s"] for r in rows), 1),
             "GB": round(sum(r["GB"] for r in rows), 2), "rounds": int(sum(r["rounds"] for r in rows))}
    rows.append(total)
    path = np.array([m["loss_best"] for m in ms]), np.array([m["loss_best"] for m in mp])
    n = min(len(path[0]), len(path[1]))
    acc = [{"run": "SPU (" + ss["backend"] + ")", "zero-shot": ss["zero_shot_test_acc"], "tuned": ss["tuned_test_acc"],
            "McNemar p (tuned vs zero-shot)": ss["test_significance"]["mcnemar_p"]},
           {"run": "plaintext", "zero-shot": sp["zero_shot_test_acc"], "tuned": sp["tuned_test_acc"],
            "McNemar p (tuned vs zero-shot)": sp["test_significance"]["mcnemar_p"]}]
    agree = agreement(Path(args.spu), Path(args.plain))
    table = markdown_table(rows, list(rows[0])) + "\n" + markdown_table(acc, list(acc[0]))
    if agree:
        table += (f"\nTuned test predictions equal on {agree['equal']} of {agree['n']} examples "
                  f"({100 * agree['fraction']:.1f}%).\n")
    check = None
    if args.demo:
        check = projection_check(_load(Path(args.demo))[1], ss, total)
        pj, got = check["projected"], check["measured"]
        table += (f"\nProjection from {args.demo} at this job's budget: {pj['seconds'] / 3600:.2f} h and "
                  f"{pj['bytes'] / 1e12:.3f} TB of MPC against {got['seconds'] / 3600:.2f} h "
                  f"and {got['bytes'] / 1e12:.3f} TB measured (ratio {check['ratio']['seconds']:.2f} in "
                  f"time, {check['ratio']['bytes']:.2f} in bytes).\n")
    wall = ss["wall_s"]["elapsed_all_sessions"]
    table += (f"\nSPU run {args.spu}: {cs['task']}, {cs['shots']}-shot per class ({ss['n_train']} train + {ss['n_dev']} dev), "
              f"{ss['n_test']} test examples, policy {ss['policy']}, prompt depth {ss['prompt_depth']} "
              f"({ss['prompt_form']}), mini-batch {ss['train_batch'] or 'all'}, dev: {ss['dev_eval']}, popsize "
              f"{ss['popsize']}, {ss['generations']} generations ({ss['rows_per_generation']} rows each). Wall time "
              f"of the whole job here: {wall / 3600:.2f} h over {ss['wall_s']['sessions']} session(s) "
              f"(compilation included). Test accuracy: SPU {ss['tuned_test_acc']:.3f} vs plaintext "
              f"{sp['tuned_test_acc']:.3f} ({100 * (ss['tuned_test_acc'] - sp['tuned_test_acc']):+.1f} points). "
              f"Search path: best training loss per generation agrees to "
              f"{np.abs(path[0][:n] - path[1][:n]).max():.2e} over {n} generations.\n")
    name = f"job{args.tag}"
    save(name, {"rows": rows, "accuracy": acc, "agreement": agree, "projection_check": check, "wall_s": wall,
                "spu_summary": ss, "plain_summary": sp,
                "loss_best": {"spu": path[0].tolist(), "plain": path[1].tolist()}, "args": vars(args)}, table, args.out)
    _plot(ms, mp, Path(args.out) / f"{name}.png")


def _plot(ms, mp, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for m, label in ((ms, "SPU"), (mp, "plaintext")):
        g = [x["generation"] for x in m]
        ax[0].plot(g, [x["loss_best"] for x in m], label=label)
        ax[1].plot(g, [x["dev_acc_of_mean"] for x in m], label=label)
    ax[0].set(xlabel="generation", ylabel="best training loss")
    ax[1].set(xlabel="generation", ylabel="dev accuracy of the search mean", ylim=(0, 1.05))
    for a in ax:
        a.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
