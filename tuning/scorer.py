"""The data owner's handle on the secure scorer.

It secret-shares each example set once (and, in ``cached`` mode, has the parties prefill its
prefix-state cache once), then scores whole populations of soft prompts against it with one
secure program per call. Only the verbalizer logits are opened, and only here, at the data owner.

Placements:
- ``cached`` (default): text, then soft prompt, then template tail. Causal attention makes the
  text's keys/values independent of the prompt, so they are computed once per example and stay
  secret-shared; each candidate runs only over prompt + tail tokens.
- ``prefix`` (BBT): soft prompt, then the whole template with text; recomputed per candidate.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from spu_models import llama
from spu_models.forward import make_tuning_programs

from .encode import pad_length, verbalizer_ids

MODES = ("cached", "prefix")


def split_template(template: str) -> tuple[str, str]:
    """'Review: {text}\\nSentiment:' -> ('Review: {text}', '\\nSentiment:')."""
    i = template.index("{text}") + len("{text}")
    return template[:i], template[i:]


@dataclasses.dataclass
class ExampleSet:
    name: str
    labels: np.ndarray  # [E] int (kept at the data owner, never shared)
    n: int
    resident: dict = dataclasses.field(default_factory=dict)  # program argument -> resident var, per score


class SecureScorer:
    def __init__(self, session, bundle, task, mode: str = "cached", n_tokens: int = 5, p0_ids=None):
        if mode not in MODES:
            raise ValueError(f"unknown prompt placement {mode!r} (known: {', '.join(MODES)})")
        self.s, self.bundle, self.task, self.mode = session, bundle, task, mode
        self.n_tokens = n_tokens
        self.programs = make_tuning_programs(bundle.config)
        self.tok = bundle.tokenizer
        self.label_index = {l: i for i, l in enumerate(task.labels)}
        self.sets: dict = {}
        self.head_template, self.tail_template = split_template(task.template)
        # verbalizer rows of the LM head: shared as one-hot rows, reduced to [R, H] once, resident
        words = [task.verbalizer[l] for l in task.labels]
        rows = np.zeros((len(words), bundle.config.vocab_size), np.float32)
        rows[np.arange(len(words)), verbalizer_ids(self.tok, words)] = 1.0
        self.s.put("rows", rows)
        self.s.run(self.programs["head"], {"rows": "rows"}, ["head"])
        self.s.drop("rows")
        if mode == "cached":
            tail = self._ids(self.tail_template)
            if not tail:
                raise ValueError(f"template {task.template!r} has nothing after {{text}}; the cached placement "
                                 "needs a tail (e.g. '\\nSentiment:')")
            self._share_tokens("tail", np.asarray(tail))
        if p0_ids is not None:  # P0: embeddings of the initial prompt tokens, resident
            self._share_tokens("p0", np.asarray(p0_ids))

    # ---------------------------------------------------------------- sharing
    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _share_tokens(self, name: str, ids: np.ndarray) -> None:
        """Share token embeddings [..., L, H] under ``name``, per the policy's embedding mode."""
        if self.s.policy.embedding == "data_owner":  # the data owner holds the table (policy says so)
            self.s.put(name, self.s.embedding_table()[ids])
        else:  # one-hot tokens; the lookup is a matmul inside MPC
            onehot = np.eye(self.bundle.config.vocab_size, dtype=np.float32)[ids]
            self.s.put(name + "_onehot", onehot)
            self.s.run(self.programs["embed"], {"onehot": name + "_onehot"}, {"embeds": name}, key="embed")
            self.s.drop(name + "_onehot")

    def add_examples(self, name: str, examples: list) -> ExampleSet:
        """Share an example set once; in cached mode also prefill its cache on the parties."""
        labels = np.array([self.label_index[l] for _, l in examples])
        texts = [t for t, _ in examples]
        if self.mode == "cached":
            seqs = [self._ids(self.head_template.replace("{text}", t)) for t in texts]
            Lp = pad_length(max(len(s) for s in seqs))
            ids = np.zeros((len(seqs), Lp), np.int64)
            mask = np.zeros((len(seqs), Lp), np.float32)
            for e, s in enumerate(seqs):  # left padding: every text ends at Lp - 1
                ids[e, Lp - len(s):], mask[e, Lp - len(s):] = s, 1.0
            self._share_tokens(f"{name}_text", ids)
            self.s.put(f"{name}_mask", mask)
            cache = {f"cache_{kv}{i}": f"{name}_cache_{kv}{i}"
                     for i in range(self.bundle.config.num_hidden_layers) for kv in "kv"}
            shift = self._shift(name, seqs, Lp)
            self.s.run(self.programs["prefill"], {"text": f"{name}_text", "text_mask": f"{name}_mask", **shift}, cache)
            self.s.drop(f"{name}_text")
            resident = {"text_mask": f"{name}_mask", **shift, **cache}  # what every score reads
        else:
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
            resident = {"text": f"{name}_text"}
        self.sets[name] = ExampleSet(name, labels, len(examples), resident)
        return self.sets[name]

    def _shift(self, name: str, seqs, Lp: int) -> dict:
        """Linear attention sees absolute positions: share RoPE tables of minus each text's pad
        count (the data owner knows its lengths; secret to the parties), so that cached texts
        start at position 0 as in a forward without a cache. Nothing for softmax models."""
        cfg = self.bundle.config
        if not llama.position_sensitive(cfg):
            return {}
        c, s = llama.rope_tables(np.array([[len(q) - Lp] for q in seqs]), cfg.head_dim, cfg.rope_theta)
        self.s.put(f"{name}_shift_c", np.asarray(c, np.float32))
        self.s.put(f"{name}_shift_s", np.asarray(s, np.float32))
        return {"shift_c": f"{name}_shift_c", "shift_s": f"{name}_shift_s"}

    # ---------------------------------------------------------------- scoring
    def score(self, name: str, delta: np.ndarray | None) -> np.ndarray:
        """Opened verbalizer logits [P, E, R] for prompts P0 + delta (``None``: no soft prompt)."""
        inputs = {"head": "head", **self.sets[name].resident}
        if delta is not None:
            self.s.put("delta", np.asarray(delta, np.float32))
            inputs.update(p0="p0", delta="delta")
        if self.mode == "cached":
            inputs.update(tail="tail")
            prog = self.programs["score_cached"]
        else:
            inputs.update(select=f"{name}_select" if delta is not None else f"{name}_select0")
            prog = self.programs["score_full"]
        self.s.run(prog, inputs, ["logits"], key=f"score_{self.mode}_{'p' if delta is not None else '0'}")
        try:
            return self.s.open("logits")  # opened to the data owner only
        finally:
            self.s.drop("logits", *(["delta"] if delta is not None else []))
