"""Forward-only prompt tuning: the data owner's loop against the secure scorer.

One generation (``run_generation``), top to bottom:
  1. ask the search strategy for a population z_1..z_P;
  2. the data owner maps them to soft prompts A.z (plaintext, private) and secret-shares them;
     one secure program scores the whole population x (train + dev examples);
  3. only the verbalizer logits are opened, and only to the data owner;
  4. the data owner computes the loss (and dev accuracy) in plaintext;
  5. tell the strategy the losses.
The compute parties never see labels, losses, z, A or the plaintext prompt.

``tune`` is the whole run, a story of small steps over explicit state:

    cfg, resume_id = settings(cfg, run, resume, budget)      # checked; nothing opened yet
    job = set_up(cfg, run, resume_id, log)                   # back end, examples shared; nothing written
    st, extra, clock = begin(job, run, resume_id, log)       # zero-shot evaluation, or the checkpoint
    objective = make_objective(job.cfg, job.scorer, extra)   # what the search minimises
    st = generations(job, run, st, extra, clock, objective)  # a checkpoint after every one
    final = final_evaluation(job, run, st)                   # the kept prompt (and head) on test
    return report(job, run, st, extra, final, clock)         # summary.json, best_z.npy, curves.png

with early stopping on dev loss (``--patience``) and ``--resume`` from the last checkpoint (the
same search, continued exactly); ``rundir.RunDir`` owns the run directory's files.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from .tasks import kshot, load_task, load_user_task, split_dev, with_label_words
from ..transports import open_backend
from ..transports.session import group_reveals
from ..errors import UserError
from ..policy import load_policy
from . import head as fitted
from .config import (LOSSES, TuneConfig, config_line, placed, resolve_data_paths, run_id, stored_config,
                     with_absolute_paths)
from .objective import Objective, frozen_head, refit_head, verbalizer
from .report import cost_sum, kept_sum, plot_run, summarize
from .rundir import RunDir, save_npz
from .scorer import SecureScorer, delta_shape
from .search import make_strategy
from .subspace import subspace_from_stats

# names callers import from the trainer, whose homes are now config.py and report.py
from .config import LATER_DEFAULTS, load_run_config  # noqa: E402,F401
from .report import FULL_BUDGET, rows_per_generation, wilson  # noqa: E402,F401


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
    sel = np.arange(len(Zs)) if cfg.dev_eval == "all" else np.array([len(Z)])
    tr, dv, tr_labels = score_candidates(scorer, objective, delta, batch, sel)  # 3. opened to us only
    losses = losses_from_logits(tr, tr_labels, cfg.loss)                 # 4. loss in plaintext
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


def score_candidates(scorer, objective: Objective, delta: np.ndarray, batch, sel: np.ndarray) -> tuple:
    """What the search reads of candidates ``delta`` [P, ...]: their class scores on the training
    chunks ``batch`` and those of rows ``sel`` on dev, through ``objective`` from the opened word
    logits, and the batch's labels. Every secure call of a generation is here, in this order."""
    tr_words, tr_cf = scorer.score_words("train", delta, batch)
    dv_words, dv_cf = scorer.score_words("dev", delta[sel])
    tr_labels = scorer.sets["train"].chunk_labels(batch)
    return (objective.train(tr_words, tr_cf, tr_labels), objective.dev(dv_words, dv_cf, tr_words[sel], tr_labels),
            tr_labels)


