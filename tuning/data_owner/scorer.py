"""The data owner's handle on the secure scorer.

It secret-shares each example set once (and, in ``cached`` mode, has the parties prefill its
prefix-state cache once), then scores whole populations of soft prompts against it with one
secure program per call. Only the verbalizer logits are opened, and only here, at the data owner.

Placements:
- ``cached`` (default): text, then soft prompt, then template tail. Causal attention makes the
  text's keys/values independent of the prompt, so they are computed once per example and stay
  secret-shared. With ``depth`` K < L (a *deep* prompt, ``spu_models.forward``) the prompt enters
  only the top K layers: everything below them is prefilled once per example too, and a
  candidate runs the tail (form ``kv``) or prompt + tail (form ``hidden``) through K layers.
  K = L (default): the prompt is embeddings at the input, and prompt + tail run through all L.
- ``prefix`` (BBT): soft prompt, then the whole template with text; recomputed per candidate.

An example set is shared in *chunks* (``groups``): each chunk is one prefill and one call per
score, compiled once per shape. The trainer uses them as mini-batches; the parties learn only
which chunk a call reads (public), never which example is in it.

After the reveal, at the data owner and in plaintext (no MPC cost beyond the rows noted):
- a label may have several verbalizer words (``" positive| great"``): the secret one-hot rows
  hold all of them, and each class's logit combines its words (``combine``: log-sum-exp or mean);
- probe words (``probe_words``, for ``--head fit``): more one-hot rows in the same secret head;
  their logits are opened with the verbalizer's (W per row instead of R) and take no part in the
  class logits; a head fitted at the data owner (``loop.head``) reads them all;
- ``calibrate``: ``"cf"`` (contextual calibration, Zhao et al. 2021: the class log-probabilities
  less those of content-free inputs, ``CONTENT_FREE``, which ride along as a few extra rows of
  every chunk's call), or ``"batch"`` (the mean class log-probabilities of the scored examples
  themselves: no extra rows), or ``"none"``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spu_models import llama
from spu_models.forward import make_tuning_programs

from .config import CALIBRATIONS, COMBINE, MODES
from .encode import pad_length, verbalizer_ids
from ..model_owner.approval import ProgramRef
from ..errors import UserError

CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al.'s content-free inputs


def verbalizer_words(task, label) -> list[str]:
    """The words of ``label``: its verbalizer entry, alternatives separated by '|'."""
    return [w for w in task.verbalizer[label].split("|") if w.strip()]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def combine_words(word_logits: np.ndarray, groups: np.ndarray, how: str = "lse") -> np.ndarray:
    """[..., W] logits of the verbalizer words -> [..., R] class logits; ``groups[w]`` = class of word w."""
    out = []
    for r in range(int(groups.max()) + 1):
        z = word_logits[..., groups == r]
        if how == "mean":
            out.append(z.mean(-1))
        else:
            m = z.max(-1, keepdims=True)
            out.append((m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0])
    return np.stack(out, -1)


def calibrated(logits: np.ndarray, how: str, content_free: np.ndarray | None = None) -> np.ndarray:
    """Class scores [P, E, R] after calibration: log p(y|x) - log p_ref(y), with p_ref the mean
    class probability of the content-free inputs (``"cf"``, ``content_free`` [P, C, R]) or of the
    scored examples (``"batch"``); ``"none"``: the logits unchanged."""
    if how == "none":
        return logits
    ref = content_free if how == "cf" else logits
    p_ref = np.exp(_log_softmax(ref)).mean(1, keepdims=True)  # [P, 1, R]
    return _log_softmax(logits) - np.log(np.maximum(p_ref, 1e-12))


def split_template(template: str) -> tuple[str, str]:
    """'Review: {text}\\nSentiment:' -> ('Review: {text}', '\\nSentiment:')."""
    i = template.index("{text}") + len("{text}")
    return template[:i], template[i:]


def delta_shape(config, n_tokens: int, depth: int | None = None, form: str = "kv") -> tuple:
    """The shape of one candidate's offset, what the subspace maps z to: [n, H] at the input or
    for a deep ``hidden`` prompt, [K, 2, n, KV, D] (keys and values per top layer) for ``kv``."""
    if depth is not None and depth < config.num_hidden_layers and form in ("kv", "virtual"):
        return (depth, 2, n_tokens, config.num_key_value_heads, config.head_dim)
    return (n_tokens, config.hidden_size)


def length_groups(texts: list, chunk: int | None) -> list[list[int]]:
    """Indices of ``texts`` dealt into chunks of at most ``chunk`` (None: one chunk), consecutive
    by length (each chunk pads to its own longest), of near-equal sizes."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    k = -(-len(order) // (chunk or len(order)))
    return [[int(i) for i in g] for g in np.array_split(order, k)]


