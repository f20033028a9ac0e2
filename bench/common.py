"""Shared output helpers for benchmarks: markdown tables, JSON and PNG into bench/results/."""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import jax
    import spu

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(), "spu": spu.__version__, "jax": jax.__version__}


def tag_suffix(tag: str) -> str:
    """--tag as a file-name suffix: 'x' and '_x' both give '_x' (a bare tag used to glue onto the name)."""
    return tag if not tag or tag.startswith("_") else "_" + tag


@dataclasses.dataclass(frozen=True)
class Rescored:
    """A finished run's scorer rebuilt on the plaintext back end (``rescorer``)."""
    cfg: object  # the run's TuneConfig
    subspace: object
    scorer: object  # SecureScorer; train and dev shared (and test, with zero_shot)
    test: list  # the run's test examples
    objective: object  # what the run's search read from the opened word logits (loop.objective)


def rescorer(run: Path, zero_shot: bool = False) -> Rescored:
    """A finished tuning run's secure scorer rebuilt on the plaintext back end (the programs SPU
    runs): its config, subspace and scorer (probe words too, for a ``--head fit`` run), its train
    and dev sets shared as the run shared them (``zero_shot``: with P0's logits, and the test set
    too), and its objective, built as tune built it (an ``--objective head`` run's P0 head comes
    from its checkpoint), so that scores read through it are the ones its search read."""
    from tuning.model_owner.models import load_model, with_policy
    from tuning.transports import make_backend
    from tuning.data_owner.config import load_run_config
    from tuning.data_owner.rundir import RunDir
    from tuning.data_owner.trainer import (build_subspace, load_checkpoint, make_objective, make_scorer,
                                           split_examples, strategy_of, task_of, train_groups)
    from tuning.policy import load_policy

    cfg = load_run_config(run, "--run")
    task = task_of(cfg)
    train, dev, test = split_examples(cfg, task)
    policy = load_policy(cfg.policy)
    bundle = with_policy(load_model(cfg.model), policy)
    plain = make_backend("plaintext", bundle, policy)
    if cfg.backend != "plaintext":
        from tuning.transports.session import Session

        # an SPU run's chunks (16 texts) and padding (multiples of 16): its saved chunk ids then name
        # the same rows, and every program sees the shapes the parties saw
        plain.chunk, plain.pad_multiple = Session.chunk, Session.pad_multiple
    sub = build_subspace(cfg, bundle, plain.embedding_stats())
    sc = make_scorer(cfg, task, train, plain, bundle, sub)
    sc.add_examples("train", train, train_groups(cfg, train), zero_shot=zero_shot)
    sc.add_examples("dev", dev, zero_shot=zero_shot)
    if zero_shot:
        sc.add_examples("test", test, zero_shot=True)
    # only a head objective reads the checkpoint (the P0 head its search read)
    extra = {} if cfg.objective == "words" else load_checkpoint(RunDir(run).checkpoint_path, strategy_of(cfg),
                                                                  None, cfg.d)[1]
    return Rescored(cfg, sub, sc, test, make_objective(cfg, sc, extra))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def save(name: str, payload: dict, table: str, out_dir: Path | None = None) -> Path:
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), **payload}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(table)
    print(table)
    print(f"saved {out / name}.json / .md")
    return out
