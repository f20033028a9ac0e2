"""Data-owner side: turn prompts and verbalizer words into the arrays that get secret-shared.

See ``spu_models.forward`` for what each array means. Everything here runs in plaintext at the
data owner; the padded length is the only property of the texts that the compute parties learn.
"""
from __future__ import annotations

import numpy as np

from spu_models.forward import batch_keys, embedding_table

from ..errors import UserError


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def verbalizer_ids(tokenizer, words: list[str]) -> list[int]:
    """One token id per verbalizer word: its first token (a lone leading-space token is skipped).

    Raises ValueError when a word is empty or two words share that token.
    """
    out = []
    for w in words:
        ids = _ids(tokenizer, w)
        if ids and len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
            ids = ids[1:]
        if not ids:
            raise UserError(f"verbalizer word {w!r} tokenizes to nothing")
        out.append(ids[0])
    if len(set(out)) != len(out):
        clash = [w for w, i in zip(words, out) if out.count(i) > 1]
        raise UserError(f"verbalizer words {clash} start with the same token; choose distinct words")
    return out


def pad_length(n: int, multiple: int = 8) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def tokenize_prompts(bundle, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt, with the family's special tokens (encoders: [CLS] ... [MASK] [SEP])."""
    tok, cfg = bundle.tokenizer, bundle.config
    if cfg.family == "llama":
        seqs = [_ids(tok, p) for p in prompts]
    else:
        cls_id = getattr(tok, "cls_token_id", None)
        mask_id, sep_id = getattr(tok, "mask_token_id", None), getattr(tok, "sep_token_id", None)
        if mask_id is None:  # byte tokenizer of tiny-bert: reuse its special ids
            cls_id, mask_id, sep_id = tok.bos_token_id, tok.unk_token_id, tok.eos_token_id
        seqs = [[cls_id] + _ids(tok, p) + [mask_id, sep_id] for p in prompts]
    for i, s in enumerate(seqs):
        if not s:
            raise UserError(f"prompt {i} is empty after tokenization")
    return seqs


def make_batch(bundle, prompts: list[str], words: list[str], embedding: str = "data_owner",
               seq_len: int | None = None, table=None) -> dict:
    """Arrays for ``spu_models.forward``: right-padded to ``seq_len`` (default: next multiple of 8).

    ``embedding: data_owner`` looks the tokens up in ``table`` (default: the bundle's weights)."""
    cfg = bundle.config
    seqs = tokenize_prompts(bundle, prompts)
    longest = max(len(s) for s in seqs)
    L = seq_len or pad_length(longest)
    if longest > L:
        raise UserError(f"a prompt has {longest} tokens, more than the padded length {L}")
    if L > cfg.max_position_embeddings:
        raise UserError(f"padded length {L} exceeds the model's context ({cfg.max_position_embeddings})")
    B, V = len(seqs), cfg.vocab_size
    pad = bundle.tokenizer.pad_token_id or 0
    ids = np.full((B, L), pad, np.int32)
    mask = np.zeros((B, L), np.float32)
    select = np.zeros((B, L), np.float32)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1.0
        select[b, len(s) - 1 if cfg.family == "llama" else len(s) - 2] = 1.0  # last token / [MASK]
    rows = np.zeros((len(words), V), np.float32)
    rows[np.arange(len(words)), verbalizer_ids(bundle.tokenizer, words)] = 1.0
    batch = {"select": select, "rows": rows, "mask": mask}
    if embedding == "data_owner":
        batch["embeds"] = np.asarray(embedding_table(cfg, bundle.params) if table is None else table)[ids]
    else:
        batch["tokens"] = np.eye(V, dtype=np.float32)[ids]
    return {k: batch[k] for k in batch_keys(cfg, embedding)}


def session_batch(session, prompts: list, words: list, seq_len: int | None = None) -> dict:
    """The arrays for ``session.forward``, with the embedding table from the session when its
    policy gives it to the data owner."""
    from ..model_owner.models import ModelBundle

    table = session.embedding_table() if session.policy.embedding == "data_owner" else None
    return make_batch(ModelBundle("session", session.config, None, session.tokenizer), prompts, words,
                      session.policy.embedding, seq_len, table=table)