def _arguments(chunk: dict) -> dict:
    return {k: v for k, v in chunk.items() if not k.startswith("_")}  # "_name", "_size", "_zs": bookkeeping


@dataclasses.dataclass
class ExampleSet:
    name: str
    labels: np.ndarray  # [E] int, in chunk order (kept at the data owner, never shared)
    n: int
    chunks: list = dataclasses.field(default_factory=list)  # per chunk: program argument -> resident var
    order: np.ndarray | None = None  # [E] the examples' indices in chunk order (the rows every score returns)

    def arguments(self, c: int) -> dict:
        """Chunk ``c``'s program arguments -> the resident variables that hold them (what a score of
        it reads besides the head, the prompt and the deep scale); the scorer's own bookkeeping
        (the chunk's name, size, zero-shot logits) left out."""
        return _arguments(self.chunks[c])

    def chunk_labels(self, which) -> np.ndarray:
        sizes = np.cumsum([0] + [c["_size"] for c in self.chunks])
        return np.concatenate([self.labels[sizes[i]: sizes[i + 1]] for i in which])


class SecureScorer:
    def __init__(self, session, bundle, task, mode: str = "cached", n_tokens: int = 5, p0_ids=None,
                 depth: int | None = None, form: str = "kv", calibrate: str = "none", combine: str = "lse",
                 probe_words: tuple = ()):
        # the run's config refused any other value before anything ran (config.py)
        assert mode in MODES and calibrate in CALIBRATIONS and combine in COMBINE, (mode, calibrate, combine)
        self.calibrate, self.combine = calibrate, combine
        cfg = bundle.config
        L = cfg.num_hidden_layers
        depth = L if depth is None else depth
        assert depth == L or mode == "cached", f"a prompt of depth {depth} under the {mode} placement"
        if depth != L and p0_ids is None and form != "virtual":
            raise UserError("a deep prompt of this form starts from P0's tokens: give p0_ids")
        self.s, self.bundle, self.task, self.mode = session, bundle, task, mode
        self.n_tokens, self.depth, self.form = n_tokens, depth, form
        self.deep = depth < L
        self.scale_var = f"deep_scale_{form}{depth}"
        self.programs = make_tuning_programs(cfg, session.execution, depth, form)
        self.tok = bundle.tokenizer
        self.label_index = {l: i for i, l in enumerate(task.labels)}
        self.sets: dict = {}
        self.head_template, self.tail_template = split_template(task.template)
        # verbalizer rows of the LM head: shared as one-hot rows, reduced to [W, H] once, resident
        # (probe words: extra rows whose logits are opened for a head fitted at the data owner, group -1)
        per_label = [verbalizer_words(task, l) for l in task.labels]
        words = [w for ws in per_label for w in ws]
        ids = verbalizer_ids(self.tok, words)
        probe_ids = [i for i in dict.fromkeys(verbalizer_ids(self.tok, [w])[0] for w in probe_words) if i not in ids]
        self.word_groups = np.array([r for r, ws in enumerate(per_label) for _ in ws] + [-1] * len(probe_ids))
        rows = np.zeros((len(ids) + len(probe_ids), cfg.vocab_size), np.float32)
        rows[np.arange(len(rows)), ids + probe_ids] = 1.0
        self.s.put("rows", rows)
        self.s.run(self._program("head"), {"rows": "rows"}, ["head"], persist=True)  # zeros unless rows is one-hot
        self.s.drop("rows")
        if mode == "cached":
            tail = self._ids(self.tail_template)
            if not tail:
                raise UserError(f"template {task.template!r} has nothing after {{text}}; the cached placement "
                                 "needs a tail (e.g. '\\nSentiment:')")
            self._share_tokens("tail", np.asarray(tail))
        if p0_ids is not None:  # P0: embeddings of the initial prompt tokens, resident
            self._share_tokens("p0", np.asarray(p0_ids))

    def _program(self, name: str) -> ProgramRef:
        """The tuning program ``name`` for this prompt's depth and form, as the model owner approves it."""
        return ProgramRef(name, self.depth, self.form)

    @property
    def delta_shape(self) -> tuple:
        return delta_shape(self.bundle.config, self.n_tokens, self.depth, self.form)

    # ---------------------------------------------------------------- sharing
    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _share_tokens(self, name: str, ids: np.ndarray) -> None:
        """Share token embeddings [..., L, H] under ``name``, per the policy's embedding mode."""
        if self.s.policy.embedding == "data_owner":  # the data owner holds the table (policy says so)
            self.s.put(name, self.s.embedding_table()[ids])
        elif self.s.name == "plaintext":  # the same lookup in the clear, without a one-hot [..., V] array
            self.s.put(name, self.s.lookup(ids))
        else:  # one-hot tokens; the lookup is a matmul inside MPC
            onehot = np.eye(self.bundle.config.vocab_size, dtype=np.float32)[ids]
            self.s.put(name + "_onehot", onehot)
            self.s.run(self._program("embed"), {"onehot": name + "_onehot"}, {"embeds": name}, persist=True)
            self.s.drop(name + "_onehot")

    def add_examples(self, name: str, examples: list, groups: list | None = None,
                     zero_shot: bool = False) -> ExampleSet:
        """Share an example set once, in chunks (``groups``: lists of indices into ``examples``;
        default: the session's ``chunk`` texts of similar length, or one chunk); in cached mode
        also prefill each. ``zero_shot``: a deep prefill also computes the set's zero-shot logits
        (``score(name, None)``); other placements compute them on demand."""
        if groups is None:
            groups = length_groups([t for t, _ in examples], self.s.chunk)
        labels = np.array([self.label_index[examples[i][1]] for g in groups for i in g])
        self.check_lengths(name, examples)  # before any of the set is shared
        extra = list(CONTENT_FREE) if self.calibrate == "cf" else []  # a few rows of every call
        chunks = [self._add_chunk(f"{name}{c}", [examples[i][0] for i in g] + extra, zero_shot) for c, g in
                  enumerate(groups)]
        for c, g in zip(chunks, groups):
            c["_size"] = len(g)  # the real examples (content-free rows follow them)
        self.sets[name] = ExampleSet(name, labels, len(labels), chunks, np.array([i for g in groups for i in g]))
        return self.sets[name]

    def drop_examples(self, name: str) -> None:
        """Free everything the parties hold for example set ``name`` (its chunks' shares and caches)."""
        for chunk in self.sets.pop(name).chunks:
            prefix = chunk["_name"] + "_"  # every variable of a chunk is named "<chunk>_..."
            self.s.drop(*[v for v in list(self.s.shapes) if v.startswith(prefix)])

    def check_lengths(self, name: str, examples: list) -> None:
        """Every example's prompt, padded, plus the soft prompt must fit the model's positions."""
        limit = getattr(self.bundle.config, "max_position_embeddings", None)
        if not limit:
            return
        for i, (text, _) in enumerate(examples):
            n = pad_length(len(self._ids(self.task.prompt(text))), self.s.pad_multiple) + self.n_tokens
            if n > limit:
                raise UserError(f"example {i + 1} of the {name} set needs {n} positions (prompt padded, plus "
                                f"{self.n_tokens} soft tokens) but the model has {limit}; cut the texts "
                                "(--max-words) or drop that example")

    def _add_chunk(self, name: str, texts: list, zero_shot: bool = False) -> dict:
        """Share (and prefill) one chunk; returns what every score of it reads."""
        L = self.bundle.config.num_hidden_layers
        if self.mode == "prefix":
            seqs = [self._ids(self.task.prompt(t)) for t in texts]
            Lt = pad_length(max(len(s) for s in seqs) + self.n_tokens) - self.n_tokens
            ids = np.zeros((len(seqs), Lt), np.int64)
            for e, s in enumerate(seqs):
                ids[e, : len(s)] = s
            self._share_tokens(f"{name}_text", ids)
            for n, key in ((self.n_tokens, "select"), (0, "select0")):  # with and without a prompt
                sel = np.zeros((len(seqs), n + Lt), np.float32)
                sel[np.arange(len(seqs)), [n + len(s) - 1 for s in seqs]] = 1.0
                self.s.put(f"{name}_{key}", sel)
            return {"text": f"{name}_text", "_name": name}
        seqs = [self._ids(self.head_template.replace("{text}", t)) for t in texts]
        Lp = pad_length(max(len(s) for s in seqs), self.s.pad_multiple)  # coarse: few shapes to compile
        ids = np.zeros((len(seqs), Lp), np.int64)
        mask = np.zeros((len(seqs), Lp), np.float32)
        for e, s in enumerate(seqs):  # left padding: every text ends at Lp - 1
            ids[e, Lp - len(s):], mask[e, Lp - len(s):] = s, 1.0
        self._share_tokens(f"{name}_text", ids)
        self.s.put(f"{name}_mask", mask)
        shift = self._shift(name, seqs, Lp)
        layers = self.programs["top"] if self.deep else range(L)
        cache = {f"cache_{kv}{i}": f"{name}_cache_{kv}{i}" for i in layers for kv in "kv"}
        if not self.deep:
            self.s.run(self._program("prefill"), {"text": f"{name}_text", "text_mask": f"{name}_mask", **shift}, cache,
                       persist=True)
            self.s.drop(f"{name}_text")
            return {"text_mask": f"{name}_mask", **shift, **cache, "_name": name}
        deep = {"deep_h": f"{name}_deep_h"}
        if self.form == "kv":
            deep.update({f"prompt_{kv}{i}": f"{name}_prompt_{kv}{i}" for i in layers for kv in "kv"})
        zs = {"zs_logits": f"{name}_zs"} if zero_shot else {}
        p0 = {} if self.form == "virtual" else {"p0": "p0"}
        self.s.run(self._program("prefill_deep"), {"text": f"{name}_text", "text_mask": f"{name}_mask", **p0,
                                                   "tail": "tail", **({"head": "head"} if zero_shot else {}), **shift},
                   {**cache, **deep, **zs}, persist=True)  # its approval opens zs_logits, as verbalizer logits
        self.s.drop(f"{name}_text")
        if self.scale_var not in self.s.shapes:  # from the first chunk shared (the trainer's: train)
            stats = {"text_mask": f"{name}_mask", **shift, **(cache if self.form == "virtual" else {**p0, **deep})}
            self.s.run(self._program("deep_scale"), stats, {"deep_scale": self.scale_var}, persist=True)
        return {"text_mask": f"{name}_mask", **shift, **cache, **deep, "_name": name,
                **({"_zs": f"{name}_zs"} if zero_shot else {})}

    def _shift(self, name: str, seqs, Lp: int) -> dict:
        """Linear attention sees absolute positions: share RoPE tables of minus each text's pad
        count (the data owner knows its lengths; secret to the parties), so that cached texts
        start at position 0 as in a forward without a cache. Nothing for softmax models."""
        cfg = self.bundle.config
        if not llama.position_sensitive(cfg, self.bundle.execution):
            return {}
        c, s = llama.rope_tables(np.array([[len(q) - Lp] for q in seqs]), cfg.head_dim, cfg.rope_theta)
        self.s.put(f"{name}_shift_c", np.asarray(c, np.float32))
        self.s.put(f"{name}_shift_s", np.asarray(s, np.float32))
        return {"shift_c": f"{name}_shift_c", "shift_s": f"{name}_shift_s"}

    # ---------------------------------------------------------------- scoring
    def score(self, name: str, delta: np.ndarray | None, chunks=None) -> np.ndarray:
        """Class scores [P, E, R] for prompts P0 + delta (``None``: no soft prompt) on the set's
        ``chunks`` (default: all), one secure call per chunk, in chunk order
        (``ExampleSet.chunk_labels`` gives their labels): the opened verbalizer logits, each
        class's words combined and, per ``calibrate``, calibrated (plaintext, here). Another
        reading of the opened word logits (a fitted head) is an ``Objective`` over :meth:`score_words`."""
        return self.class_scores(*self.score_words(name, delta, chunks))

    def score_words(self, name: str, delta: np.ndarray | None, chunks=None, progress=None) -> tuple:
        """The opened logits of every head word, [P, E, W] (verbalizer words, then probe words),
        and those of the content-free rows ([P, C, W] under ``calibrate="cf"``, else None).
        ``progress(n)``: called after each chunk with its number of examples."""
        which = range(len(self.sets[name].chunks)) if chunks is None else chunks
        if delta is not None:
            self.s.put("delta", np.asarray(delta, np.float32))
        try:
            parts = []
            for c in which:
                parts.append(self._score_chunk(self.sets[name].chunks[c], delta is not None))
                if progress is not None:
                    progress(self.sets[name].chunks[c]["_size"])
        finally:
            if delta is not None:
                self.s.drop("delta")
        sizes = [self.sets[name].chunks[c]["_size"] for c in which]
        words = np.concatenate([p[:, :n] for p, n in zip(parts, sizes)], 1)
        cf = np.concatenate([p[:, n:] for p, n in zip(parts, sizes)], 1) if self.calibrate == "cf" else None
        return words, cf

    def class_scores(self, words: np.ndarray, cf_words: np.ndarray | None = None) -> np.ndarray:
        """[P, E, W] word logits -> [P, E, R] class scores: each class's verbalizer words combined
        (probe words take no part), then calibrated."""
        logits = combine_words(words, self.word_groups, self.combine)
        cf = None if cf_words is None else combine_words(cf_words, self.word_groups, self.combine)
        return calibrated(logits, self.calibrate, cf)

    def _score_chunk(self, chunk: dict, prompted: bool) -> np.ndarray:
        resident = _arguments(chunk)
        if self.deep and not prompted:  # zero-shot logits were computed by the prefill
            if "_zs" not in chunk:
                raise UserError(f"example set chunk {chunk['_name']!r} was shared without zero_shot=True")
            return self.s.reveal(chunk["_zs"], "verbalizer_logits")  # to the data owner, per policy
        inputs = {"head": "head", **resident}
        if self.deep:
            inputs.update(delta="delta", deep_scale=self.scale_var)
            prog = "score_deep"
        elif self.mode == "cached":
            inputs.update(tail="tail", **({"p0": "p0", "delta": "delta"} if prompted else {}))
            prog = "score_cached"
        else:
            name = chunk["_name"]
            inputs.update(select=f"{name}_select" if prompted else f"{name}_select0",
                          **({"p0": "p0", "delta": "delta"} if prompted else {}))
            prog = "score_full"
        self.s.run(self._program(prog), inputs, ["logits"])  # its approval opens logits, as verbalizer logits
        try:
            return self.s.reveal("logits", "verbalizer_logits")  # to the data owner, per policy
        finally:
            self.s.drop("logits")
