"""Greedy decoding in plaintext: the user's sanity check that a checkpoint loaded correctly."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spu_models import llama

from ..errors import UserError


def greedy(bundle, prompt: str, max_new_tokens: int = 8, stop_at_eos: bool = True) -> str:
    """Greedy continuation of ``prompt`` (decoder models only). Returns the new text."""
    if bundle.family != "llama":
        raise UserError(f"generate needs a decoder model; {bundle.name!r} is a {bundle.family} encoder")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    tok = bundle.tokenizer
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UserError("the prompt is empty after tokenization")
    total = len(ids) + max_new_tokens
    if total > bundle.config.max_position_embeddings:
        raise UserError(f"prompt + new tokens = {total} exceeds the model's context "
                         f"({bundle.config.max_position_embeddings})")
    model = llama.LlamaForCausalLM(bundle.config, bundle.execution)
    eos = getattr(tok, "eos_token_id", None)

    @jax.jit
    def next_token(params, buf, pos):
        # One fixed-shape program: causal attention means the right-hand filler never matters.
        h = model.apply({"params": params}, input_ids=buf[None], method=model.hidden)[0]
        logits = h[pos] @ params["model"]["embed_tokens"]["embedding"].T if bundle.config.tie_word_embeddings \
            else h[pos] @ params["lm_head"]["kernel"]
        return jnp.argmax(logits)

    buf = np.zeros(total, np.int32)
    buf[: len(ids)] = ids
    out = []
    for pos in range(len(ids) - 1, total - 1):
        t = int(next_token(bundle.params, jnp.asarray(buf), pos))
        if stop_at_eos and t == eos:
            break
        buf[pos + 1] = t
        out.append(t)
    return tok.decode(out, skip_special_tokens=True)
