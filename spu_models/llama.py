"""LLaMA-family decoder (SmolLM2, LLaMA, ...) in one file: RMSNorm, RoPE, GQA, SwiGLU.

Differences from transformers' FlaxLlama that matter here:
- it takes ``inputs_embeds`` (soft prompts are spliced in as embeddings);
- RoPE uses the config's ``rope_theta`` (SmolLM2: 100000; FlaxLlama hard-codes 10000);
- masking uses a bounded bias plus a multiplicative mask (see ``approx``), never ``finfo.min``;
- every non-linearity goes through ``execution.approx`` (how it runs is an ``Execution``, apart
  from the architecture ``LlamaConfig``);
- ``head_rows`` computes logits for chosen vocabulary rows only (the verbalizer), so the
  full-vocabulary LM head never has to run, or be opened, under MPC.

The parameter tree has the same layout as transformers' Flax Llama, so HF Flax params load as-is:
``{"model": {"embed_tokens": {"embedding"}, "layers": {"0": {...}}, "norm": {"weight"}},
"lm_head": {"kernel"}}`` (``lm_head`` absent when embeddings are tied).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import ArchConfig, CheckpointError, ConfigError, Execution
from .rfa import frequencies, init_learned, rfa_attention


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ArchConfig):
    """The architecture, as the checkpoint's ``config.json`` says (how it runs: ``Execution``)."""
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = 2
    feature_maps: int = 0  # >0: the checkpoint carries learned attention feature maps of this
    #                        width in every layer (``secptune convert-attention``); rfa kind "learned"
    feature_window: int = 0  # >0: the maps were fitted beside a sliding window of exact attention
    #                          this many keys wide (LoLCATs-style hybrid); rfa.window must match

    family = "llama"
    HF_EXTRA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}

    def __post_init__(self):
        self._check_heads()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def _check_hf(cls, d: dict) -> None:
        if d.get("rope_scaling"):
            raise ConfigError(f"rope_scaling {d['rope_scaling']!r} is not supported")

    @classmethod
    def _hf_defaults(cls, d: dict) -> dict:
        return {"num_key_value_heads": d.get("num_attention_heads"), "rope_theta": d.get("rope_theta", 10000.0)}


# ------------------------------------------------------------------------------------------ parts
def rms_normalize(x, eps: float, rsqrt, scale: float = 64.0, switch: float = 1e3):
    """x / sqrt(mean(x^2) + eps) over the last axis, accurate in SPU's FM64 fixed point.

    With 18 fraction bits a product carries 36 before truncation, so ``x * x`` wraps around once
    |x| > 2^13.5 ~ 11585, and rsqrt of a large mean square is a tiny number with few significant
    fixed-point bits. LLaMA-family models have rare "massive activations" (SmolLM2-135M: |x| ~ 2.2e4
    in one channel from layer 11 on, mean squares ~ 8.6e5). So rows whose mean square is large
    (> ``switch``; any row that overflowed the plain form is far above it) are normalized as
    (x / 64) * rsqrt(mean((x / 64)^2) + eps / 64^2); other rows use the plain form. In plaintext
    both forms agree; the switch compares one value per row.

    Precision: XLA folds the constant 1/64 into the rsqrt factor, so massive rows are scaled by
    1/sqrt(mean(x^2)) ~ 1e-3, which FM64 resolves to ~0.3% (measured under ABY3: 0.34% on a
    |x| = 2.2e4 row, against 100% error for the naive form). FM128 policies avoid both limits.
    """
    plain = x * rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    xs = x * (1.0 / scale)
    ms = jnp.mean(xs * xs, axis=-1, keepdims=True)
    big = xs * rsqrt(ms + eps / (scale * scale))
    return jnp.where(ms * (scale * scale) > switch, big, plain)


class RMSNorm(nn.Module):
    config: LlamaConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        return rms_normalize(x, self.config.rms_norm_eps, self.execution.approx.rsqrt_fn) * w


def rope_tables(position_ids, head_dim: int, theta: float):
    """cos/sin tables [B, L, head_dim] for integer ``position_ids`` [B, L] (public values). Numpy
    positions give numpy tables, computed here in float64: constants of a program, where SPU would
    compute cos/sin of public angles in its fixed point (~1e-3 off in a variance taken from them)."""
    if isinstance(position_ids, np.ndarray):
        freqs = position_ids[..., None].astype(np.float64) / theta ** (np.arange(0, head_dim, 2) / head_dim)
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x: [..., T, heads, D]; cos/sin: [..., T, D] (broadcastable); HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rot * sin[..., None, :]


