"""What a finished run reports: its summary (summary.json), the measures in it, and its curves.

``summarize`` gathers the run's settings, accuracies (zero-shot and tuned, with a paired
significance test), costs by phase and reveals into one dict; ``project_full_budget`` scales the
measured costs to a BBT-sized budget; ``plot_run`` draws metrics.jsonl. Plaintext, at the data
owner; nothing here touches the back end.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .scorer import CONTENT_FREE


# ----------------------------------------------------------------------------- measures
def wilson(k: int, n: int, z: float = 1.96) -> list:
    """95% Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(c - h), 4), round(float(c + h), 4)]


def paired_test(before: np.ndarray, after: np.ndarray) -> dict:
    """Zero-shot vs tuned on the same test examples: each accuracy's 95% Wilson interval, and the
    exact two-sided McNemar test on the examples only one of them gets right."""
    from math import comb

    n = len(after)
    gained, lost = int(((after == 1) & (before == 0)).sum()), int(((after == 0) & (before == 1)).sum())
    m, k = gained + lost, min(gained, lost)
    p = min(1.0, 2 * sum(comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return {"n": n, "zero_shot_ci95": wilson(int(before.sum()), n), "tuned_ci95": wilson(int(after.sum()), n),
            "gained": gained, "lost": lost, "mcnemar_p": round(p, 4)}


def cost_sum(costs) -> dict:
    """Total wall time, bytes sent (busiest party) and rounds of some secure calls."""
    return {"seconds": round(sum(c.wall_s for c in costs), 2), "bytes": int(sum(c.send_bytes for c in costs)),
            "rounds": int(sum(c.rounds for c in costs))}


def kept_sum(restored: list) -> dict:
    """What the set-up outputs restored from the parties' disks cost when they were computed (the
    session's ledger entries): summed, with how many were priced from the same program's record
    (``estimated``) or not recorded at all (``unknown``, counted as nothing)."""
    known = [r for r in restored if r is not None]
    return {"calls": len(restored), "seconds": round(sum(r["seconds"] for r in known), 2),
            "bytes": int(sum(r["bytes"] for r in known)), "rounds": int(sum(r["rounds"] for r in known)),
            "estimated": sum(1 for r in known if r["estimated"]), "unknown": len(restored) - len(known)}


def job_setup(setup: dict) -> dict:
    """The whole set-up of the job, as if it had run in one go: this session's computed part and
    what its restored outputs cost when computed."""
    kept = setup.get("kept") or {}
    return {k: round(setup[k] + kept.get(k, 0), 2) if k == "seconds" else int(setup[k] + kept.get(k, 0))
            for k in ("seconds", "bytes", "rounds")}


# ------------------------------------------------------------------------------------ summary
def summarize(job, st, extra: dict, final, metrics: list, reveals: tuple, elapsed_s: float) -> dict:
    """The run's summary: ``job`` (trainer.Setup) its settings and set-up, ``st`` (LoopState) the
    search's end, ``extra`` the checkpoint's zero-shot results and sessions, ``final``
    (trainer.FinalEval) the kept prompt's test results, ``metrics`` one dict per generation,
    ``reveals`` the run's and this session's grouped reveals, ``elapsed_s`` the wall time so far."""
    cfg = job.cfg
    summary = {
        **_settings(job), "generations": st.generation, "popsize": cfg.popsize, "shots_per_class": cfg.shots,
        "n_train": len(job.train), "n_dev": len(job.dev), "n_test": len(job.test),
        **_accuracies(job, extra, final),
        "best_dev_acc": st.best_dev, "best_dev_loss": st.best_dev_loss, "best_train_loss": st.best_train_loss,
        "wall_s": {"elapsed_all_sessions": elapsed_s, "sessions": len(extra["setups"])},
        "mpc": _costs(job.cost, st, extra, final, metrics),
        "subspace": {"d": cfg.d, "n_tokens": cfg.n_tokens, "init": job.subspace.init, "A_std": job.subspace.scale},
        "reveals": reveals[0], "reveals_this_session": reveals[1],
    }
    summary["projection"] = project_full_budget(summary, len(job.task.labels))
    return summary


def _settings(job) -> dict:
    """What ran: task, model, policy, back end, placement, prompt and search settings."""
    cfg, scorer = job.cfg, job.scorer
    return {
        "task": cfg.task or cfg.train, "model": cfg.model, "policy": job.policy.name, "protocol": job.policy.protocol,
        "backend": cfg.backend, "placement": cfg.mode, "strategy": cfg.strategy,
        "prompt_depth": scorer.depth, "prompt_form": cfg.prompt_form if scorer.deep else "input",
        "layers": scorer.bundle.config.num_hidden_layers, "train_batch": cfg.train_batch, "dev_eval": cfg.dev_eval,
        "calibrate": cfg.calibrate, "verbalizer": {l: job.task.verbalizer[l] for l in job.task.labels},
        "content_free_rows_per_call": len(CONTENT_FREE) if cfg.calibrate == "cf" else 0,
        "rows_per_generation": rows_per_generation(cfg.popsize, len(job.train), len(job.dev), cfg.train_batch,
                                                   cfg.dev_eval),
    }


def _accuracies(job, extra: dict, final) -> dict:
    """Zero-shot and tuned test accuracy (the head's, under --head fit; the verbalizer's too), and
    the tuned prompt against zero-shot on the same examples."""
    cfg = job.cfg
    return {
        "zero_shot_test_acc": extra["zero_shot_test_acc"], "tuned_test_acc": float(final.correct.mean()),
        "tuned_words_test_acc": float(final.words_correct.mean()), "select": cfg.select, "head": cfg.head,
        "objective": cfg.objective, "fitted_head": _fitted_head(job, extra, final),
        "test_significance": paired_test(np.asarray(extra["zero_shot_correct"]), final.correct),
    }


def _fitted_head(job, extra: dict, final) -> dict | None:
    """--head fit: the head refitted at the kept prompt, against the head fitted at P0."""
    if final.head is None:
        return None
    groups = job.scorer.word_groups
    return {"words": int(len(groups)), "probe_words": int((groups < 0).sum()), "c": final.head.c,
            "zero_shot_c": extra["zero_shot_head_c"], "extra_rows_final": len(job.train) + len(job.dev),
            "zero_shot_head_test_acc": extra["zero_shot_head_test_acc"],
            "test_significance_vs_zero_shot_head": paired_test(np.asarray(extra["zero_shot_head_correct"]),
                                                               final.correct)}


def _costs(setup: dict, st, extra: dict, final, metrics: list) -> dict:
    """MPC cost by phase: this session's set-up and every session's, the zero-shot evaluation,
    the generations (total and median per generation) and the final evaluation."""
    per_gen = {k: float(np.median([g[k] for g in metrics])) if metrics else 0.0
               for k in ("mpc_s", "mpc_bytes", "mpc_rounds")}
    return {"setup": setup, "setup_job": job_setup(setup),
            "setup_all_sessions": {k: sum(c[k] for c in extra["setups"]) for k in ("seconds", "bytes", "rounds")},
            "zero_shot_eval": extra["zero_shot_cost"],
            "generations_total": {"seconds": round(st.mpc_seconds, 2), "bytes": st.mpc_bytes},
            "per_generation_median": per_gen, "final_eval": final.cost}


# -------------------------------------------------------------------------------- projection
FULL_BUDGET = {"popsize": 20, "shots_per_class": 16, "generations": 100, "n_test": 200}


def rows_per_generation(popsize: int, n_train: int, n_dev: int, train_batch: int, dev_eval: str) -> int:
    """Candidate x example rows one generation scores (the population and its mean)."""
    return (popsize + 1) * min(train_batch or n_train, n_train) + (popsize + 1 if dev_eval == "all" else 1) * n_dev


def project_full_budget(summary: dict, n_labels: int, full: dict = FULL_BUDGET) -> dict:
    """What the same job (same placement, depth, mini-batch and dev scoring) would cost at a
    BBT-sized budget, from this run's measured costs, set-up and evaluations included:

    - a generation's secure work is proportional to the candidate x example rows it scores (the
      prompt and tail lengths are unchanged): scaled by :func:`rows_per_generation`;
    - set-up (prefill of every example set) in the number of examples, the zero-shot and final
      test evaluations in the number of test examples."""
    m, per = summary["mpc"], summary["mpc"]["per_generation_median"]
    b, dev_eval = summary.get("train_batch", 0), summary.get("dev_eval", "all")
    k = full["shots_per_class"] * n_labels
    row_scale = (rows_per_generation(full["popsize"], k, k, b, dev_eval)
                 / max(rows_per_generation(summary["popsize"], summary["n_train"], summary["n_dev"], b, dev_eval), 1))
    ex_scale = (2 * k + full["n_test"]) / max(summary["n_train"] + summary["n_dev"] + summary["n_test"], 1)
    test_scale = full["n_test"] / max(summary["n_test"], 1)
    parts = {"setup": (m.get("setup_job", m["setup"]), ex_scale),  # a resumed run's kept outputs too
             "zero_shot_eval": (m["zero_shot_eval"], test_scale), "final_eval": (m["final_eval"], test_scale)}
    out = {"assumes": dict(full), "scale_per_generation": round(row_scale, 2)}
    for unit, key in (("seconds", "mpc_s"), ("bytes", "mpc_bytes")):
        gens = per[key] * row_scale * full["generations"]
        fixed = {name: c[unit] * sc for name, (c, sc) in parts.items()}
        out[unit] = round(gens + sum(fixed.values()), 1) if unit == "seconds" else int(gens + sum(fixed.values()))
        out[f"{unit}_generations"] = round(gens, 1) if unit == "seconds" else int(gens)
    out["note"] = ("generations linear in candidate x example rows; set-up (prefill) linear in examples, "
                   "test evaluations in test examples; sharing the weights not included")
    return out


# ------------------------------------------------------------------------------------ curves
def plot_run(metrics: list, path: Path) -> None:
    """Loss, dev accuracy and MPC cost per generation (curves.png), from metrics.jsonl's dicts."""
    if not metrics:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [m["generation"] for m in metrics]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.8))
    ax[0].plot(g, [m["loss_best"] for m in metrics], label="best")
    ax[0].plot(g, [m["loss_mean"] for m in metrics], label="mean")
    ax[0].set(title="train loss", xlabel="generation")
    ax[0].legend()
    if metrics[0].get("dev_acc_of_best_loss") is not None:
        ax[1].plot(g, [m["dev_acc_of_best_loss"] for m in metrics], label="best-loss candidate")
    ax[1].plot(g, [m["dev_acc_of_mean"] for m in metrics], label="search mean")
    ax[1].plot(g, [m["best_dev_so_far"] for m in metrics], label="kept prompt (lowest dev loss)")
    ax[1].set(title="dev accuracy", xlabel="generation", ylim=(0, 1.05))
    ax[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax[2].bar(g, [m["mpc_s"] for m in metrics])
    ax2 = ax[2].twinx()
    ax2.plot(g, [m["mpc_bytes"] / 1e6 for m in metrics], color="C1")
    ax[2].set(title="MPC cost per generation", xlabel="generation", ylabel="seconds")
    ax2.set_ylabel("MB sent", color="C1")
    ax2.set_ylim(bottom=0)
    ax[2].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
