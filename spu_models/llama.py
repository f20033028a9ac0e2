"""LLaMA-family decoder (SmolLM2, LLaMA, ...) in one file: RMSNorm, RoPE, GQA, SwiGLU.

Differences from transformers' FlaxLlama that matter here:
- it takes ``inputs_embeds`` (soft prompts are spliced in as embeddings);
- RoPE uses the config's ``rope_theta`` (SmolLM2: 100000; FlaxLlama hard-codes 10000);
- masking uses a bounded bias plus a multiplicative mask (see ``approx``), never ``finfo.min``;
- every non-linearity goes through ``config.approx``;
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

from .approx import Approx

ATTENTION_KINDS = ("softmax",)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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
    attention: str = "softmax"
    approx: Approx = Approx()

    family = "llama"

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {self.attention!r}; choose from {ATTENTION_KINDS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> "LlamaConfig":
        """Build from an HF ``config.json`` dict (``model_type`` llama / mistral-like)."""
        keys = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in keys}
        kw.setdefault("num_key_value_heads", d.get("num_attention_heads"))
        kw.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        if d.get("rope_scaling"):
            raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported")
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("attention", "approx")}
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="float32")
        return d


# ------------------------------------------------------------------------------------------ parts
class RMSNorm(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        var = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * self.config.approx.rsqrt_fn(var + self.config.rms_norm_eps) * w


def rope_tables(position_ids, head_dim: int, theta: float):
    """cos/sin tables [B, L, head_dim] for integer ``position_ids`` [B, L] (public values)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x: [B, L, H, D]; HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        cfg = self.config
        B, L, _ = x.shape
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)  # noqa: E731
        q = dense(H * D, "q_proj")(x).reshape(B, L, H, D)
        k = dense(KV * D, "k_proj")(x).reshape(B, L, KV, D)
        v = dense(KV * D, "v_proj")(x).reshape(B, L, KV, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = H // KV
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(D))
        probs = cfg.approx.softmax_fn(scores, mask)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, L, H * D)
        return dense(cfg.hidden_size, "o_proj")(out)


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = cfg.approx.activation(cfg.hidden_act)
        gate = nn.Dense(cfg.intermediate_size, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(cfg.intermediate_size, use_bias=False, name="up_proj")(x)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="down_proj")(act(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        x = x + Attention(self.config, name="self_attn")(
            RMSNorm(self.config, name="input_layernorm")(x), cos, sin, mask)
        return x + MLP(self.config, name="mlp")(RMSNorm(self.config, name="post_attention_layernorm")(x))


class LayerStack(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        for i in range(self.config.num_hidden_layers):
            x = DecoderLayer(self.config, name=str(i))(x, cos, sin, mask)
        return x


class LlamaModel(nn.Module):
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                                     embedding_init=nn.initializers.normal(0.02))
        self.layers = LayerStack(cfg)
        self.norm = RMSNorm(cfg)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, attention_mask=None, position_ids=None):
        """inputs_embeds [B, L, H]; attention_mask [B, L] (1 = real token); returns hidden [B, L, H]."""
        B, L, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, L), jnp.int32)
        if position_ids is None:  # left padding safe: count real tokens so far
            position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)
        causal = jnp.tril(jnp.ones((L, L), jnp.float32))
        mask = causal[None, None] * attention_mask[:, None, None, :].astype(jnp.float32)
        x = self.layers(inputs_embeds, cos, sin, mask)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder with an LM head. Call modes: ``__call__`` (full logits), ``hidden``, ``head_rows``."""

    config: LlamaConfig

    def setup(self):
        self.model = LlamaModel(self.config)
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


def init_params(config: LlamaConfig, seed: int = 0, seq_len: int = 4) -> Any:
    """Random parameters (tests, ``tiny-llama``)."""
    model = LlamaForCausalLM(config)
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(jax.random.PRNGKey(seed), input_ids=ids)["params"]


def params_from_hf_state(state: dict, config: LlamaConfig) -> dict:
    """Map an HF (PyTorch-named) state dict of numpy arrays to this module's param tree."""
    def get(name):
        if name not in state:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
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
                out[f"{p}{grp}.{n}.weight"] = v["kernel"].T
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out
