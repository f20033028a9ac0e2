"""``bench step`` / ``bench e2e``: the data owner's inputs for the SFT and PT baselines (one-hot
tokens, labels), and a model cut to its first vocabulary rows (cheap shapes for small runs)."""
from __future__ import annotations

import dataclasses

import numpy as np

from tuning.data_owner.encode import pad_length, verbalizer_ids


class RemappedTokenizer:
    """Token ids taken modulo ``n`` (the vocabulary cut to its first ``n`` rows). Shapes, and
    therefore costs, are those of real text; the remapped ids change which rows are looked up."""

    def __init__(self, tok, n: int):
        self.tok, self.n = tok, n

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [i % self.n for i in self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]]}

    def __getattr__(self, name):
        return getattr(self.tok, name)


def vocab_truncated(bundle, n: int):
    """The model with only the first ``n`` rows of its (tied) embedding / LM head."""
    if not n or n >= bundle.config.vocab_size:
        return bundle
    m = bundle.params["model"]
    params = {**bundle.params, "model": {**m, "embed_tokens": {"embedding": np.asarray(m["embed_tokens"]["embedding"])[:n]}}}
    if "lm_head" in bundle.params:
        params["lm_head"] = {"kernel": np.asarray(bundle.params["lm_head"]["kernel"])[:, :n]}
    return dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, vocab_size=n), params=params,
                               tokenizer=RemappedTokenizer(bundle.tokenizer, n))


def sft_inputs(bundle, task, examples, n_tokens: int) -> dict:
    """One-hot tokens [E, Lt, V] and select [E, Lt] of the prompts, laid out exactly like the
    ``prefix`` scorer's text (right-padded to the same Lt), rows [R, V] and labels [E, R]."""
    tok, V = bundle.tokenizer, bundle.config.vocab_size
    seqs = [list(tok(task.prompt(t), add_special_tokens=False)["input_ids"]) for t, _ in examples]
    Lt = pad_length(max(len(s) for s in seqs) + n_tokens) - n_tokens
    ids = np.zeros((len(seqs), Lt), np.int64)
    select = np.zeros((len(seqs), Lt), np.float32)
    for e, s in enumerate(seqs):
        ids[e, : len(s)] = s
        select[e, len(s) - 1] = 1.0
    words = [task.verbalizer[l] for l in task.labels]
    rows = np.zeros((len(words), V), np.float32)
    rows[np.arange(len(words)), verbalizer_ids(tok, words)] = 1.0
    return {"tokens": np.eye(V, dtype=np.float32)[ids], "select": select, "rows": rows,
            "labels": one_hot_labels(task, examples)}


def one_hot_labels(task, examples) -> np.ndarray:
    idx = {l: i for i, l in enumerate(task.labels)}
    y = np.zeros((len(examples), len(task.labels)), np.float32)
    y[np.arange(len(examples)), [idx[l] for _, l in examples]] = 1.0
    return y