def shift_tables(cos, sin, shift):
    """RoPE tables of positions moved by a per-example offset: ``shift`` = (c, s), the tables of the
    offsets ([B, 1, D], from :func:`rope_tables`), by angle addition (the tables' halves repeat).
    Public tables times a secret shift is local under MPC; only the rotated q, k pay a product."""
    if shift is None:
        return cos, sin
    c, s = shift
    return cos * c - sin * s, sin * c + cos * s


def position_sensitive(config, execution: Execution) -> bool:
    """Whether absolute positions change the output. Softmax attention sees RoPE'd q.k, which
    depends on relative positions only; a linear-attention feature map of a RoPE'd vector does not."""
    return any(execution.layer_attention(i) == "rfa" for i in range(config.num_hidden_layers))


def layer_inputs(config: LlamaConfig, attention_mask, position_ids=None, shift=None):
    """What every layer gets besides its input: RoPE tables and the causal x key mask [B, 1, L, L].

    Positions default to the count of real tokens so far (left padding safe); ``shift``: see
    :func:`shift_tables`."""
    L = attention_mask.shape[-1]
    if position_ids is None:
        position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    cos, sin = shift_tables(*rope_tables(position_ids, config.head_dim, config.rope_theta), shift)
    causal = jnp.tril(jnp.ones((L, L), jnp.float32))
    return cos, sin, causal[None, None] * attention_mask[:, None, None, :].astype(jnp.float32)