def minibatches(labels: list, size: int, seed: int) -> list[list[int]]:
    """Indices 0..len(labels)-1 dealt into stratified chunks of about ``size``: each class's
    examples, shuffled with ``seed``, go round-robin over the chunks, so every mini-batch holds
    each class in proportion."""
    k = max(1, -(-len(labels) // size))
    rng = np.random.default_rng([seed, 3])
    order = [i for c in sorted(set(labels)) for i in rng.permutation([j for j, l in enumerate(labels) if l == c])]
    return [sorted(int(i) for i in order[c::k]) for c in range(k)]


# -------------------------------------------------------------------------------- checkpointing
# LoopState's scalar fields, stored under their own names; with "has_best" and "extra", every
# checkpoint holds all of them (load_checkpoint names any that an older version did not write)
_SCALARS = ("generation", "best_dev", "best_dev_loss", "best_train_loss", "since_best", "mpc_seconds", "mpc_bytes")


def save_checkpoint(path: Path, st: LoopState, strategy, extra: dict, run: str = "") -> None:
    """Atomic: write to a temp file, then rename. A killed run loses at most one generation."""
    flat = {f"search/{k}": np.asarray(v) for k, v in strategy.state_to_dict(st.search).items()}
    flat.update({k: getattr(st, k) for k in _SCALARS})
    flat.update({"has_best": st.best_z is not None, "extra": json.dumps(extra), "run": run})
    if st.best_z is not None:
        flat["best_z"] = st.best_z
    save_npz(path, **flat)


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
        raise UserError(f"{path} is another run's checkpoint "
                        f"(its settings differ from {RunDir(path.parent).config_path})")
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



# ------------------------------------------------------------------------------------ set-up
def strategy_of(cfg: TuneConfig):
    """The run's search strategy (its state starts from the seed)."""
    return make_strategy(cfg.strategy, cfg.d, cfg.popsize, cfg.seed,
                         **({"sigma0": cfg.sigma0} if cfg.strategy == "cma" else {}))


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
    if cfg.task:  # the config holds exactly one of task and train
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
    cfg = placed(cfg, bundle.config.num_hidden_layers)
    ids = _init_token_ids(cfg, bundle)
    n = len(ids) if ids else cfg.n_tokens
    return subspace_from_stats(stats, n, cfg.d, cfg.seed, "text" if ids else "vocab", init_ids=ids,
                               shape=delta_shape(bundle.config, n, cfg.prompt_depth, cfg.prompt_form))


def probe_words(cfg: TuneConfig, task, train: list) -> tuple:
    """--head fit's probe words: --probe-words (comma-separated), the task's own pool, or, for a
    task without one, a pool chosen from the k-shot training examples ``train`` (``head.auto_pool``)."""
    if cfg.probe_words is None:
        return tuple(task.probe_words) if task.probe_words else fitted.auto_pool(train, task.labels)
    return tuple(" " + w.strip() for w in cfg.probe_words.split(",") if w.strip())  # one at least (config)


def train_groups(cfg: TuneConfig, train: list) -> list | None:
    """How the run shares its training set: stratified mini-batches under --train-batch, else
    the scorer's default chunks (None)."""
    return minibatches([l for _, l in train], cfg.train_batch, cfg.seed) if cfg.train_batch else None


def make_scorer(cfg: TuneConfig, task, train: list, session, bundle, subspace) -> SecureScorer:
    """The run's secure scorer on ``session``: placement, depth, calibration and (--head fit)
    probe words from its config, P0 from its subspace. Nothing is shared yet but the head rows."""
    cfg = placed(cfg, bundle.config.num_hidden_layers)
    return SecureScorer(session, bundle, task, cfg.mode, cfg.n_tokens, p0_ids=subspace.init_ids,
                        depth=cfg.prompt_depth, form=cfg.prompt_form, calibrate=cfg.calibrate, combine=cfg.combine,
                        probe_words=probe_words(cfg, task, train) if cfg.head == "fit" else ())


def open_scorer(cfg: TuneConfig, task, train: list, policy, keep_new: bool = True) -> tuple[SecureScorer, object, TuneConfig]:
    """The run's back end, subspace and scorer as ``tune`` sets them up, and the config with the
    subspace's n_tokens (--init text) and the prompt's depth in this model (``config.placed``).
    The back end is closed again if the set-up fails.
    ``keep_new=False``: restore the run's kept set-up shares, keep no new ones (predict)."""
    # the model as this (the data owner's) process sees it: under the cluster back end, the
    # tokenizer and public config only; the weights stay with the model owner
    # --cluster FILE: the nodes started there (secptune node); otherwise the back end launches its own
    where = {"deployment": cfg.cluster} if cfg.cluster and cfg.backend == "cluster" else {}
    session, bundle = open_backend(cfg.backend, cfg.model, policy, **where)
    try:
        if session.keeps_state:  # set-up shares on the parties' disks: a resumed run does not prefill again
            run = RunDir(cfg.out)
            session.keep_state(run.state_dir, write=keep_new, salt=run.state_salt(create=keep_new))
        cfg = placed(cfg, bundle.config.num_hidden_layers)  # --prompt-depth auto: for this model's layers
        subspace = build_subspace(cfg, bundle, session.embedding_stats())
        cfg = cfg.replace(n_tokens=subspace.n_tokens)  # --init text: one soft token per its token
        return make_scorer(cfg, task, train, session, bundle, subspace), subspace, cfg
    except BaseException:
        session.close()
        raise



def make_objective(cfg: TuneConfig, scorer, extra: dict) -> Objective:
    """The run's objective; ``head`` and ``refit`` start from the head fitted at P0 (its
    regularisation; ``extra`` is the checkpoint's, so a resumed run reads the same head)."""
    if cfg.objective == "words":
        return verbalizer(scorer.class_scores)
    head0 = fitted.from_json(extra["zero_shot_head"])
    if cfg.objective == "head":
        return frozen_head(head0)
    return refit_head(len(scorer.task.labels), head0.c, seed=cfg.seed)


def head_examples(scorer, delta) -> tuple:
    """The head's fitting examples at prompt ``delta`` (None: P0, no soft prompt): train and dev's
    opened word logits as features [E, W], and their labels [E]."""
    X = np.concatenate([fitted.features(scorer.score_words(n, delta)[0][0]) for n in ("train", "dev")])
    return X, np.concatenate([scorer.sets[n].labels for n in ("train", "dev")])


def fit_head(scorer, delta, seed: int) -> fitted.Head:
    """--head fit at prompt ``delta``: a head fitted on train and dev, its regularisation by k-fold
    over them (plaintext, here)."""
    X, y = head_examples(scorer, delta)
    R = len(scorer.task.labels)
    return fitted.fit(X, y, R, fitted.choose_c(X, y, R, seed=seed))


def head_predictions(head: fitted.Head, words: np.ndarray) -> np.ndarray:
    """[E, W] opened word logits -> [E] predicted classes."""
    return fitted.apply(head, fitted.features(words)).argmax(-1)


# ------------------------------------------------------------------------------------------ tune
def tune(cfg: TuneConfig, resume: bool = False, show_progress: bool = True, log=print,
         budget: int | None = None) -> dict:
    """Run (or resume) a tuning job; returns the summary that is also written to OUT/summary.json.

    ``budget`` on resume extends (or shortens) the stored run's generation budget; every other
    setting comes from the run's config.json, so the continued search is the same search."""
    run = RunDir(cfg.out)
    cfg, resume_id = settings(cfg, run, resume, budget)  # checked before anything is opened
    job = set_up(cfg, run, resume_id, log)  # examples shared; nothing written yet
    try:
        st, extra, clock = begin(job, run, resume_id, log)  # zero-shot baselines, or the checkpoint's state
        objective = make_objective(job.cfg, job.scorer, extra)  # what the search minimises
        st = generations(job, run, st, extra, clock, objective, show_progress, log)
        final = final_evaluation(job, run, st)  # the kept prompt (and head) on test
        return report(job, run, st, extra, final, clock)  # summary.json, best_z.npy, curves.png
    finally:
        job.scorer.s.close()


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the set-up gives every later step of a run: its settings, data, search and scorer."""
    cfg: TuneConfig  # the run's settings (n_tokens: the subspace's)
    task: object  # assets.tasks.Task
    train: list
    dev: list
    test: list
    policy: object
    strategy: object
    scorer: SecureScorer  # train, dev and test shared; its session is the run's back end
    subspace: object
    cost: dict  # the set-up's MPC cost, this session
    started: float  # time.perf_counter() as the set-up began


@dataclasses.dataclass(frozen=True)
class Clock:
    """A run's wall time over all its sessions: the earlier ones' and this one's since its set-up."""
    started: float
    before: float = 0.0

    def elapsed(self) -> float:
        return round(self.before + time.perf_counter() - self.started, 1)


@dataclasses.dataclass(frozen=True)
class FinalEval:
    """The kept prompt on the test set."""
    z: np.ndarray  # the kept search vector
    words_correct: np.ndarray  # [n_test] 0/1, the verbalizer's
    correct: np.ndarray  # [n_test] 0/1, what the run reports (the fitted head's under --head fit)
    head: fitted.Head | None  # --head fit: the head refitted at the kept prompt (what ``correct`` reads)
    cost: dict  # MPC cost of the evaluation (and the head's extra rows)


def settings(cfg: TuneConfig, run: RunDir, resume: bool, budget: int | None) -> tuple[TuneConfig, str | None]:
    """The settings the run goes by, checked, and (resume) the id its checkpoint must carry.
    A new run: ``cfg`` with absolute data paths (predict reads them from anywhere), in a directory
    without a run. Resume: the run's config.json (``budget`` replacing its budget), the id that
    of the settings as stored (an older run's relative data paths are resolved after)."""
    if resume:
        if not run.has_checkpoint():
            raise UserError(f"--resume {run.path}: no checkpoint there")
        stored = stored_config(run, "--resume")
        # the id of the settings as that version wrote them (an older run's file lacks later fields)
        cfg, resume_id = resolve_data_paths(stored, f"--resume {run.path}"), run_id(run.read_config())
        if budget is not None:
            cfg = cfg.replace(budget=budget)
    elif run.has_checkpoint():
        raise UserError(f"{run.path} already holds a run; pass --resume {run.path} or choose another --out")
    else:
        cfg, resume_id = with_absolute_paths(cfg), None
    return cfg, resume_id  # every setting was checked as the config was built


def set_up(cfg: TuneConfig, run: RunDir, resume_id: str | None, log) -> Setup:
    """Everything before the run's first write: the examples split, the checkpoint checked
    (``resume_id``: resuming), the back end opened and train, dev and test shared (prefix caches
    filled). A bad input or checkpoint leaves no partial run behind; the back end is closed again
    if any of it fails."""
    task = task_of(cfg)
    train, dev, test = split_examples(cfg, task)
    policy = load_policy(cfg.policy)
    strategy = strategy_of(cfg)
    if resume_id is not None:  # checked before anything is shared or written: a bad checkpoint costs nothing
        load_checkpoint(run.checkpoint_path, strategy, resume_id, cfg.d)
    started = time.perf_counter()
    scorer, subspace, cfg = open_scorer(cfg, task, train, policy)
    try:
        log(task.describe())
        log(config_line(cfg))
        log(f"{len(train)} train / {len(dev)} dev / {len(test)} test examples; model {cfg.model}; "
            f"policy {policy.name} ({policy.protocol}); back end {cfg.backend}; placement {cfg.mode}")
        fit = cfg.head == "fit"
        scorer.add_examples("train", train, train_groups(cfg, train), zero_shot=fit)
        scorer.add_examples("dev", dev, zero_shot=fit)
        scorer.add_examples("test", test, zero_shot=True)
        cost = cost_sum(scorer.s.costs)
        kept = ""
        if scorer.s.restored:  # outputs the parties kept from an earlier process: what they cost then
            cost["kept"] = kept_sum(scorer.s.restored_costs())
            kept = (f" (+ {cost['kept']['calls']} outputs kept from earlier processes, MPC "
                    f"{cost['kept']['bytes'] / 1e6:.1f} MB when computed)")
        log(f"set-up (weights, verbalizer head, examples{', prefix caches' if cfg.mode == 'cached' else ''}): "
            f"{time.perf_counter() - started:.1f}s, MPC {cost['bytes'] / 1e6:.1f} MB{kept}")
    except BaseException:
        scorer.s.close()
        raise
    return Setup(cfg, task, train, dev, test, policy, strategy, scorer, subspace, cost, started)


def begin(job: Setup, run: RunDir, resume_id: str | None, log) -> tuple[LoopState, dict, Clock]:
    """This session's start: the settings written, every reveal from here on appended to the
    run's audit as tune's, and the loop state: the checkpoint's (metrics cut back to it) or, for a
    new run, a fresh search after the zero-shot evaluation. Returns the state, the run's ``extra``
    (zero-shot results, every session's set-up cost) and its clock; checkpointed."""
    run.create()
    run.write_config(job.cfg.flat())
    if resume_id is None:
        run.reset_audit()
    # every value opened to us, every session of the run, as it happens
    job.scorer.s.audit_to(run.audit_path, "tune")
    if resume_id is not None:
        st, extra = load_checkpoint(run.checkpoint_path, job.strategy, resume_id, job.cfg.d)
        run.keep_metrics(st.generation)
        log(f"resumed at generation {st.generation}")
    else:
        extra = zero_shot(job, run, log)
        st = LoopState(job.strategy.init(job.cfg.seed))
        run.keep_metrics(0)
    # wall time and set-up cost over every session of this run (a resumed run prefills again)
    clock = Clock(job.started, extra.get("elapsed_s", 0.0))
    extra = {**extra, "setups": extra.get("setups", []) + [job.cost]}
    checkpoint(job, run, st, extra, clock)
    return st, extra, clock


def zero_shot(job: Setup, run: RunDir, log) -> dict:
    """P0 on the test set through the back end (and, --head fit, the head fitted at P0 on train +
    dev): the baselines the tuned prompt is measured against, as the checkpoint's ``extra``."""
    scorer, labels = job.scorer, job.scorer.sets["test"].labels
    n0 = len(scorer.s.costs)
    words = scorer.score_words("test", None)
    logits = scorer.class_scores(*words)
    extra = {"zero_shot_test_acc": float(accuracy(logits, labels)[0]),
             "zero_shot_correct": (logits[0].argmax(-1) == labels).astype(int).tolist()}
    if job.cfg.save_logits:
        run.save_logits("test_zero_shot", logits=logits[0], labels=labels)
    log(f"zero-shot test accuracy (through {job.cfg.backend}): {extra['zero_shot_test_acc']:.3f}")
    if job.cfg.head == "fit":  # the fitted head at P0, on the same test examples: the baseline a tuned head must beat
        head0 = fit_head(scorer, None, job.cfg.seed)
        correct = head_predictions(head0, words[0][0]) == labels
        extra.update(zero_shot_head_test_acc=float(correct.mean()), zero_shot_head_correct=correct.astype(int).tolist(),
                     zero_shot_head_c=head0.c, zero_shot_head=fitted.to_json(head0))
        log(f"zero-shot test accuracy with a fitted head: {extra['zero_shot_head_test_acc']:.3f}")
    extra["zero_shot_cost"] = cost_sum(scorer.s.costs[n0:])
    return extra


def checkpoint(job: Setup, run: RunDir, st: LoopState, extra: dict, clock: Clock) -> None:
    """The loop state and ``extra`` (with the wall time so far) to ckpt.npz, under the run's id."""
    save_checkpoint(run.checkpoint_path, st, job.strategy, {**extra, "elapsed_s": clock.elapsed()}, run_id(job.cfg))


def generations(job: Setup, run: RunDir, st: LoopState, extra: dict, clock: Clock, objective: Objective,
                show_progress: bool, log) -> LoopState:
    """Generations from ``st`` until the budget (or ``--patience``) runs out, the search reading
    class scores through ``objective``; each one's metrics appended and its state checkpointed
    before the next starts (a killed run loses at most the generation it was in)."""
    cfg = job.cfg
    bar = _progress(cfg.budget, st.generation, show_progress)
    try:
        while st.generation < cfg.budget:
            st, m = run_generation(st, job.strategy, job.subspace, job.scorer, cfg, objective)
            m = record_generation(run, st.generation, m, cfg.save_logits)
            checkpoint(job, run, st, extra, clock)
            bar(m)
            if cfg.patience and st.since_best >= cfg.patience:
                log(f"early stop: no dev improvement for {cfg.patience} generations")
                break
    except BaseException:
        bar.close()  # the error line then starts a line of its own
        raise
    return st


def record_generation(run: RunDir, generation: int, m: dict, save_logits: bool) -> dict:
    """A generation's metrics appended to metrics.jsonl (``--save-logits``: its candidates and
    opened logits to logits/, the data owner's own files); returns the metrics without arrays."""
    if save_logits:
        (tr, dv), (tr_labels, dv_labels), (chunks, rows) = m["_logits"], m["_labels"], m["_rows"]
        run.save_logits(run.generation_name(generation), Z=m["_Z"], train_logits=tr, dev_logits=dv,
                        train_labels=tr_labels, dev_labels=dv_labels, train_chunks=chunks, dev_rows=rows)
    m = {k: v for k, v in m.items() if not k.startswith("_")}
    run.append_metrics(m)
    return m


def kept_z(st: LoopState, strategy, select: str) -> np.ndarray:
    """The prompt the run keeps: the lowest dev loss seen (``dev-loss``) or the search's mean."""
    return st.best_z if st.best_z is not None and select == "dev-loss" else strategy.mean(st.search)


def final_evaluation(job: Setup, run: RunDir, st: LoopState) -> FinalEval:
    """The kept prompt on the test set; under --head fit, train and dev once more at it (their
    rows are the head's only extra cost) for the head it reports (head.npz)."""
    cfg, scorer, labels = job.cfg, job.scorer, job.scorer.sets["test"].labels
    z = kept_z(st, job.strategy, cfg.select)
    n0 = len(scorer.s.costs)
    delta = job.subspace.offsets(z[None])
    words = scorer.score_words("test", delta)
    logits = scorer.class_scores(*words)[0]
    words_correct = (logits.argmax(-1) == labels).astype(int)
    head = fit_head(scorer, delta, cfg.seed) if cfg.head == "fit" else None
    predictions = head_predictions(head, words[0][0]) if head else logits.argmax(-1)
    if cfg.save_logits:  # the reported predictions too, to compare runs example by example
        run.save_logits("test_tuned", logits=logits, labels=labels, predictions=predictions)
    if head is None:
        return FinalEval(z, words_correct, words_correct, None, cost_sum(scorer.s.costs[n0:]))
    run.write_head(head, scorer.word_groups)
    return FinalEval(z, words_correct, (predictions == labels).astype(int), head, cost_sum(scorer.s.costs[n0:]))


def report(job: Setup, run: RunDir, st: LoopState, extra: dict, final: FinalEval, clock: Clock) -> dict:
    """The run's summary, written with the kept z (best_z.npy, after the summary: it marks the run
    finished) and curves.png. Its reveals are tune's own over every session (predict's and eval's, appended
    to the same audit, are not)."""
    metrics = run.read_metrics()
    reveals = (group_reveals(run.read_audit("tune")), job.scorer.s.reveal_summary())
    summary = summarize(job, st, extra, final, metrics, reveals, clock.elapsed())
    run.write_summary(summary)
    run.write_best_z(final.z)
    plot_run(metrics, run.curves_path)
    return summary


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


