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
