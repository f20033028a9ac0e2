"""A tuning run's settings: what they may be, what makes a checkpoint a run's, where its data is.

The job is five groups of settings, each a frozen dataclass that refuses a bad value as it is
built, in one line naming the option (so before anything runs):

    TuneConfig
      data     DataConfig     what is tuned on: the task or your files, how many examples of each split
      prompt   PromptConfig   the soft prompt: P0, its tokens, where it enters the model, its subspace
      search   SearchConfig   the search: strategy, population, budget, mini-batches, dev, loss, selection
      readout  ReadoutConfig  how the opened logits are read: words per class, calibration, head, objective
      run      RunConfig      where it runs: model, policy, back end, seed, output directory

Every field is a ``secptune tune`` option (``add_options``: flag, type, default and help from the
field, stated once here) and is read flat (``cfg.shots``); ``TuneConfig.of(**flat)`` builds a
config from keyword arguments by field name, ``cfg.replace(**flat)`` changes some, and
``cfg.flat()`` gives them all back. A run stores them flat as ``config.json``
(``RunDir.write_config``); ``--resume``, predict, eval and the benches rebuild the run from it
(``stored_config``: a field it lacks takes the value it had then, ``CHANGED_DEFAULTS``).
``run_id`` is what a checkpoint must match to be resumed as this run. Data files are stored as
absolute paths, so that a run is usable from any directory (``load_run_config`` reads an older
run's relative ones against the current directory).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import numbers
import os

from ..errors import UserError
from .rundir import RunDir
from .search import STRATEGIES

MODES = ("cached", "prefix")
PROMPT_FORMS = ("virtual", "kv", "hidden")  # spu_models.forward.PROMPT_FORMS, which builds them
LOSSES = ("ce", "hinge")
DEV_EVAL = ("mean", "all")
COMBINE = ("lse", "mean")
CALIBRATIONS = ("none", "cf", "batch")
HEADS = ("words", "fit")
OBJECTIVES = ("words", "head", "refit")
SELECT = ("dev-loss", "final-mean")
BACKENDS = ("plaintext", "sim", "cluster", "secretflow")  # secretflow: the back end of `secptune sf-job`
DEEP_DEFAULT = 4  # --prompt-depth auto: the top 4 layers (the demo's: of SmolLM2's 30)
FAST_SILU_MODELS = {"smollm2-135m": "aby3-fast"}  # where relu_poly SiLU's agreement was measured (docs/numerics.md)


def setting(default, help: str, *, choices: tuple = (), metavar: str | None = None, parse=None):
    """A field of a settings group: its default and option help, and what the option accepts
    (``choices``: the values the group allows; ``parse``: the text to a value, default by the
    field's type)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices), "metavar": metavar,
                                                        "parse": parse})


def flag(name: str) -> str:
    """The option of setting ``name``: ``n_test`` -> ``--n-test``."""
    return "--" + name.replace("_", "-")


def _depth(text: str):
    """--prompt-depth's text: an integer K, or a word the prompt group knows (auto, all)."""
    return int(text) if text.lstrip("-").isdigit() else text