class Attention(nn.Module):
    """Causal GQA attention. Returns ``(out, (k, v))``; ``k``/``v`` (KV heads, RoPE applied) are
    what a prefix cache keeps.

    With ``past=(k, v)`` ([E, Lp, KV, D], one cached prefix per example) the input ``x`` is
    ``[P, E, T, H]``: P prompt candidates for each of E examples, attending to their example's
    cached prefix and causally to themselves. The cache is never tiled P times.

    ``last``: only the last position's output is wanted (the model's last layer when only the
    scored token matters): keys and values of every position, the query, scores, softmax and
    output projection of the last position only; the output is [..., 1, H].
    """

    config: LlamaConfig
    execution: Execution = Execution()
    layer: int = 0

    @nn.compact
    def __call__(self, x, cos, sin, mask, past=None, prefix=None, last=False):
        cfg, ex = self.config, self.execution
        *lead, T, _ = x.shape
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)  # noqa: E731
        last = last and ex.layer_attention(self.layer) == "softmax"
        if last:  # one query: the last position's
            q = apply_rope(dense(H * D, "q_proj")(x[..., -1:, :]).reshape(*lead, 1, H, D), cos[..., -1:, :],
                           sin[..., -1:, :])
            mask = mask[..., -1:, :]
        else:
            q = apply_rope(dense(H * D, "q_proj")(x).reshape(*lead, T, H, D), cos, sin)
        k = apply_rope(dense(KV * D, "k_proj")(x).reshape(*lead, T, KV, D), cos, sin)
        v = dense(KV * D, "v_proj")(x).reshape(*lead, T, KV, D)
        self.sow("intermediates", "qkv", (q, k, v))  # read by convert-attention; free otherwise
        rep = lambda t: jnp.repeat(t, H // KV, axis=-2)  # noqa: E731  GQA: share each KV head
        scale = 1.0 / jnp.sqrt(jnp.float32(D))
        own = (k, v)
        if prefix is not None:  # deep prompt: per-candidate keys/values before this block's own
            k, v = jnp.concatenate([prefix[0], k], axis=-3), jnp.concatenate([prefix[1], v], axis=-3)
        if ex.layer_attention(self.layer) == "rfa":
            if prefix is not None:
                raise ValueError(f"layer {self.layer} runs linear attention; deep prompts need softmax "
                                 "attention in the layers they enter")
            # the masks' last query row is the key mask (every causal row ends at the last key)
            if ex.rfa.kind == "learned":  # fitted per layer: model owner's weights, like q_proj
                layer, G = self.layer, H // KV
                W = self.param("feature_map", lambda _key: jax.tree_util.tree_map(
                    jnp.asarray, init_learned(D, KV, G, ex.rfa.features, ex.rfa.seed, layer)))
            else:  # random frequencies: public constants of the program
                W = frequencies(D, KV, ex.rfa.features, ex.rfa.seed, self.layer)
            key_mask = mask[..., 0, -1, :]
            if past is None:
                out = rfa_attention(q, k, v, key_mask, W, ex.rfa, ex.approx.exp_fn, causal=True)
            else:
                Lp = past[0].shape[1]
                out = rfa_attention(q, k, v, None, W, ex.rfa, ex.approx.exp_fn,
                                    past=(past[0], past[1], key_mask[0, :, :Lp]))
            out = out.reshape(*lead, T, H * D)
            return dense(cfg.hidden_size, "o_proj")(out), own
        if past is None:
            scores = jnp.einsum("...qhd,...khd->...hqk", q, rep(k)) * scale
            probs = ex.approx.softmax_fn(scores, mask)
            out = jnp.einsum("...hqk,...khd->...qhd", probs, rep(v))
        else:
            pk, pv = rep(past[0]), rep(past[1])
            Lp = pk.shape[1]
            scores = jnp.concatenate([jnp.einsum("pethd,ekhd->pehtk", q, pk),
                                      jnp.einsum("pethd,pekhd->pehtk", q, rep(k))], axis=-1) * scale
            probs = ex.approx.softmax_fn(scores, mask)
            out = (jnp.einsum("pehtk,ekhd->pethd", probs[..., :Lp], pv)
                   + jnp.einsum("pehtk,pekhd->pethd", probs[..., Lp:], rep(v)))
        return dense(cfg.hidden_size, "o_proj")(out.reshape(*lead, q.shape[-3], H * D)), own


class MLP(nn.Module):
    config: LlamaConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = self.execution.approx.activation(cfg.hidden_act)
        gate = nn.Dense(cfg.intermediate_size, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(cfg.intermediate_size, use_bias=False, name="up_proj")(x)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="down_proj")(act(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    execution: Execution = Execution()
    layer: int = 0

    @nn.compact
    def __call__(self, x, cos, sin, mask, past=None, prefix=None, last=False):
        cfg, ex = self.config, self.execution
        a, kv = Attention(cfg, ex, self.layer, name="self_attn")(
            RMSNorm(cfg, ex, name="input_layernorm")(x), cos, sin, mask, past, prefix, last)
        x = x[..., -a.shape[-2]:, :] + a  # ``last``: the last position only from here on
        return x + MLP(cfg, ex, name="mlp")(RMSNorm(cfg, ex, name="post_attention_layernorm")(x)), kv


class LayerStack(nn.Module):
    """The decoder layers, or a contiguous run of them (``layers``: a range of layer indices).

    ``past[i]`` / ``prefix[i]``: the cached prefix and the per-candidate deep-prompt keys/values of
    layer i (mappings by layer index; a list of all layers works too). Returns the hidden states
    after the last layer run (no final norm) and each run layer's ``(k, v)``, in order.

    Runs of consecutive softmax layers go through one ``lax.scan`` over their stacked weights: the
    program holds one layer body instead of L, so XLA's code generation (superlinear in program
    size: 6 min for 30 unrolled layers) and SPU's compile stay per layer. Same ops, same order."""
    config: LlamaConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x, cos, sin, mask, past=None, layers=None, prefix=None, last=False):
        """``last``: only the last position's output of the final layer run is wanted (its other
        positions are computed up to their keys and values)."""
        layers = list(range(self.config.num_hidden_layers) if layers is None else layers)
        # initialisation creates each layer's parameters; convert-attention reads what they sow
        unrolled = (not self.execution.scan_layers or self.is_initializing()
                    or self.is_mutable_collection("intermediates"))
        cache = []
        for run in ([[i] for i in layers] if unrolled else scan_runs(layers, self.execution, last)):
            pick = lambda t: None if t is None else [t[i] for i in run]  # noqa: E731
            if len(run) == 1:
                i = run[0]
                x, kv = DecoderLayer(self.config, self.execution, i, name=str(i))(
                    x, cos, sin, mask, None if past is None else past[i], None if prefix is None else prefix[i],
                    last and i == layers[-1])
                cache.append(kv)
            else:
                x, kvs = scan_layers(self.config, self.execution, run[0], [self.variables["params"][str(i)] for i in run],
                                     x, cos, sin, mask, pick(past), pick(prefix))
                cache.extend(kvs)
        return x, cache


def scan_runs(layers: list, execution: Execution, last: bool) -> list:
    """``layers`` cut into runs to scan: maximal runs of consecutive softmax layers; a linear-
    attention layer (its own feature maps) and a ``last`` final layer (another shape) run alone."""
    runs, open_run = [], False
    for j, i in enumerate(layers):
        alone = execution.layer_attention(i) != "softmax" or (last and j == len(layers) - 1)
        if open_run and not alone and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
        open_run = not alone
    return runs


def scan_layers(config, execution, first: int, params: list, x, cos, sin, mask, past=None, prefix=None):
    """Softmax decoder layers ``first``.. (``params``: each one's tree) in one ``lax.scan``; ``past``
    / ``prefix``: their per-layer ``(k, v)`` or None. Returns x and each layer's own ``(k, v)``."""
    stack = lambda trees: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    layer = DecoderLayer(config, execution, first, parent=None)  # softmax: the index plays no other part

    def body(h, xs):
        p, pa, pr = xs
        h, kv = layer.apply({"params": p}, h, cos, sin, mask, pa, pr)
        return h, kv

    xs = (stack(params), None if past is None else stack(past), None if prefix is None else stack(prefix))
    x, (k, v) = jax.lax.scan(body, x, xs)
    return x, [(k[j], v[j]) for j in range(len(params))]


class LlamaModel(nn.Module):
    config: LlamaConfig
    execution: Execution = Execution()

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                                     embedding_init=nn.initializers.normal(0.02))
        self.layers = LayerStack(cfg, self.execution)
        self.norm = RMSNorm(cfg, self.execution)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, attention_mask=None, position_ids=None, return_cache=False, shift=None):
        """inputs_embeds [B, L, H]; attention_mask [B, L] (1 = real token); returns hidden [B, L, H]
        (and, with ``return_cache``, the per-layer ``(k, v)`` to use as a prefix cache)."""
        B, L, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, L), jnp.int32)
        cos, sin, mask = layer_inputs(self.config, attention_mask, position_ids, shift)
        x, cache = self.layers(inputs_embeds, cos, sin, mask)
        return (self.norm(x), cache) if return_cache else self.norm(x)

    def extend(self, inputs_embeds, cache, cache_mask, shift=None):
        """Continue cached prefixes: inputs_embeds [P, E, T, H] (P candidates per example), cache a
        per-layer list of ``(k, v)`` [E, Lp, KV, D], cache_mask [E, Lp]. Positions Lp .. Lp+T-1,
        moved by the prefill's ``shift`` ([E, 1, D] tables) if it had one."""
        return self.norm(self.continue_layers(inputs_embeds, cache, cache_mask, shift=shift)[0])

    def continue_layers(self, x, cache, cache_mask, layers=None, shift=None, prefix=None, last=False,
                        prefix_takes_positions=True):
        """Run ``layers`` (default: all) over x [P, E, T, H] after the cached prefixes
        (``cache[i]`` = (k, v) [E, Lp, KV, D] of layer i, ``cache_mask`` [E, Lp]). Returns the raw
        hidden states (no final norm) and each run layer's ``(k, v)`` of x.

        ``prefix[i]`` = (k, v) [P, E, n, KV, D]: a deep prompt, keys/values that every token of x
        sees in layer i, standing at positions Lp .. Lp+n-1 (x then starts at Lp+n); a mapping with
        every layer run (``prefix_takes_positions=False``: x keeps positions Lp.., as below the
        layers a virtual prefix enters). ``last``: only the last position comes out of the final
        layer run."""
        P, E, T, _ = x.shape
        Lp = cache_mask.shape[1]
        n = 0 if not prefix else next(iter(prefix.values()))[0].shape[-3]  # prefix: {layer: (k, v)}
        at = Lp + (n if prefix_takes_positions else 0)
        cos, sin = shift_tables(*rope_tables(jnp.arange(at, at + T)[None], self.config.head_dim,
                                             self.config.rope_theta), shift)  # [1 or E, T, D]
        blocks = [jnp.broadcast_to(cache_mask.astype(jnp.float32)[None, :, None, None, :], (1, E, 1, T, Lp))]
        if n:
            blocks.append(jnp.ones((1, E, 1, T, n), jnp.float32))
        blocks.append(jnp.broadcast_to(jnp.tril(jnp.ones((T, T), jnp.float32)), (1, E, 1, T, T)))
        return self.layers(x, cos, sin, jnp.concatenate(blocks, -1), cache, layers, prefix, last)

    def final_norm(self, x):
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder with an LM head. Call modes: ``__call__`` (full logits), ``hidden``, ``head_rows``."""

    config: LlamaConfig
    execution: Execution = Execution()

    def setup(self):
        self.model = LlamaModel(self.config, self.execution)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False)

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def hidden(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.model.embed(input_ids)
        return self.model(inputs_embeds, attention_mask, position_ids)

    def prefill(self, inputs_embeds, attention_mask, shift=None):
        """Prefix pass: returns the per-layer ``(k, v)`` cache of ``inputs_embeds`` [E, Lp, H].

        Left-pad the prefixes; positions are ``arange(Lp)``, public. Softmax scores depend only on
        relative offsets, so the pad shift is harmless. Linear attention (``position_sensitive``)
        sees absolute positions: pass ``shift`` = rope_tables(-pads) [E, 1, D] (the data owner's,
        secret) so that each text starts at position 0, as in a forward without a cache; give
        ``extend`` the same shift.
        """
        Lp = inputs_embeds.shape[1]
        pos = jnp.broadcast_to(jnp.arange(Lp), inputs_embeds.shape[:2])
        return self.model(inputs_embeds, attention_mask, pos, return_cache=True, shift=shift)[1]

    def extend(self, inputs_embeds, cache, cache_mask, shift=None):
        return self.model.extend(inputs_embeds, cache, cache_mask, shift)

    def continue_layers(self, x, cache, cache_mask, layers=None, shift=None, prefix=None, last=False,
                        prefix_takes_positions=True):
        return self.model.continue_layers(x, cache, cache_mask, layers, shift, prefix, last, prefix_takes_positions)

    def final_norm(self, x):
        return self.model.final_norm(x)

    def head_rows(self, hidden, row_ids):
        """Logits for the vocabulary rows ``row_ids`` only: hidden [..., H] -> [..., len(row_ids)]."""
        if self.config.tie_word_embeddings:
            w = jnp.take(self.model.embed_tokens.embedding, jnp.asarray(row_ids), axis=0)  # [R, H]
        else:
            w = jnp.take(self.lm_head.variables["params"]["kernel"], jnp.asarray(row_ids), axis=1).T
        return hidden @ w.T

    def head_select(self, hidden, rows):
        """Logits for the rows picked by ``rows`` [R, V] (one-hot, may be secret): [..., H] -> [..., R].

        Under MPC this keeps *which* words are scored hidden: ``rows @ E`` is one matmul whose
        communication scales with R x H, not with the vocabulary.
        """
        if self.config.tie_word_embeddings:
            w = rows @ self.model.embed_tokens.embedding  # [R, H]
        else:
            w = rows @ self.lm_head.variables["params"]["kernel"].T
        return hidden @ w.T

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None):
        h = self.hidden(input_ids, inputs_embeds, attention_mask, position_ids)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)


def init_params(config: LlamaConfig, seed: int = 0, seq_len: int = 4, execution: Execution = Execution()) -> Any:
    """Random parameters (tests, ``tiny-llama``); a learned-RFA ``execution`` adds fresh feature maps."""
    model = LlamaForCausalLM(config, execution)
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(jax.random.PRNGKey(seed), input_ids=ids)["params"]


FEATURE_MAP_TENSORS = ("q_kernel", "q_bias", "k_kernel", "k_bias")  # learned RFA maps (rfa.init_learned)


def params_from_hf_state(state: dict, config: LlamaConfig) -> dict:
    """Map an HF (PyTorch-named) state dict of numpy arrays to this module's param tree."""
    def get(name):
        if name not in state:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        return state[name]

    layers = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        lin = lambda n: {"kernel": get(p + n + ".weight").T}  # noqa: E731  torch [out, in] -> [in, out]
        layers[str(i)] = {
            "input_layernorm": {"weight": get(p + "input_layernorm.weight")},
            "post_attention_layernorm": {"weight": get(p + "post_attention_layernorm.weight")},
            "self_attn": {n: lin("self_attn." + n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {n: lin("mlp." + n) for n in ("gate_proj", "up_proj", "down_proj")},
        }
        if config.feature_maps:
            layers[str(i)]["self_attn"]["feature_map"] = {
                n: get(f"{p}self_attn.feature_map.{n}") for n in FEATURE_MAP_TENSORS}
    params = {"model": {"embed_tokens": {"embedding": get("model.embed_tokens.weight")},
                        "layers": layers, "norm": {"weight": get("model.norm.weight")}}}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params


def params_to_hf_state(params: dict, config: LlamaConfig) -> dict:
    """Inverse of :func:`params_from_hf_state` (used to write converted checkpoints)."""
    m = params["model"]
    out = {"model.embed_tokens.weight": m["embed_tokens"]["embedding"], "model.norm.weight": m["norm"]["weight"]}
    for i in range(config.num_hidden_layers):
        lp, p = m["layers"][str(i)], f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = lp["input_layernorm"]["weight"]
        out[p + "post_attention_layernorm.weight"] = lp["post_attention_layernorm"]["weight"]
        for grp in ("self_attn", "mlp"):
            for n, v in lp[grp].items():
                if n == "feature_map":
                    out.update({f"{p}{grp}.feature_map.{t}": v[t] for t in FEATURE_MAP_TENSORS})
                else:
                    out[f"{p}{grp}.{n}.weight"] = v["kernel"].T
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out
