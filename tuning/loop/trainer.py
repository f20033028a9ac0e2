"""Forward-only prompt tuning: the data owner's loop against the secure scorer.

One generation (``run_generation``), top to bottom:
  1. ask the search strategy for a population z_1..z_P;
  2. the data owner maps them to soft prompts A.z (plaintext, private) and secret-shares them;
     one secure program scores the whole population x (train + dev examples);
  3. only the verbalizer logits are opened, and only to the data owner;
  4. the data owner computes the loss (and dev accuracy) in plaintext;
  5. tell the strategy the losses.
The compute parties never see labels, losses, z, A or the plaintext prompt.

``tune`` wraps it with set-up (sharing examples, prefilling caches, zero-shot evaluation), early
stopping on dev accuracy, a checkpoint after every generation, ``--resume``, metrics, plots and a
summary.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from ..assets.tasks import kshot, load_task, load_user_task, split_dev, with_label_words
from ..backends import open_backend
from ..backends.session import group_reveals
from ..errors import UserError
from ..policy import load_policy
from . import head as fitted
from .objective import Objective, frozen_head, refit_head, verbalizer
from .scorer import CONTENT_FREE, SecureScorer, delta_shape
from .search import make_strategy
from .subspace import subspace_from_stats

LOSSES = ("ce", "hinge")
DEV_EVAL = ("all", "mean")
HEADS = ("words", "fit")
OBJECTIVES = ("words", "head", "refit")
SELECT = ("dev-loss", "final-mean")


@dataclasses.dataclass
class TuneConfig:
    model: str = "smollm2-135m"
    policy: str = "aby3"
    backend: str = "sim"
    task: str | None = "mr"
    train: str | None = None
    test: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    verbalizer: str = "positive=great,negative=terrible"
    template: str | None = None
    shots: int = 16  # per class, for training; the same number again per class for dev
    dev_shots: int | None = None  # per class for dev (default: = shots)
    n_test: int = 200  # test examples evaluated (stratified prefix of the shuffled test split)
    max_words: int | None = None  # truncate texts (None: the task's default)
    popsize: int = 20
    budget: int = 100  # generations
    strategy: str = "cma"
    sigma0: float = 1.0
    d: int = 500
    n_tokens: int = 5
    init: str = "vocab"  # "vocab" (sampled token embeddings) or "text:<words>" (n_tokens := their count)
    mode: str = "cached"
    prompt_depth: int | None = None  # K: the prompt enters the top K layers only (None: all, at the input)
    prompt_form: str = "kv"  # deep prompt: "kv" (key/value prefixes) or "hidden" (states entering layer L-K)
    train_batch: int = 0  # training examples scored per generation (a stratified mini-batch; 0: all)
    dev_eval: str = "all"  # candidates scored on dev each generation: "all" or "mean" (the search mean)
    label_words: str | None = None  # label=word|word,... : several verbalizer words per class (any task)
    combine: str = "lse"  # how a class's words combine: "lse" (log-sum-exp) or "mean"
    calibrate: str = "none"  # "cf" (content-free rows), "batch" (the scored examples' mean) or "none"
    loss: str = "ce"
    head: str = "words"  # "words": the verbalizer's words; "fit": a head fitted over them and probe words
    probe_words: str | None = None  # comma-separated words for --head fit (default: the task's pool)
    objective: str = "words"  # the search minimises the CE of: "words" (the verbalizer), "head" (the P0 head)
    #                           or "refit" (each candidate's own head, k-fold held out; see loop.objective)
    select: str = "dev-loss"  # the prompt kept: "dev-loss" (lowest dev CE seen) or "final-mean" (the search's)
    patience: int = 0  # stop after this many generations without a dev improvement (0: never)
    save_logits: bool = False  # keep each generation's candidates and opened logits (data owner's files)
    seed: int = 0
    out: str = "runs/tune"


# ---------------------------------------------------------------------------------------- losses
def losses_from_logits(logits: np.ndarray, labels: np.ndarray, kind: str = "ce") -> np.ndarray:
    """Per-candidate mean loss: logits [P, E, R], labels [E] -> [P] (plaintext, data owner)."""
    z = logits - logits.max(-1, keepdims=True)
    if kind == "ce":
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -logp[:, np.arange(len(labels)), labels].mean(-1)
    if kind == "hinge":  # BBT-style multi-class margin loss, margin 1
        true = logits[:, np.arange(len(labels)), labels]
        other = np.where(np.eye(logits.shape[-1], dtype=bool)[labels][None], -np.inf, logits).max(-1)
        return np.maximum(0.0, 1.0 - (true - other)).mean(-1)
    raise UserError(f"unknown loss {kind!r} (known: {', '.join(LOSSES)})")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-candidate accuracy: [P, E, R], [E] -> [P]."""
    return (logits.argmax(-1) == labels[None]).mean(-1)


