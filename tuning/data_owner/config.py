"""A tuning run's settings: what they may be, what makes a checkpoint a run's, where its data is.

``TuneConfig`` is every setting of ``secptune tune``; a run stores it as ``config.json``
(``RunDir.write_config``) and ``--resume``, predict, eval and the benches rebuild the run from it.
``check_settings`` refuses an impossible combination in one line before anything runs;
``run_id`` is what a checkpoint must match to be resumed as this run. Data files are stored as
absolute paths, so that a run is usable from any directory (``load_run_config`` reads an older
run's relative ones against the current directory).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from ..errors import UserError
from .rundir import RunDir

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
    cluster: str | None = None  # --backend cluster: the deployment whose running nodes it drives (None: launch here)
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


def check_settings(cfg: TuneConfig) -> None:
    """Every setting in range and every combination possible; one line otherwise."""
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


# settings added after runs were checkpointed: at these values they leave a run's id as it was
LATER_DEFAULTS = {"head": "words", "probe_words": None, "select": "dev-loss", "objective": "words"}


def run_id(cfg: TuneConfig) -> str:
    """What makes a checkpoint this run's: its settings but the budget and where it (and its nodes) live."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items()
         if k not in ("budget", "out", "n_tokens", "cluster") and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- data paths
def with_absolute_paths(cfg: TuneConfig) -> TuneConfig:
    """--train / --test as absolute paths (a new run stores them so: predict and the benches
    read its data from any directory)."""
    return dataclasses.replace(cfg, **{k: os.path.abspath(getattr(cfg, k)) for k in ("train", "test")
                                       if getattr(cfg, k)})


def resolve_data_paths(cfg: TuneConfig, what: str) -> TuneConfig:
    """The stored run's data paths made absolute. A run tuned before they were stored absolute
    holds them as given, relative to where it was tuned: they are read from the current
    directory, and a missing one is one line (``what`` names the run's option)."""
    for k in ("train", "test"):
        path = getattr(cfg, k)
        if path and not os.path.isabs(path) and not os.path.isfile(path):
            raise UserError(f"{what}: its config.json names --{k} {path}, relative to the directory the run was "
                            f"tuned from, and {os.getcwd()} has no such file; run this from that directory")
    return with_absolute_paths(cfg)


def stored_config(run: RunDir, what: str) -> TuneConfig:
    """The settings the run in ``run`` recorded (config.json), as written, with the run's
    directory as its out; one line (prefixed ``what``) if it is missing or not a run's."""
    try:
        return TuneConfig(**{**run.read_config(), "out": str(run.path)})
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{what} {run.path}: its config.json is missing or not a run's settings "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None


def load_run_config(out, what: str) -> TuneConfig:
    """The run's settings, ready to rebuild it: :func:`stored_config` with absolute data paths."""
    run = RunDir(out)
    return resolve_data_paths(stored_config(run, what), f"{what} {run.path}")


def config_line(cfg: TuneConfig) -> str:
    """The run's configuration in one line, as it starts."""
    where = "prompt at the input" if cfg.prompt_depth is None else f"{cfg.prompt_form} prompt in the top {cfg.prompt_depth} layers"
    batch = f"{cfg.train_batch} training examples per generation" if cfg.train_batch else "all training examples"
    return (f"config: {cfg.mode} placement, {where}, P0 {cfg.init!r} ({cfg.n_tokens} tokens), subspace d={cfg.d}; "
            f"{cfg.strategy} popsize {cfg.popsize} x {cfg.budget} generations, sigma0 {cfg.sigma0:g}; {batch}; "
            f"dev: {cfg.dev_eval}; loss {cfg.loss}, objective {cfg.objective}, head {cfg.head}, select {cfg.select}; "
            f"policy {cfg.policy}, back end {cfg.backend}, seed {cfg.seed}")