class _Group:
    """What every settings group checks with: one line naming the option."""

    def _choice(self, name: str) -> None:
        known = next(f.metadata["choices"] for f in dataclasses.fields(self) if f.name == name)
        if getattr(self, name) not in known:
            raise UserError(f"unknown {flag(name)} {getattr(self, name)!r} (known: {', '.join(known)})")

    def _integer(self, name: str, least: int, optional: bool = False) -> None:
        v = getattr(self, name)
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
            words = " or 'all' or 'auto'" if name == "prompt_depth" else ""
            raise UserError(f"{flag(name)} must be an integer >= {least}{words}, not {v!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Group):
    """What is tuned on: a registered task or your own files, and how many examples of each split."""
    task: str | None = setting("mr", "registered task name (see `secptune tasks`)")
    train: str | None = setting(None, "your own CSV/TSV/JSONL training file (instead of --task)")
    test: str | None = setting(None, "your own test file (default: a stratified 20% of --train)")
    text_column: str = setting("text", "the text column of --train / --test")
    label_column: str = setting("label", "the label column of --train / --test")
    verbalizer: str = setting("positive=great,negative=terrible", "label=word pairs, comma-separated (with --train)")
    template: str | None = setting(None, "prompt template with a {text} placeholder (with --train; default: the text)")
    shots: int = setting(16, "training examples per class; dev uses as many again (--dev-shots)")
    dev_shots: int | None = setting(None, "dev examples per class (default: --shots)")
    n_test: int = setting(200, "test examples evaluated (a stratified subset of the shuffled test split)")
    max_words: int | None = setting(None, "truncate texts to this many words (default: the task's)")

    def __post_init__(self):
        if bool(self.task) == bool(self.train):
            raise UserError("give exactly one of --task NAME or --train FILE")
        self._integer("shots", 1)
        self._integer("dev_shots", 1, optional=True)
        self._integer("n_test", 1)
        self._integer("max_words", 1, optional=True)


@dataclasses.dataclass(frozen=True)
class PromptConfig(_Group):
    """The soft prompt P = P0 + A z: its first value, its tokens, where it enters the model, the
    dimension of z."""
    n_tokens: int = setting(5, "soft prompt tokens (with --init text: its token count)")
    init: str = setting("vocab", "P0: 'vocab' (sampled token embeddings) or 'text:<words>' (a hard prompt's "
                                 "embeddings; sets --n-tokens to its token count)", metavar="vocab|text:WORDS")
    mode: str = setting("cached", "prompt placement: cached (the text, then the prompt and the template's tail; the "
                                  "text's states computed once) or prefix (BBT's: the prompt first, all recomputed "
                                  "per candidate)", choices=MODES)
    prompt_depth: int | str | None = setting(
        "auto", "the prompt enters the top K layers only; below them everything is computed once per example. "
                "'all': every layer, the prompt at the input; 'auto': the top 4 (every layer under --mode prefix "
                "or in a model of 4 layers or fewer)", metavar="K|all|auto", parse=_depth)
    prompt_form: str = setting("virtual", "how a deep prompt enters its layers: virtual = key/value prefixes in the "
                                          "top layers only (no prompt token below them; measured best), kv = "
                                          "key/value offsets of P0's tokens, hidden = offsets of their hidden "
                                          "states entering layer L-K", choices=PROMPT_FORMS)
    d: int = setting(500, "subspace dimension: the search's z")

    def __post_init__(self):
        self._integer("n_tokens", 1)
        if self.init != "vocab" and not (self.init.startswith("text:") and self.init[len("text:"):].strip()):
            raise UserError(f"unknown --init {self.init!r}: use 'vocab' or 'text:<words>'")
        self._choice("mode")
        if self.prompt_depth == "all":  # stored as None: every layer, the input placement
            object.__setattr__(self, "prompt_depth", None)
        if self.prompt_depth not in (None, "auto"):
            self._integer("prompt_depth", 1)  # the model's layer count is checked as its programs are built
            if self.mode != "cached":
                raise UserError(f"--prompt-depth {self.prompt_depth} needs --mode cached (--mode {self.mode} "
                                "places the prompt at the input)")
        self._choice("prompt_form")
        self._integer("d", 1)


@dataclasses.dataclass(frozen=True)
class SearchConfig(_Group):
    """The derivative-free search over z: strategy, population, budget, what each generation
    scores, its loss, the prompt kept and when to stop."""
    strategy: str = setting("cma", "search strategy", choices=tuple(STRATEGIES))
    popsize: int = setting(20, "candidates per generation")
    budget: int = setting(100, "generations")
    sigma0: float = setting(1.0, "CMA-ES's initial step size")
    train_batch: int = setting(16, "score each generation on a stratified mini-batch of B training examples "
                                   "(0: all of them)", metavar="B")
    dev_eval: str = setting("mean", "candidates scored on dev each generation: mean (only the search mean, the "
                                    "selection candidate) or all", choices=DEV_EVAL)
    loss: str = setting("ce", "the training loss the search minimises", choices=LOSSES)
    select: str = setting("dev-loss", "the prompt kept: the lowest dev loss seen or the search's final mean",
                          choices=SELECT)
    patience: int = setting(0, "stop after N generations without a dev improvement (0: never)", metavar="N")

    def __post_init__(self):
        self._choice("strategy")
        self._integer("popsize", 2)
        if self.strategy == "spsa" and self.popsize % 2:
            raise UserError(f"--strategy spsa needs an even --popsize (popsize/2 +- pairs), not {self.popsize}")
        self._integer("budget", 1)
        if isinstance(self.sigma0, bool) or not isinstance(self.sigma0, numbers.Real) or not (
                math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise UserError(f"--sigma0 must be a finite positive number, not {self.sigma0!r}")
        self._integer("train_batch", 0)
        self._choice("dev_eval")
        self._choice("loss")
        self._choice("select")
        self._integer("patience", 0)


@dataclasses.dataclass(frozen=True)
class ReadoutConfig(_Group):
    """How the data owner reads the logits opened to it: the words of each class, their
    calibration, the classifier over them and what the search minimises."""
    label_words: str | None = setting(None, "verbalizer words per label, several allowed: "
                                            "'positive=positive|great,negative=negative|bad' (any task; default: "
                                            "the task's verbalizer)", metavar="SPEC")
    combine: str = setting("lse", "how a label's words combine: log-sum-exp or mean", choices=COMBINE)
    calibrate: str = setting("none", "calibration at the data owner: cf = content-free inputs (3 extra rows per "
                                     "secure call), batch = the scored examples' mean (no extra rows)",
                             choices=CALIBRATIONS)
    head: str = setting("words", "the classifier over the opened logits: words = the verbalizer's; fit = a logistic "
                                 "regression over them and probe words, fitted on train + dev at the data owner (W "
                                 "logits opened per row instead of one per class; train + dev scored once more)",
                        choices=HEADS)
    probe_words: str | None = setting(None, "--head fit: the probe words (default: the task's pool)",
                                      metavar="W1,W2,...")
    objective: str = setting("words", "what the search minimises: the verbalizer's cross-entropy, that of the head "
                                      "fitted at P0, or (refit) the k-fold held-out cross-entropy of a head fitted "
                                      "on each candidate's own logits (with --head fit; the head is fitted again at "
                                      "the kept prompt)", choices=OBJECTIVES)

    def __post_init__(self):
        self._choice("combine")
        self._choice("calibrate")
        self._choice("head")
        if self.probe_words is not None and not any(w.strip() for w in self.probe_words.split(",")):
            raise UserError(f"--probe-words {self.probe_words!r} names no word")
        self._choice("objective")
        if self.objective != "words" and self.head != "fit":
            raise UserError(f"--objective {self.objective} searches against a fitted head: it needs --head fit")


@dataclasses.dataclass(frozen=True)
class RunConfig(_Group):
    """Where and as what the run executes: the model, the policy, the back end, the seed, the
    output directory."""
    model: str = setting("smollm2-135m", "smollm2-135m, tiny-llama, an HF model directory or a .gguf")
    policy: str | None = setting(None, "policy name in policies/ or a YAML path (default: aby3-fast, SiLU as "
                                       "relu_poly, for smollm2-135m, where its agreement was measured; aby3 for "
                                       "any other model)")
    backend: str = setting("sim", "plaintext (the same programs in the clear), sim (SPU's simulator) or cluster "
                                  "(one process per party)", choices=BACKENDS, metavar="{plaintext,sim,cluster}")
    cluster: str | None = setting(None, "--backend cluster: drive the nodes this deployment file names (started "
                                        "with `secptune node`) instead of launching them here", metavar="FILE")
    seed: int = setting(0, "seeds the k-shot split, the subspace and the search")
    out: str = setting("runs/tune", "output directory")
    save_logits: bool = setting(False, "keep each generation's candidates and opened logits in OUT/logits/")

    def __post_init__(self):
        if self.policy is None:
            object.__setattr__(self, "policy", FAST_SILU_MODELS.get(self.model, "aby3"))
        self._choice("backend")
        self._integer("seed", 0)
        if not self.out:
            raise UserError("--out must name a directory")


GROUPS = {"data": DataConfig, "prompt": PromptConfig, "search": SearchConfig, "readout": ReadoutConfig,
          "run": RunConfig}
GROUP_OF = {f.name: g for g, kind in GROUPS.items() for f in dataclasses.fields(kind)}  # setting -> its group


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Every setting of ``secptune tune``, in its groups; each setting is also read flat (``cfg.shots``)."""
    data: DataConfig = DataConfig()
    prompt: PromptConfig = PromptConfig()
    search: SearchConfig = SearchConfig()
    readout: ReadoutConfig = ReadoutConfig()
    run: RunConfig = RunConfig()

    @classmethod
    def of(cls, **settings) -> "TuneConfig":
        """A config from settings by name (``TuneConfig.of(model="tiny-llama", shots=4)``); the rest default."""
        unknown = sorted(set(settings) - set(GROUP_OF))
        if unknown:
            raise TypeError(f"TuneConfig has no setting {', '.join(unknown)}")
        return cls(**{g: kind(**{k: v for k, v in settings.items() if GROUP_OF[k] == g})
                      for g, kind in GROUPS.items()})

    def flat(self) -> dict:
        """Every setting by name, as config.json holds them."""
        return {name: getattr(getattr(self, g), name) for name, g in GROUP_OF.items()}

    def replace(self, **settings) -> "TuneConfig":
        """This config with some settings changed (checked again)."""
        return TuneConfig.of(**{**self.flat(), **settings})

    @staticmethod
    def default(name: str):
        """Setting ``name``'s default."""
        return next(f.default for f in dataclasses.fields(GROUPS[GROUP_OF[name]]) if f.name == name)


for _name, _group in GROUP_OF.items():  # flat read access: cfg.shots is cfg.data.shots
    setattr(TuneConfig, _name, property(lambda self, g=_group, n=_name: getattr(getattr(self, g), n)))


# ------------------------------------------------------------------------- the command line
def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per setting, grouped as the config is: ``--n-test`` for ``n_test``, its type,
    help and choices from the field. An option left out is None in the parsed arguments (the
    config's default then applies: :func:`given`); the help states that default."""
    for g, kind in GROUPS.items():
        section = parser.add_argument_group(f"{g} settings", kind.__doc__.split("\n\n")[0].replace("\n", " "))
        for f in dataclasses.fields(kind):
            m = f.metadata
            text = m["help"] + ("" if f.default is None or isinstance(f.default, bool) else f" (default: {f.default})")
            kw = {"dest": f.name, "default": None, "help": text.replace("%", "%%")}
            if f.type == "bool":
                section.add_argument(flag(f.name), action="store_true", **kw)
                continue
            parse = m["parse"] or (int if f.type.startswith("int") else float if f.type == "float" else str)
            metavar = m["metavar"] or ("{" + ",".join(m["choices"]) + "}" if m["choices"] else None)
            section.add_argument(flag(f.name), type=parse, metavar=metavar, **kw)


def given(options: dict) -> dict:
    """The settings among parsed ``options`` (``vars(args)``) that were given: your own --train
    replaces the default task (not one you gave: both are refused)."""
    kw = {k: v for k, v in options.items() if k in GROUP_OF and v is not None}
    if kw.get("train") and "task" not in kw:
        kw["task"] = None
    return kw


# ------------------------------------------------------------------- what a stored run ran with
# Defaults that changed, one row each: (the old default, the new). A stored config.json without
# one of these fields was written before the field existed, so it ran with the old value; every
# other absent field takes its default (it had that value before it was stored). Issue 29: the
# demo's configuration (late-layer virtual prompt, mini-batches, dev for the search mean, the cheap
# SiLU where its agreement was measured) became the default.
CHANGED_DEFAULTS = {
    "policy": ("aby3", "aby3-fast for smollm2-135m, else aby3"),
    "prompt_depth": (None, "auto: the top 4 layers"),
    "prompt_form": ("kv", "virtual"),
    "train_batch": (0, 16),
    "dev_eval": ("all", "mean"),
}


def absent_value(name: str):
    """What a stored run without setting ``name`` ran with (None for a name that is no setting)."""
    if name in CHANGED_DEFAULTS:
        return CHANGED_DEFAULTS[name][0]
    return TuneConfig.default(name) if name in GROUP_OF else None


# settings added after runs were checkpointed: at these values they leave a run's id as it was
LATER_DEFAULTS = {"head": "words", "probe_words": None, "select": "dev-loss", "objective": "words"}


def run_id(settings) -> str:
    """What makes a checkpoint this run's: its settings (a TuneConfig, or a run's config.json as
    stored, whatever fields that version wrote) but the budget and where it lives."""
    flat = settings.flat() if isinstance(settings, TuneConfig) else settings
    d = {k: v for k, v in flat.items()
         if k not in ("budget", "out", "n_tokens", "cluster") and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def placed(cfg: TuneConfig, n_layers: int) -> TuneConfig:
    """``cfg`` with its prompt depth for a model of ``n_layers`` layers: ``auto`` is the top
    ``DEEP_DEFAULT`` under the cached placement, or every layer (None) under prefix or in a
    model that has no more; a depth given stays as given."""
    if cfg.prompt_depth != "auto":
        return cfg
    return cfg.replace(prompt_depth=DEEP_DEFAULT if cfg.mode == "cached" and n_layers > DEEP_DEFAULT else None)


# ----------------------------------------------------------------------------- data paths
def with_absolute_paths(cfg: TuneConfig) -> TuneConfig:
    """--train / --test as absolute paths (a new run stores them so: predict and the benches
    read its data from any directory)."""
    return cfg.replace(**{k: os.path.abspath(getattr(cfg, k)) for k in ("train", "test") if getattr(cfg, k)})


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


def from_stored(settings: dict) -> TuneConfig:
    """The config a run's stored settings describe: a field they lack takes :func:`absent_value`."""
    return TuneConfig.of(**{**{k: absent_value(k) for k in CHANGED_DEFAULTS}, **settings})


def stored_config(run: RunDir, what: str) -> TuneConfig:
    """The settings the run in ``run`` recorded (config.json), as written, with the run's
    directory as its out; one line (prefixed ``what``) if it is missing or not a run's."""
    try:
        return from_stored({**run.read_config(), "out": str(run.path)})
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{what} {run.path}: its config.json is missing or not a run's settings "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None


def load_run_config(out, what: str) -> TuneConfig:
    """The run's settings, ready to rebuild it: :func:`stored_config` with absolute data paths."""
    run = RunDir(out)
    return resolve_data_paths(stored_config(run, what), f"{what} {run.path}")


def config_line(cfg: TuneConfig) -> str:
    """The run's configuration in one line, as it starts."""
    where = "prompt at the input" if cfg.prompt_depth in (None, "all") else (
        f"{cfg.prompt_form} prompt in the top {cfg.prompt_depth} layers")
    batch = f"mini-batches of {cfg.train_batch} training examples" if cfg.train_batch else "all training examples"
    return (f"config: {cfg.mode} placement, {where}, P0 {cfg.init!r} ({cfg.n_tokens} tokens), subspace d={cfg.d}; "
            f"{cfg.strategy} popsize {cfg.popsize} x {cfg.budget} generations, sigma0 {cfg.sigma0:g}; {batch}; "
            f"dev: {cfg.dev_eval}; loss {cfg.loss}, objective {cfg.objective}, head {cfg.head}, select {cfg.select}, "
            f"calibrate {cfg.calibrate}; policy {cfg.policy}, back end {cfg.backend}, seed {cfg.seed}")