# ------------------------------------------------------------------------------------ generation
@dataclasses.dataclass
class LoopState:
    search: object  # the strategy's state
    generation: int = 0
    best_z: np.ndarray | None = None
    best_dev: float = -1.0  # dev accuracy of the selected candidate
    best_dev_loss: float = float("inf")  # its dev cross-entropy (the selection criterion)
    best_train_loss: float = float("inf")
    since_best: int = 0
    mpc_seconds: float = 0.0
    mpc_bytes: int = 0


def run_generation(st: LoopState, strategy, subspace, scorer, cfg: TuneConfig,
                   objective: Objective | None = None) -> tuple[LoopState, dict]:
    """One generation of forward-only tuning. Returns the new state and its metrics (with the
    candidates and opened logits under ``_Z`` / ``_logits``, for callers that keep them).

    The search distribution's mean rides along as one extra row of the same secure calls: it is
    not told to the search, but it is a selection candidate (often the best generaliser).
    ``cfg.train_batch``: the population is scored on one mini-batch of the training set (chunk
    ``generation mod chunks``); ``cfg.dev_eval="mean"``: only the mean is scored on dev.
    ``objective`` reads class scores from the opened word logits (default: the verbalizer's)."""
    objective = objective or verbalizer(scorer.class_scores)
    train, dev = scorer.sets["train"], scorer.sets["dev"]
    Z, search = strategy.ask(st.search)                                  # 1. ask
    Zs = np.concatenate([Z, strategy.mean(st.search)[None]])             #    (+ the current mean)
    delta = subspace.offsets(Zs)                                         # 2. A.z at the data owner,
    n_costs = len(scorer.s.costs)                                        #    shared; P0 is resident
    batch = [st.generation % len(train.chunks)] if cfg.train_batch else range(len(train.chunks))
    tr_words, tr_cf = scorer.score_words("train", delta, batch)          # 3. opened to us only
    sel = np.arange(len(Zs)) if cfg.dev_eval == "all" else np.array([len(Z)])
    dv_words, dv_cf = scorer.score_words("dev", delta[sel])
    tr_labels = train.chunk_labels(batch)
    tr = objective.train(tr_words, tr_cf, tr_labels)                     # 4. loss in plaintext
    dv = objective.dev(dv_words, dv_cf, tr_words[sel], tr_labels)
    losses = losses_from_logits(tr, tr_labels, cfg.loss)
    dev_loss, dev_acc = losses_from_logits(dv, dev.labels, "ce"), accuracy(dv, dev.labels)
    search = strategy.tell(search, Z, losses[: len(Z)])                  # 5. tell
    costs = scorer.s.costs[n_costs:]
    gen_s, gen_bytes = sum(c.wall_s for c in costs), sum(c.send_bytes for c in costs)
    st = dataclasses.replace(st, search=search, generation=st.generation + 1,
                             mpc_seconds=st.mpc_seconds + gen_s, mpc_bytes=st.mpc_bytes + gen_bytes)
    # selection / early stopping on the dev split: lowest dev cross-entropy (smoother than the
    # accuracy of a few dozen examples, which picks lucky candidates and overfits dev)
    i = int(np.argmin(dev_loss))
    if dev_loss[i] < st.best_dev_loss:
        st = dataclasses.replace(st, best_z=Zs[sel[i]].copy(), best_dev=float(dev_acc[i]),
                                 best_dev_loss=float(dev_loss[i]), best_train_loss=float(losses[sel[i]]), since_best=0)
    else:
        st = dataclasses.replace(st, since_best=st.since_best + 1)
    pop, best = slice(0, len(Z)), int(np.argmin(losses[: len(Z)]))
    metrics = {"generation": st.generation, "loss_best": float(losses[pop].min()),
               "loss_mean": float(losses[pop].mean()), "loss_of_mean": float(losses[-1]),
               "train_acc_best": float(accuracy(tr, tr_labels)[best]),
               "dev_acc_best": float(dev_acc.max()),
               "dev_acc_of_best_loss": float(dev_acc[best]) if cfg.dev_eval == "all" else None,
               "dev_acc_of_mean": float(dev_acc[-1]), "dev_loss_of_mean": float(dev_loss[-1]),
               "best_dev_so_far": st.best_dev, "best_dev_loss_so_far": st.best_dev_loss, "mpc_s": gen_s,
               "mpc_bytes": gen_bytes, "mpc_rounds": sum(c.rounds for c in costs),
               "mpc_s_total": st.mpc_seconds, "mpc_bytes_total": st.mpc_bytes, "_Z": Zs, "_logits": (tr, dv),
               "_labels": (tr_labels, dev.labels), "_rows": (np.asarray(list(batch)), sel)}
    return st, metrics


