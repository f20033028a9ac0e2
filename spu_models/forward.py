"""The function that runs inside MPC: a batch of prompts in, verbalizer logits out.

``make_forward(config, execution, embedding)`` returns ``forward(params, batch) -> logits [B, R]``, a pure
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
import numpy as np

from . import bert, llama
from .config import ConfigError, Execution

EMBEDDING_MODES = ("data_owner", "secret")


def build_model(config, execution: Execution = Execution()):
    """The Flax module for ``config`` (the architecture) run as ``execution`` says."""
    if config.family == "llama":
        return llama.LlamaForCausalLM(config, execution)
    if config.family == "bert":
        return bert.BertForMaskedLM(config, execution)
    raise ConfigError(f"unknown model family {config.family!r}")


def embedding_table(config, params):
    """The token-embedding table [V, H] (what the data owner is given under ``embedding: data_owner``)."""
    if config.family == "llama":
        return params["model"]["embed_tokens"]["embedding"]
    return params[config.model_type]["embeddings"]["word_embeddings"]["embedding"]


def batch_keys(config, embedding: str) -> tuple:
    first = "embeds" if embedding == "data_owner" else "tokens"
    return (first, "select", "rows") + (("mask",) if config.family == "bert" else ())


def onehot_valid(rows):
    """Inside MPC: a secret bit, whether every row of ``rows`` [R, V] is one-hot (entries exactly 0
    or 1, summing to 1), so that it picks one word of the LM head and no mixture or projection of
    it. Exact: comparisons with public constants and a sum, no truncated product."""
    binary = jnp.all((rows == 0) | (rows == 1))
    return binary & jnp.all(jnp.sum(rows, axis=-1) == 1)


def make_forward(config, execution: Execution = Execution(), embedding: str = "data_owner"):
    if embedding not in EMBEDDING_MODES:
        raise ConfigError(f"unknown embedding policy {embedding!r}; choose from {EMBEDDING_MODES}")
    model = build_model(config, execution)

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
        logits = model.apply(variables, picked, batch["rows"], method=model.head_select)
        # rows that are not one-hot give exact zeros (a select, not a product: no truncation noise),
        # so nothing opens from them and no extra reveal or round trip is needed to refuse them
        return jnp.where(onehot_valid(batch["rows"]), logits, 0.0)

    return forward


# ------------------------------------------------------------------------------------------------
# Programs of the tuning loop (decoders). Each is ``program(params, **secret_inputs) -> dict`` and
# runs inside MPC; its outputs stay on the parties until the data owner opens one.
#
# Shapes: P candidates, E examples, n prompt tokens, t template-tail tokens, R verbalizer words.
# ``delta`` [P, n, H] is the data owner's A.z; the prompt is P0 + delta with P0 resident.

PROMPT_FORMS = ("kv", "hidden", "virtual")


def make_tuning_programs(config, execution: Execution = Execution(), depth: int | None = None, form: str = "kv"):
    """The tuning loop's programs. ``depth`` K (default: all layers) places the soft prompt in the
    top K layers only (a *deep* prompt; see ``prefill_deep``), ``form`` says how it enters them."""
    if config.family != "llama":
        raise ConfigError("prompt tuning is implemented for decoder (llama-family) models")
    model = build_model(config, execution)
    L = config.num_hidden_layers
    K = L if depth is None else int(depth)
    if not 1 <= K <= L:
        raise ConfigError(f"prompt depth {K} is outside 1..{L} (the model's layers)")
    if form not in PROMPT_FORMS:
        raise ConfigError(f"unknown prompt form {form!r} (known: {', '.join(PROMPT_FORMS)})")
    top = range(L - K, L)  # the layers a deep prompt enters
    if K < L:
        bad = [i for i in top if execution.layer_attention(i) != "softmax"]
        if bad:
            raise ConfigError(f"a prompt of depth {K} enters layers {bad[0]}..{L - 1}, and layer {bad[0]} runs "
                             "linear attention; deep prompts need softmax there (smaller depth, or another policy)")
    apply = lambda params, *a, method: model.apply({"params": params}, *a, method=method)  # noqa: E731

    def embed(params, onehot):
        """Token embeddings from one-hot tokens, inside MPC (policy ``embedding: secret``)."""
        return {"embeds": onehot @ embedding_table(config, params)}

    def head(params, rows):
        """The verbalizer rows of the (tied or untied) LM head, [R, H]; computed once per run.
        All zeros unless ``rows`` is one-hot (``onehot_valid``): every logit scored against it opens as 0."""
        w = embedding_table(config, params) if config.tie_word_embeddings else params["lm_head"]["kernel"].T
        # a validity bit selects, rather than opening it and refusing: an invalid ``rows`` costs no
        # extra reveal or round trip, and the data owner learns only what it knew (its rows are invalid)
        return {"head": jnp.where(onehot_valid(rows), rows @ w, 0.0)}

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

    # ---- deep prompts: the candidate-dependent part enters only the top K layers ----------------
    # Sequence: text (cached), prompt (n tokens, P0 = the initial prompt's tokens), tail (t tokens).
    # Below layer L-K every token is the same for every candidate, so the parties compute it once
    # per example (``prefill_deep``) and keep, as shares: the text's K/V of the top K layers, and
    # the hidden states entering layer L-K. Form ``kv`` (P-tuning v2 / BBTv2): the prompt's K/V in
    # each top layer (from P0) are perturbed per candidate; only the t tail tokens run per
    # candidate. Form ``hidden``: the prompt's hidden states entering layer L-K are perturbed, and
    # n + t tokens run per candidate. With delta = 0 either form is the hard prompt P0 exactly.
    # Form ``virtual`` (prefix tuning in the top K layers only): no prompt token exists below layer
    # L-K, where the tail follows the text as in the zero-shot forward; in each top layer the tail
    # also attends to n key/value pairs that are the candidate's offsets alone (zero at delta = 0,
    # keys placed just before the tail). A candidate's work scales with K, not with L.
    def _tokens(p0, tail, E):
        x = jnp.concatenate([p0, tail], axis=0)
        return jnp.broadcast_to(x[None, None], (1, E) + x.shape)

    def prefill_deep(params, text, text_mask, tail, p0=None, head=None, shift_c=None, shift_s=None):
        """Once per example set: the top K layers' text cache, the prompt's deep state (form
        ``kv``: its K/V in the top layers, ``prompt_k{i}``; always: the hidden states of prompt +
        tail entering layer L-K, ``deep_h`` [E, n + t, H]; ``virtual``: the tail's alone, [E, t, H]) and,
        given the verbalizer ``head``, the zero-shot logits (text -> tail, no prompt) ``zs_logits``
        [1, E, R]."""
        shift = None if shift_c is None else (shift_c, shift_s)
        cache = apply(params, text, text_mask, shift, method=model.prefill)
        E = text.shape[0]
        out = {f"cache_{kv}{i}": cache[i][j] for i in top for j, kv in enumerate("kv")}
        if form == "virtual":  # below L-K the zero-shot forward; its states entering L-K are kept
            h, _ = apply(params, jnp.broadcast_to(tail[None, None], (1, E) + tail.shape), cache, text_mask,
                         range(L - K), shift, method=model.continue_layers)
            out["deep_h"] = h[0]
            if head is not None:
                zs = apply(params, h, cache, text_mask, top, shift, None, True, method=model.continue_layers)[0]
                out["zs_logits"] = apply(params, zs[:, :, -1], method=model.final_norm) @ head.T
            return out
        n = p0.shape[0]
        if head is not None:
            zs = apply(params, jnp.broadcast_to(tail[None, None], (1, E) + tail.shape), cache, text_mask, None, shift,
                       None, True, method=model.continue_layers)[0]
            out["zs_logits"] = apply(params, zs[:, :, -1], method=model.final_norm) @ head.T
        h, _ = apply(params, _tokens(p0, tail, E), cache, text_mask, range(L - K), shift,
                     method=model.continue_layers)
        out["deep_h"] = h[0]
        if form == "kv":
            _, kv = apply(params, h, cache, text_mask, top, shift, method=model.continue_layers)
            for i, (k, v) in zip(top, kv):
                out[f"prompt_k{i}"], out[f"prompt_v{i}"] = k[0, :, :n], v[0, :, :n]
        return out

    def _std(x, axes):
        mu = jnp.mean(x, axis=axes, keepdims=True)
        return jnp.sqrt(jnp.mean(jnp.square(x - mu), axis=axes) + 1e-6)

    def deep_scale(params, p0=None, deep_h=None, text_mask=None, shift_c=None, shift_s=None, **prompt):
        """Per-channel scale of what a deep prompt perturbs (its spread over the examples and the
        prompt's tokens; ``virtual``: over the examples' text keys and values in each top layer),
        computed once inside MPC: the data owner's offsets are in these units, so it never needs
        a statistic of the model. ``kv``, ``virtual``: [K, 2, KV, D]; ``hidden``: [H].

        Key offsets are taken before RoPE, and so is the keys' spread: the cached keys are rotated
        back from their positions first (public tables: local under MPC). Their spread *after*
        RoPE depended on where the left padding put each text: up to 19% apart per channel, and
        0.06 in a candidate's logit difference, between pad multiples of 32 and 16."""
        shift = None if shift_c is None else (shift_c, shift_s)

        def unrotated(k, start):  # k [E, T, KV, D] rotated at positions start..start+T-1
            pos = np.arange(start, start + k.shape[1])[None]  # numpy: host-computed tables
            cos, sin = llama.shift_tables(*llama.rope_tables(pos, config.head_dim, config.rope_theta), shift)
            return llama.apply_rope(k, cos, -sin)

        if form == "virtual":
            m, n = text_mask[:, :, None, None], jnp.sum(text_mask)  # the real text positions, equally

            def spread(x):  # sums first, then one division by n: weights m / n, each rounded to the
                #             fixed point's 2^-f, were off by up to 1% for channels of small spread
                mu = jnp.sum(x * m, axis=(0, 1), keepdims=True) / n
                return jnp.sqrt(jnp.sum(jnp.square(x - mu) * m, axis=(0, 1)) / n + 1e-6)

            return {"deep_scale": jnp.stack([jnp.stack([spread(unrotated(prompt[f"cache_k{i}"], 0)),
                                                        spread(prompt[f"cache_v{i}"])]) for i in top])}
        if form == "kv":
            Lp = text_mask.shape[1]
            return {"deep_scale": jnp.stack([jnp.stack([_std(unrotated(prompt[f"prompt_k{i}"], Lp), (0, 1)),
                                                        _std(prompt[f"prompt_v{i}"], (0, 1))]) for i in top])}
        return {"deep_scale": _std(deep_h[:, : p0.shape[0]], (0, 1))}

    def score_deep(params, head, text_mask, deep_h, delta, deep_scale, shift_c=None, shift_s=None, **resident):
        """Logits [P, E, R] of text -> deep prompt (P0's state + delta * scale) -> tail, running the
        top K layers only. ``delta``: [P, K, 2, n, KV, D] (form ``kv``) or [P, n, H] (``hidden``)."""
        shift = None if shift_c is None else (shift_c, shift_s)
        E, P = text_mask.shape[0], delta.shape[0]
        cache = {i: (resident[f"cache_k{i}"], resident[f"cache_v{i}"]) for i in top}
        if form in ("kv", "virtual"):
            d = delta * deep_scale[None, :, :, None]
            n, Lp = d.shape[3], text_mask.shape[1]
            # key offsets are taken before RoPE, i.e. rotated to the prompt's positions, so that a z
            # means the same for every example whatever its padding (softmax sees offsets only)
            at = Lp if form == "kv" else Lp - n  # virtual keys stand just before the tail
            cos, sin = llama.shift_tables(*llama.rope_tables(jnp.arange(at, at + n)[None], config.head_dim,
                                                             config.rope_theta), shift)  # [1 or E, n, D]
            if form == "kv":
                prefix = {i: (resident[f"prompt_k{i}"][None] + llama.apply_rope(d[:, j, 0][:, None], cos, sin),
                              resident[f"prompt_v{i}"][None] + d[:, j, 1][:, None]) for j, i in enumerate(top)}
                x = jnp.broadcast_to(deep_h[None, :, n:], (P, E) + deep_h[:, n:].shape[1:])
            else:
                full = (P, E) + d.shape[3:]
                prefix = {i: (jnp.broadcast_to(llama.apply_rope(d[:, j, 0][:, None], cos, sin), full),
                              jnp.broadcast_to(d[:, j, 1][:, None], full)) for j, i in enumerate(top)}
                x = jnp.broadcast_to(deep_h[None], (P,) + deep_h.shape)
        else:
            d = delta * deep_scale
            n = d.shape[1]
            x = jnp.concatenate([deep_h[None, :, :n] + d[:, None],
                                 jnp.broadcast_to(deep_h[None, :, n:], (P, E) + deep_h[:, n:].shape[1:])], axis=2)
            prefix = None
        h, _ = apply(params, x, cache, text_mask, top, shift, prefix, True, form != "virtual",
                     method=model.continue_layers)
        return {"logits": apply(params, h[:, :, -1], method=model.final_norm) @ head.T}

    return {"embed": embed, "head": head, "prefill": prefill, "score_cached": score_cached,
            "score_full": score_full, "prefill_deep": prefill_deep, "deep_scale": deep_scale,
            "score_deep": score_deep, "depth": K, "form": form, "top": top}
