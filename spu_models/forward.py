"""The function that runs inside MPC: a batch of prompts in, verbalizer logits out.

``make_forward(config, embedding)`` returns ``forward(params, batch) -> logits [B, R]``, a pure
JAX function that the plaintext back end jits and the SPU back ends compile to pphlo. Every array
in ``batch`` is secret-shared by the data owner; every array in ``params`` by the model owner:

- ``embeds`` [B, L, H] (policy ``embedding: data_owner``) or ``tokens`` [B, L, V] one-hot
  (``embedding: secret``: the lookup is a matmul inside MPC);
- ``select`` [B, L] one-hot: the position whose hidden state is scored (last prompt token for a
  decoder, the mask token for an encoder);
- ``rows`` [R, V] one-hot: the verbalizer words, so which words are scored stays secret too;
- ``mask`` [B, L] (encoders only; decoders are right-padded, so the causal mask suffices).

Only shapes are public: batch size, the padded length L, the number of labels R. Positions are
``arange(L)``, a public constant, so RoPE's sin/cos never run on shares.
"""
from __future__ import annotations

import jax.numpy as jnp

from . import bert, llama

EMBEDDING_MODES = ("data_owner", "secret")


def build_model(config):
    if config.family == "llama":
        return llama.LlamaForCausalLM(config)
    if config.family == "bert":
        return bert.BertForMaskedLM(config)
    raise ValueError(f"unknown model family {config.family!r}")


def embedding_table(config, params):
    """The token-embedding table [V, H] (what the data owner is given under ``embedding: data_owner``)."""
    if config.family == "llama":
        return params["model"]["embed_tokens"]["embedding"]
    return params[config.model_type]["embeddings"]["word_embeddings"]["embedding"]


def batch_keys(config, embedding: str) -> tuple:
    first = "embeds" if embedding == "data_owner" else "tokens"
    return (first, "select", "rows") + (("mask",) if config.family == "bert" else ())


def make_forward(config, embedding: str = "data_owner"):
    if embedding not in EMBEDDING_MODES:
        raise ValueError(f"unknown embedding policy {embedding!r}; choose from {EMBEDDING_MODES}")
    model = build_model(config)

    def forward(params, batch):
        if embedding == "secret":
            embeds = batch["tokens"] @ embedding_table(config, params)
        else:
            embeds = batch["embeds"]
        B, L, _ = embeds.shape
        positions = jnp.broadcast_to(jnp.arange(L), (B, L))
        variables = {"params": params}
        if config.family == "llama":
            h = model.apply(variables, inputs_embeds=embeds, position_ids=positions, method=model.hidden)
        else:
            if config.model_type == "roberta":  # HF RoBERTa numbers real tokens from pad_token_id + 1
                positions = positions + config.pad_token_id + 1
            h = model.apply(variables, inputs_embeds=embeds, attention_mask=batch["mask"],
                            position_ids=positions, method=model.hidden)
        picked = jnp.einsum("bl,blh->bh", batch["select"], h)
        return model.apply(variables, picked, batch["rows"], method=model.head_select)

    return forward


# ------------------------------------------------------------------------------------------------
# Programs of the tuning loop (decoders). Each is ``program(params, **secret_inputs) -> dict`` and
# runs inside MPC; its outputs stay on the parties until the data owner opens one.
#
# Shapes: P candidates, E examples, n prompt tokens, t template-tail tokens, R verbalizer words.
# ``delta`` [P, n, H] is the data owner's A.z; the prompt is P0 + delta with P0 resident.

def make_tuning_programs(config):
    if config.family != "llama":
        raise ValueError("prompt tuning is implemented for decoder (llama-family) models")
    model = build_model(config)
    L = config.num_hidden_layers

    def embed(params, onehot):
        """Token embeddings from one-hot tokens, inside MPC (policy ``embedding: secret``)."""
        return {"embeds": onehot @ embedding_table(config, params)}

    def head(params, rows):
        """The verbalizer rows of the (tied or untied) LM head, [R, H]; computed once per run."""
        if config.tie_word_embeddings:
            return {"head": rows @ embedding_table(config, params)}
        return {"head": rows @ params["lm_head"]["kernel"].T}

    def prefill(params, text, text_mask, shift_c=None, shift_s=None):
        """Per-layer K/V of the left-padded example texts [E, Lp, H]: the prefix-state cache.
        ``shift_c/s`` [E, 1, D]: RoPE tables of minus each text's pad count (linear attention only;
        see ``llama.LlamaForCausalLM.prefill``)."""
        shift = None if shift_c is None else (shift_c, shift_s)
        cache = model.apply({"params": params}, text, text_mask, shift, method=model.prefill)
        out = {}
        for i, (k, v) in enumerate(cache):
            out[f"cache_k{i}"], out[f"cache_v{i}"] = k, v
        return out

    def _prompt(p0, delta, E):
        x = p0[None] + delta  # [P, n, H]
        return jnp.broadcast_to(x[:, None], (x.shape[0], E) + x.shape[1:])

    def score_cached(params, tail, head, text_mask, p0=None, delta=None, shift_c=None, shift_s=None, **cache):
        """Logits [P, E, R] of text -> prompt -> tail, continuing the resident cache (with the
        prefill's ``shift_c/s``, if it had them). Without ``p0``/``delta``: no soft prompt
        (zero-shot), P = 1."""
        E = text_mask.shape[0]
        P = 1 if delta is None else delta.shape[0]
        tail_x = jnp.broadcast_to(tail[None, None], (P, E) + tail.shape)
        x = tail_x if delta is None else jnp.concatenate([_prompt(p0, delta, E), tail_x], axis=2)
        kv = [(cache[f"cache_k{i}"], cache[f"cache_v{i}"]) for i in range(L)]
        shift = None if shift_c is None else (shift_c, shift_s)
        h = model.apply({"params": params}, x, kv, text_mask, shift, method=model.extend)
        return {"logits": h[:, :, -1] @ head.T}

    def score_full(params, text, select, head, p0=None, delta=None):
        """Logits [P, E, R] of prompt -> template with text (BBT placement), recomputed per candidate.

        ``text`` [E, Lt, H] right-padded; ``select`` [E, n + Lt] one-hot of each last real token.
        Without ``p0``/``delta``: no soft prompt (zero-shot), P = 1."""
        E, Lt, H = text.shape
        P, n = (1, 0) if delta is None else delta.shape[:2]
        t = jnp.broadcast_to(text[None], (P, E, Lt, H))
        x = t if delta is None else jnp.concatenate([_prompt(p0, delta, E), t], axis=2)
        x = x.reshape(P * E, n + Lt, H)
        pos = jnp.broadcast_to(jnp.arange(n + Lt), (P * E, n + Lt))
        h = model.apply({"params": params}, inputs_embeds=x, position_ids=pos, method=model.hidden)
        h = h.reshape(P, E, n + Lt, H)
        picked = jnp.einsum("el,pelh->peh", select, h)
        return {"logits": picked @ head.T}

    return {"embed": embed, "head": head, "prefill": prefill, "score_cached": score_cached,
            "score_full": score_full}