def minibatches(labels: list, size: int, seed: int) -> list[list[int]]:
    """Indices 0..len(labels)-1 dealt into stratified chunks of about ``size``: each class's
    examples, shuffled with ``seed``, go round-robin over the chunks, so every mini-batch holds
    each class in proportion."""
    k = max(1, -(-len(labels) // size))
    rng = np.random.default_rng([seed, 3])
    order = [i for c in sorted(set(labels)) for i in rng.permutation([j for j, l in enumerate(labels) if l == c])]
    return [sorted(int(i) for i in order[c::k]) for c in range(k)]


# -------------------------------------------------------------------------------- checkpointing
# settings added after runs were checkpointed: at these values they leave a run's id as it was
LATER_DEFAULTS = {"head": "words", "probe_words": None, "select": "dev-loss", "objective": "words"}

# LoopState's scalar fields, stored under their own names; with "has_best" and "extra", every
# checkpoint holds all of them (load_checkpoint names any that an older version did not write)
_SCALARS = ("generation", "best_dev", "best_dev_loss", "best_train_loss", "since_best", "mpc_seconds", "mpc_bytes")


def run_id(cfg: TuneConfig) -> str:
    """What makes a checkpoint this run's: its settings but the budget and where it lives."""
    import hashlib

    d = {k: v for k, v in dataclasses.asdict(cfg).items()
         if k not in ("budget", "out", "n_tokens") and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, st: LoopState, strategy, extra: dict, run: str = "") -> None:
    """Atomic: write to a temp file, then rename. A killed run loses at most one generation."""
    flat = {f"search/{k}": np.asarray(v) for k, v in strategy.state_to_dict(st.search).items()}
    flat.update({k: getattr(st, k) for k in _SCALARS})
    flat.update({"has_best": st.best_z is not None, "extra": json.dumps(extra), "run": run})
    if st.best_z is not None:
        flat["best_z"] = st.best_z
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_checkpoint(path: Path, strategy, run: str | None = None, d: int | None = None) -> tuple[LoopState, dict]:
    """The loop state in ``path``, checked: a readable checkpoint of this version, of this run
    (``run``: :func:`run_id`, when the checkpoint records one), with a search state of this
    strategy and dimension ``d``, and finite numbers. UserError (one line) otherwise; the file is
    never modified."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no checkpoint there") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{path} is truncated or not a checkpoint ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}); restore it or start a new run") from None
    missing = {*_SCALARS, "has_best", "extra"} - set(data)
    if missing:
        raise UserError(f"{path}: checkpoint from an older version (no {', '.join(sorted(missing))}); "
                         f"it cannot be resumed, start a new run")
    if run is not None and "run" in data and str(data["run"]) not in ("", run):
        raise UserError(f"{path} is another run's checkpoint (its settings differ from {path.parent / 'config.json'})")
    for k, v in data.items():
        if k in ("extra", "run") or v.dtype.kind not in "fc":
            continue
        ok = np.isfinite(v) | ((v == np.inf) & any(t in k for t in ("loss", "fitness")))  # "no best yet" is +inf
        if not ok.all():
            raise UserError(f"{path}: {k} holds NaN or Inf; the checkpoint is corrupt, start a new run")
    try:
        search = strategy.state_from_dict({k[len("search/"):]: v for k, v in data.items() if k.startswith("search/")})
        best = data["best_z"] if bool(data["has_best"]) else None
        extra = json.loads(str(data["extra"]))
        st = LoopState(search, int(data["generation"]), best, float(data["best_dev"]), float(data["best_dev_loss"]),
                       float(data["best_train_loss"]), int(data["since_best"]), float(data["mpc_seconds"]),
                       int(data["mpc_bytes"]))
    except (KeyError, ValueError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a checkpoint of this strategy ({type(e).__name__}: {e})") from None
    if d is not None and (np.shape(strategy.mean(st.search)) != (d,) or (best is not None and best.shape != (d,))):
        raise UserError(f"{path}: its search vectors do not have the run's dimension d={d}")
    if st.generation < 0 or not isinstance(extra, dict) or "zero_shot_test_acc" not in extra:
        raise UserError(f"{path}: not a checkpoint of a tuning run (generation {st.generation}, extra {extra!r:.60})")
    return st, extra


# ------------------------------------------------------------------------------------------ tune
def split_examples(cfg: TuneConfig, task):
    """k-shot train and dev (disjoint, stratified, seeded) and a stratified test subset."""
    dev_k = cfg.dev_shots or cfg.shots
    if dev_k == cfg.shots:
        train, dev = split_dev(task.train, cfg.shots, cfg.seed, task.labels)
    else:
        train = kshot(task.train, cfg.shots, cfg.seed, task.labels)
        rest = [ex for ex in task.train if ex not in set(train)]
        dev = kshot(rest, dev_k, cfg.seed + 1, task.labels)
    per = max(1, cfg.n_test // len(task.labels))
    by = {l: [ex for ex in task.test if ex[1] == l] for l in task.labels}
    rng = np.random.default_rng(cfg.seed + 7)
    test = []
    for l in task.labels:
        idx = rng.permutation(len(by[l]))[:per]
        test += [by[l][i] for i in idx]
    order = rng.permutation(len(test))
    return train, dev, [test[i] for i in order]


def task_of(cfg: TuneConfig):
    if bool(cfg.task) == bool(cfg.train):
        raise UserError("give exactly one of --task NAME or --train FILE")
    if cfg.task:
        task = load_task(cfg.task) if cfg.max_words is None else load_task(cfg.task, max_words=cfg.max_words)
    else:
        task = load_user_task(cfg.train, cfg.test, cfg.text_column, cfg.label_column, cfg.verbalizer, cfg.template,
                              cfg.max_words)
    return with_label_words(task, cfg.label_words) if cfg.label_words else task


def _init_token_ids(cfg: TuneConfig, bundle) -> list[int] | None:
    """``--init text:<words>``: the token ids whose embeddings form P0 (one soft token each)."""
    if not cfg.init.startswith("text:"):
        return None
    ids = list(bundle.tokenizer(cfg.init[len("text:"):], add_special_tokens=False)["input_ids"])
    if not ids:
        raise UserError(f"--init {cfg.init!r}: the text has no tokens")
    return ids


def build_subspace(cfg: TuneConfig, bundle, stats):
    """The run's subspace, reproducible from its config alone (A from the seed, P0's ids from
    --init) and the embedding table's public statistics ``stats`` (``backend.embedding_stats()``).
    It holds no P0: the parties embed P0's ids, and the loop shares only ``A z`` (for a deep
    prompt, offsets of P0's keys/values or hidden states in the top layers)."""
    ids = _init_token_ids(cfg, bundle)
    n = len(ids) if ids else cfg.n_tokens
    return subspace_from_stats(stats, n, cfg.d, cfg.seed, "text" if ids else "vocab", init_ids=ids,
                               shape=delta_shape(bundle.config, n, cfg.prompt_depth, cfg.prompt_form))


def probe_words(cfg: TuneConfig, task, train: list) -> tuple:
    """--head fit's probe words: --probe-words (comma-separated), the task's own pool, or, for a
    task without one, a pool chosen from the k-shot training examples ``train`` (``head.auto_pool``)."""
    if cfg.probe_words is None:
        return tuple(task.probe_words) if task.probe_words else fitted.auto_pool(train, task.labels)
    words = tuple(" " + w.strip() for w in cfg.probe_words.split(",") if w.strip())
    if not words:
        raise UserError(f"--probe-words {cfg.probe_words!r} names no word")
    return words


def train_groups(cfg: TuneConfig, train: list) -> list | None:
    """How the run shares its training set: stratified mini-batches under --train-batch, else
    the scorer's default chunks (None)."""
    return minibatches([l for _, l in train], cfg.train_batch, cfg.seed) if cfg.train_batch else None


KEEPS_STATE = ("sim", "cluster")


def make_scorer(cfg: TuneConfig, task, train: list, session, bundle, subspace) -> SecureScorer:
    """The run's secure scorer on ``session``: placement, depth, calibration and (--head fit)
    probe words from its config, P0 from its subspace. Nothing is shared yet but the head rows."""
    return SecureScorer(session, bundle, task, cfg.mode, cfg.n_tokens, p0_ids=subspace.init_ids,
                        depth=cfg.prompt_depth, form=cfg.prompt_form, calibrate=cfg.calibrate, combine=cfg.combine,
                        probe_words=probe_words(cfg, task, train) if cfg.head == "fit" else ())


def open_scorer(cfg: TuneConfig, task, train: list, policy) -> tuple[SecureScorer, object, TuneConfig]:
    """The run's back end, subspace and scorer as ``tune`` sets them up, and the config with the
    subspace's n_tokens (--init text). The back end is closed again if the set-up fails."""
    # the model as this (the data owner's) process sees it: under the cluster back end, the
    # tokenizer and public config only; the weights stay with the model owner
    session, bundle = open_backend(cfg.backend, cfg.model, policy)
    try:
        if cfg.backend in KEEPS_STATE:  # set-up shares on the parties' disks: a resumed run does not prefill again
            session.keep_state(Path(cfg.out) / "state")
        subspace = build_subspace(cfg, bundle, session.embedding_stats())
        cfg = dataclasses.replace(cfg, n_tokens=subspace.n_tokens)  # --init text: one soft token per its token
        return make_scorer(cfg, task, train, session, bundle, subspace), subspace, cfg
    except BaseException:
        session.close()
        raise


def load_run_config(out: Path, what: str) -> TuneConfig:
    """The settings the run in ``out`` recorded (config.json), with ``out`` as its out; one line
    (prefixed ``what``, the option that named the run) if it is missing or not a run's."""
    try:
        stored = json.loads((out / "config.json").read_text())
        return TuneConfig(**{**stored, "out": str(out)})
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{what} {out}: its config.json is missing or not a run's settings "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None


def config_line(cfg: TuneConfig) -> str:
    """The run's configuration in one line, as it starts."""
    where = "prompt at the input" if cfg.prompt_depth is None else f"{cfg.prompt_form} prompt in the top {cfg.prompt_depth} layers"
    batch = f"{cfg.train_batch} training examples per generation" if cfg.train_batch else "all training examples"
    return (f"config: {cfg.mode} placement, {where}, P0 {cfg.init!r} ({cfg.n_tokens} tokens), subspace d={cfg.d}; "
            f"{cfg.strategy} popsize {cfg.popsize} x {cfg.budget} generations, sigma0 {cfg.sigma0:g}; {batch}; "
            f"dev: {cfg.dev_eval}; loss {cfg.loss}, objective {cfg.objective}, head {cfg.head}, select {cfg.select}; "
            f"policy {cfg.policy}, back end {cfg.backend}, seed {cfg.seed}")


def make_objective(cfg: TuneConfig, scorer, extra: dict) -> Objective:
    """The run's objective; ``head`` and ``refit`` start from the head fitted at P0 (its
    regularisation; ``extra`` is the checkpoint's, so a resumed run reads the same head)."""
    if cfg.objective == "words":
        return verbalizer(scorer.class_scores)
    head0 = fitted.from_json(extra["zero_shot_head"])
    if cfg.objective == "head":
        return frozen_head(head0)
    return refit_head(len(scorer.task.labels), head0.c, seed=cfg.seed)


def fit_head(scorer, delta, seed: int) -> fitted.Head:
    """--head fit at prompt ``delta`` (None: P0, no soft prompt): the opened word logits of train
    and dev, a head fitted on both, its regularisation by k-fold over them (plaintext, here)."""
    X = np.concatenate([fitted.features(scorer.score_words(n, delta)[0][0]) for n in ("train", "dev")])
    y = np.concatenate([scorer.sets[n].labels for n in ("train", "dev")])
    R = len(scorer.task.labels)
    return fitted.fit(X, y, R, fitted.choose_c(X, y, R, seed=seed))


def head_predictions(head: fitted.Head, words: np.ndarray) -> np.ndarray:
    """[E, W] opened word logits -> [E] predicted classes."""
    return fitted.apply(head, fitted.features(words)).argmax(-1)


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


def tune(cfg: TuneConfig, resume: bool = False, show_progress: bool = True, log=print,
         budget: int | None = None) -> dict:
    """Run (or resume) a tuning job; returns the summary that is also written to OUT/summary.json.

    ``budget`` on resume extends (or shortens) the stored run's generation budget; every other
    setting comes from the run's config.json, so the continued search is the same search."""

    out = Path(cfg.out)
    ckpt = out / "ckpt.npz"
    if resume:
        if not ckpt.exists():
            raise UserError(f"--resume {out}: no checkpoint there")
        cfg = load_run_config(out, "--resume")
        if budget is not None:
            cfg = dataclasses.replace(cfg, budget=budget)
    elif ckpt.exists():
        raise UserError(f"{out} already holds a run; pass --resume {out} or choose another --out")
    if cfg.loss not in LOSSES:
        raise UserError(f"unknown loss {cfg.loss!r} (known: {', '.join(LOSSES)})")
    if cfg.budget < 1 or cfg.popsize < 2 or cfg.shots < 1:
        raise UserError("--budget must be >= 1, --popsize >= 2 and --shots >= 1")
    if not (np.isfinite(cfg.sigma0) and cfg.sigma0 > 0) or cfg.d < 1 or cfg.n_tokens < 1:
        raise UserError(f"sigma0 ({cfg.sigma0}) must be a finite positive number, d and n_tokens >= 1")
    if cfg.init != "vocab" and not cfg.init.startswith("text:"):
        raise UserError(f"unknown --init {cfg.init!r}: use 'vocab' or 'text:<words>'")
    if cfg.dev_eval not in DEV_EVAL:
        raise UserError(f"unknown --dev-eval {cfg.dev_eval!r} (known: {', '.join(DEV_EVAL)})")
    if cfg.train_batch < 0 or (cfg.prompt_depth is not None and cfg.prompt_depth < 1):
        raise UserError("--train-batch must be >= 0 and --prompt-depth >= 1")
    if cfg.head not in HEADS or cfg.select not in SELECT or cfg.objective not in OBJECTIVES:
        raise UserError(f"unknown --head {cfg.head!r}, --select {cfg.select!r} or --objective {cfg.objective!r} "
                        f"(known: {', '.join(HEADS)}; {', '.join(SELECT)}; {', '.join(OBJECTIVES)})")
    if cfg.objective != "words" and cfg.head != "fit":
        raise UserError(f"--objective {cfg.objective} searches against a fitted head: it needs --head fit")

    task = task_of(cfg)
    train, dev, test = split_examples(cfg, task)
    policy = load_policy(cfg.policy)
    strategy = make_strategy(cfg.strategy, cfg.d, cfg.popsize, cfg.seed,
                             **({"sigma0": cfg.sigma0} if cfg.strategy == "cma" else {}))
    if resume:  # checked before anything is shared or written: a bad checkpoint costs nothing
        load_checkpoint(ckpt, strategy, run_id(cfg), cfg.d)
    t0 = time.perf_counter()
    scorer, subspace, cfg = open_scorer(cfg, task, train, policy)
    session, bundle = scorer.s, scorer.bundle
    try:
        log(task.describe())
        log(config_line(cfg))
        log(f"{len(train)} train / {len(dev)} dev / {len(test)} test examples; model {cfg.model}; "
            f"policy {policy.name} ({policy.protocol}); back end {cfg.backend}; placement {cfg.mode}")

        fit = cfg.head == "fit"
        scorer.add_examples("train", train, train_groups(cfg, train), zero_shot=fit)
        scorer.add_examples("dev", dev, zero_shot=fit)
        test_set = scorer.add_examples("test", test, zero_shot=True)
        setup_cost = cost_sum(session.costs)
        log(f"set-up (weights, verbalizer head, examples{', prefix caches' if cfg.mode == 'cached' else ''}): "
            f"{time.perf_counter() - t0:.1f}s, MPC {setup_cost['bytes'] / 1e6:.1f} MB")

        # nothing is written before the set-up succeeded (a bad input leaves no partial run behind)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        audit = out / "reveals.jsonl"  # every value opened to us, every session of the run, as it happens
        if not resume:
            audit.write_text("")
        session.audit_path = audit
        metrics_path = out / "metrics.jsonl"
        if resume:
            st, extra = load_checkpoint(ckpt, strategy, run_id(cfg), cfg.d)
            lines = metrics_path.read_text().splitlines()[: st.generation] if metrics_path.exists() else []
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
            log(f"resumed at generation {st.generation}")
        else:
            n0 = len(session.costs)
            zs_words = scorer.score_words("test", None)
            zs_logits = scorer.class_scores(*zs_words)
            extra = {"zero_shot_test_acc": float(accuracy(zs_logits, test_set.labels)[0]),
                     "zero_shot_correct": (zs_logits[0].argmax(-1) == test_set.labels).astype(int).tolist()}
            if cfg.save_logits:
                (out / "logits").mkdir(exist_ok=True)
                np.savez(out / "logits" / "test_zero_shot.npz", logits=zs_logits[0], labels=test_set.labels)
            log(f"zero-shot test accuracy (through {cfg.backend}): {extra['zero_shot_test_acc']:.3f}")
            if fit:  # the fitted head at P0, on the same test examples: the baseline a tuned head must beat
                head0 = fit_head(scorer, None, cfg.seed)
                correct = head_predictions(head0, zs_words[0][0]) == test_set.labels
                extra.update(zero_shot_head_test_acc=float(correct.mean()),
                             zero_shot_head_correct=correct.astype(int).tolist(), zero_shot_head_c=head0.c,
                             zero_shot_head=fitted.to_json(head0))
                log(f"zero-shot test accuracy with a fitted head: {extra['zero_shot_head_test_acc']:.3f}")
            extra["zero_shot_cost"] = cost_sum(session.costs[n0:])
            st = LoopState(strategy.init(cfg.seed))
            metrics_path.write_text("")
        objective = make_objective(cfg, scorer, extra)
        # wall time and set-up cost over every session of this run (a resumed run prefills again)
        before = extra.get("elapsed_s", 0.0)
        extra["setups"] = extra.get("setups", []) + [setup_cost]
        elapsed = lambda: round(before + time.perf_counter() - t0, 1)  # noqa: E731
        extra["elapsed_s"] = elapsed()
        save_checkpoint(ckpt, st, strategy, extra, run_id(cfg))

        bar = _progress(cfg.budget, st.generation, show_progress)
        try:
            while st.generation < cfg.budget:
                st, m = run_generation(st, strategy, subspace, scorer, cfg, objective)
                Z, (tr, dv), (tr_labels, dv_labels) = m.pop("_Z"), m.pop("_logits"), m.pop("_labels")
                train_chunks, dev_rows = m.pop("_rows")
                if cfg.save_logits:  # the data owner's own files: what it scored and what was revealed to it
                    (out / "logits").mkdir(exist_ok=True)
                    np.savez(out / "logits" / f"gen{st.generation:04d}.npz", Z=Z, train_logits=tr, dev_logits=dv,
                             train_labels=tr_labels, dev_labels=dv_labels, train_chunks=train_chunks,
                             dev_rows=dev_rows)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                extra["elapsed_s"] = elapsed()
                save_checkpoint(ckpt, st, strategy, extra, run_id(cfg))
                bar(m)
                if cfg.patience and st.since_best >= cfg.patience:
                    log(f"early stop: no dev improvement for {cfg.patience} generations")
                    break
        except BaseException:
            bar.close()  # the error line then starts a line of its own
            raise

        z = st.best_z if st.best_z is not None and cfg.select == "dev-loss" else strategy.mean(st.search)
        n0 = len(session.costs)
        delta = subspace.offsets(z[None])
        te_words = scorer.score_words("test", delta)
        te_logits = scorer.class_scores(*te_words)[0]
        words_correct = (te_logits.argmax(-1) == test_set.labels).astype(int)
        if cfg.save_logits:
            (out / "logits").mkdir(exist_ok=True)
            np.savez(out / "logits" / "test_tuned.npz", logits=te_logits, labels=test_set.labels)
        tuned_correct, head_info = words_correct, None
        if fit:  # train and dev once more at the kept prompt (their rows are the head's only extra cost)
            head = fit_head(scorer, delta, cfg.seed)
            tuned_correct = (head_predictions(head, te_words[0][0]) == test_set.labels).astype(int)
            np.savez(out / "head.npz", **dataclasses.asdict(head), word_groups=scorer.word_groups)
            head_info = {"words": int(len(scorer.word_groups)), "probe_words": int((scorer.word_groups < 0).sum()),
                         "c": head.c, "zero_shot_c": extra["zero_shot_head_c"],
                         "extra_rows_final": len(train) + len(dev),
                         "zero_shot_head_test_acc": extra["zero_shot_head_test_acc"],
                         "test_significance_vs_zero_shot_head": paired_test(
                             np.asarray(extra["zero_shot_head_correct"]), tuned_correct)}
        test_acc = float(tuned_correct.mean())
        gen_costs = [json.loads(ln) for ln in metrics_path.read_text().splitlines()]
        per_gen = {k: float(np.median([g[k] for g in gen_costs])) if gen_costs else 0.0
                   for k in ("mpc_s", "mpc_bytes", "mpc_rounds")}
        summary = {
            "task": cfg.task or cfg.train, "model": cfg.model, "policy": policy.name, "protocol": policy.protocol,
            "backend": cfg.backend, "placement": cfg.mode, "strategy": cfg.strategy,
            "prompt_depth": scorer.depth, "prompt_form": cfg.prompt_form if scorer.deep else "input",
            "layers": bundle.config.num_hidden_layers, "train_batch": cfg.train_batch, "dev_eval": cfg.dev_eval,
            "calibrate": cfg.calibrate, "verbalizer": {l: task.verbalizer[l] for l in task.labels},
            "content_free_rows_per_call": len(CONTENT_FREE) if cfg.calibrate == "cf" else 0,
            "rows_per_generation": rows_per_generation(cfg.popsize, len(train), len(dev), cfg.train_batch,
                                                       cfg.dev_eval),
            "generations": st.generation, "popsize": cfg.popsize, "shots_per_class": cfg.shots,
            "n_train": len(train), "n_dev": len(dev), "n_test": len(test),
            "zero_shot_test_acc": extra["zero_shot_test_acc"], "tuned_test_acc": test_acc,
            "tuned_words_test_acc": float(words_correct.mean()), "select": cfg.select, "head": cfg.head,
            "objective": cfg.objective,
            "fitted_head": head_info,
            "test_significance": paired_test(np.asarray(extra["zero_shot_correct"]), tuned_correct),
            "best_dev_acc": st.best_dev, "best_dev_loss": st.best_dev_loss, "best_train_loss": st.best_train_loss,
            "wall_s": {"elapsed_all_sessions": elapsed(), "sessions": len(extra["setups"])},
            "mpc": {"setup": setup_cost, "setup_all_sessions": {k: sum(c[k] for c in extra["setups"])
                                                                 for k in ("seconds", "bytes", "rounds")},
                    "zero_shot_eval": extra["zero_shot_cost"],
                    "generations_total": {"seconds": round(st.mpc_seconds, 2), "bytes": st.mpc_bytes},
                    "per_generation_median": per_gen, "final_eval": cost_sum(session.costs[n0:])},
            "subspace": {"d": cfg.d, "n_tokens": cfg.n_tokens, "init": subspace.init, "A_std": subspace.scale},
            "reveals": group_reveals([json.loads(ln) for ln in audit.read_text().splitlines() if ln.strip()]),
            "reveals_this_session": session.reveal_summary(),
        }
        summary["projection"] = project_full_budget(summary, len(task.labels))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        np.save(out / "best_z.npy", z)
        plot_run(gen_costs, out)
        return summary
    finally:
        session.close()


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
    parts = {"setup": (m["setup"], ex_scale), "zero_shot_eval": (m["zero_shot_eval"], test_scale),
             "final_eval": (m["final_eval"], test_scale)}
    out = {"assumes": dict(full), "scale_per_generation": round(row_scale, 2)}
    for unit, key in (("seconds", "mpc_s"), ("bytes", "mpc_bytes")):
        gens = per[key] * row_scale * full["generations"]
        fixed = {name: c[unit] * sc for name, (c, sc) in parts.items()}
        out[unit] = round(gens + sum(fixed.values()), 1) if unit == "seconds" else int(gens + sum(fixed.values()))
        out[f"{unit}_generations"] = round(gens, 1) if unit == "seconds" else int(gens)
    out["note"] = ("generations linear in candidate x example rows; set-up (prefill) linear in examples, "
                   "test evaluations in test examples; sharing the weights not included")
    return out


def _progress(total: int, start: int, enabled: bool):
    """tqdm bar: best/mean loss of this generation, dev accuracy of its lowest-loss candidate (of the
    search mean under --dev-eval mean), and
    "kept": the dev accuracy of the prompt kept so far (selected by dev loss, so it can read lower
    than this generation's), then MPC time and bytes so far."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, disable=not enabled, unit="gen", dynamic_ncols=True)

    def update(m):
        dev = m["dev_acc_of_best_loss"] if m["dev_acc_of_best_loss"] is not None else m["dev_acc_of_mean"]
        bar.set_postfix_str(f"loss {m['loss_best']:.3f}/{m['loss_mean']:.3f} dev {dev:.2f} "
                            f"(kept {m['best_dev_so_far']:.2f}) MPC {m['mpc_s_total']:.0f}s "
                            f"{m['mpc_bytes_total'] / 1e6:.0f}MB")
        bar.update(1)
        if m["generation"] >= total:
            bar.close()
    update.close = bar.close  # on failure too: the error line then starts a line of its own
    return update


def plot_run(metrics: list, out: Path) -> None:
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
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
