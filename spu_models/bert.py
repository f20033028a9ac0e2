"""BERT / RoBERTa encoder with a masked-LM head, in one file.

Differences from transformers' FlaxBert / FlaxRoberta that matter here:
- it takes ``inputs_embeds`` (soft prompts are spliced in as word embeddings; position and
  token-type embeddings and the embedding LayerNorm are added inside the forward);
- masking uses a bounded bias plus a multiplicative mask (see ``approx``), never ``finfo.min``;
- every non-linearity (softmax, activation, LayerNorm's rsqrt) goes through ``execution.approx``;
- RoBERTa position ids come from ``attention_mask`` (``cumsum(mask) * mask + pad_token_id``),
  not from ``input_ids``, so they are also right when only embeddings are passed;
- ``head_rows`` computes MLM logits for chosen vocabulary rows only (the verbalizer), so the
  full-vocabulary decoder never has to run, or be opened, under MPC.

The parameter tree is the one of transformers' ``FlaxBertForMaskedLM`` /
``FlaxRobertaForMaskedLM``, so HF Flax params load as-is. The names depend on ``model_type``:

    bert:    {"bert": ENC, "cls": {"predictions": {"transform": {"dense", "LayerNorm"}, "bias"}}}
    roberta: {"roberta": ENC, "lm_head": {"dense", "layer_norm", "bias"}}
    ENC = {"embeddings": {"word_embeddings", "position_embeddings", "token_type_embeddings",
           "LayerNorm"}, "encoder": {"layer": {"0": {"attention": {"self": {"query", "key", "value"},
           "output": {"dense", "LayerNorm"}}, "intermediate": {"dense"}, "output": {"dense",
           "LayerNorm"}}, ...}}}

The decoder is always tied to the word embeddings (no pooler: it is unused by the MLM head).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ArchConfig, ConfigError, Execution
from .rfa import frequencies, rfa_attention

MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class BertConfig(ArchConfig):
    """The architecture, as the checkpoint's ``config.json`` says (how it runs: ``Execution``)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"

    family = "bert"
    HF_EXTRA = {"position_embedding_type": "absolute", "tie_word_embeddings": True, "torch_dtype": "float32"}

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown model_type {self.model_type!r}; choose from {MODEL_TYPES}")
        self._check_heads()

    @classmethod
    def _check_hf(cls, d: dict) -> None:
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"position_embedding_type {d['position_embedding_type']!r} is not supported")
        if not d.get("tie_word_embeddings", True):
            raise ConfigError("untied MLM decoder weights are not supported")

    def _hf_extra(self) -> dict:
        return {"architectures": ["RobertaForMaskedLM" if self.model_type == "roberta" else "BertForMaskedLM"]}


# ------------------------------------------------------------------------------------------ parts
class LayerNorm(nn.Module):
    """LayerNorm through ``approx.rsqrt_fn``; params ``scale`` / ``bias`` as in ``nn.LayerNorm``."""

    config: BertConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * self.execution.approx.rsqrt_fn(var + self.config.layer_norm_eps) * scale + bias


def _dense(n: int, name: Optional[str] = None):
    return nn.Dense(n, kernel_init=nn.initializers.normal(0.02), name=name)


def _embed(n: int, h: int):
    return nn.Embed(n, h, embedding_init=nn.initializers.normal(0.02))


class Embeddings(nn.Module):
    config: BertConfig
    execution: Execution = Execution()

    def setup(self):
        cfg = self.config
        self.word_embeddings = _embed(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = _embed(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = _embed(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg, self.execution)

    def embed(self, input_ids):
        """Word embeddings only [B, L, H] (what soft prompts are spliced into)."""
        return self.word_embeddings(input_ids)

    def __call__(self, inputs_embeds, position_ids, token_type_ids):
        x = inputs_embeds + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    config: BertConfig
    execution: Execution = Execution()
    layer: int = 0

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        B, L, _ = x.shape
        H, D = cfg.num_attention_heads, cfg.head_dim
        q, k, v = (_dense(H * D, n)(x).reshape(B, L, H, D) for n in ("query", "key", "value"))
        if self.execution.layer_attention(self.layer) == "rfa":  # bidirectional; mask [B, 1, 1, L] is the key mask
            W = frequencies(D, H, self.execution.rfa.features, self.execution.rfa.seed, self.layer)
            out = rfa_attention(q, k, v, mask[:, 0, 0, :], W, self.execution.rfa, self.execution.approx.exp_fn, causal=False)
            return out.reshape(B, L, H * D)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(D))
        probs = self.execution.approx.softmax_fn(scores, mask)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, L, H * D)


class AddNorm(nn.Module):
    """HF's ``*Output`` blocks: dense, residual add, LayerNorm (dropout omitted: inference/tuning only)."""

    config: BertConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x, residual):
        return LayerNorm(self.config, self.execution, name="LayerNorm")(_dense(self.config.hidden_size, "dense")(x) + residual)


class Attention(nn.Module):
    config: BertConfig
    execution: Execution = Execution()
    layer: int = 0

    @nn.compact
    def __call__(self, x, mask):
        return AddNorm(self.config, self.execution, name="output")(SelfAttention(self.config, self.execution, self.layer, name="self")(x, mask), x)


class Intermediate(nn.Module):
    config: BertConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return self.execution.approx.activation(cfg.hidden_act)(_dense(cfg.intermediate_size, "dense")(x))


class Layer(nn.Module):
    config: BertConfig
    execution: Execution = Execution()
    layer: int = 0

    @nn.compact
    def __call__(self, x, mask):
        x = Attention(self.config, self.execution, self.layer, name="attention")(x, mask)
        return AddNorm(self.config, self.execution, name="output")(Intermediate(self.config, self.execution, name="intermediate")(x), x)


class LayerStack(nn.Module):
    config: BertConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.config.num_hidden_layers):
            x = Layer(self.config, self.execution, i, name=str(i))(x, mask)
        return x


class Encoder(nn.Module):
    config: BertConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x, mask):
        return LayerStack(self.config, self.execution, name="layer")(x, mask)


class BertModel(nn.Module):
    """Embeddings + encoder; named ``bert`` or ``roberta`` (``config.model_type``) by the top module."""

    config: BertConfig
    execution: Execution = Execution()

    def setup(self):
        self.embeddings = Embeddings(self.config, self.execution)
        self.encoder = Encoder(self.config, self.execution)

    def embed(self, input_ids):
        return self.embeddings.embed(input_ids)

    def __call__(self, inputs_embeds, attention_mask=None, token_type_ids=None, position_ids=None):
        """inputs_embeds [B, L, H]; attention_mask [B, L] (1 = real token); returns hidden [B, L, H]."""
        cfg = self.config
        B, L, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, L), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, L), jnp.int32)
        if position_ids is None:
            if cfg.model_type == "roberta":  # HF: positions start at pad_token_id + 1, pads get pad_token_id
                m = attention_mask.astype(jnp.int32)
                position_ids = jnp.cumsum(m, axis=-1) * m + cfg.pad_token_id
            else:
                position_ids = jnp.broadcast_to(jnp.arange(L), (B, L))
        x = self.embeddings(inputs_embeds, position_ids, token_type_ids)
        mask = attention_mask[:, None, None, :].astype(jnp.float32)  # [B, 1, 1, L]: keys only
        return self.encoder(x, mask)


class Transform(nn.Module):
    """BERT's ``cls/predictions/transform``: dense, activation, LayerNorm."""

    config: BertConfig
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = self.execution.approx.activation(cfg.hidden_act)(_dense(cfg.hidden_size, "dense")(x))
        return LayerNorm(cfg, self.execution, name="LayerNorm")(x)


class MLMHead(nn.Module):
    """Transform plus output bias [V]; the decoder weight is the (tied) word embedding.

    BERT (``cls/predictions``) nests dense + ``LayerNorm`` under ``transform``; RoBERTa
    (``lm_head``) keeps ``dense`` + ``layer_norm`` at its own level.
    """

    config: BertConfig
    execution: Execution = Execution()

    def setup(self):
        cfg = self.config
        self.bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,))
        if cfg.model_type == "roberta":
            self.dense, self.layer_norm = _dense(cfg.hidden_size), LayerNorm(cfg, self.execution)
        else:
            self.transform = Transform(cfg, self.execution)

    def __call__(self, hidden):
        """The transformed hidden states [..., H] (before the decoder)."""
        if self.config.model_type == "roberta":
            return self.layer_norm(self.execution.approx.activation(self.config.hidden_act)(self.dense(hidden)))
        return self.transform(hidden)


class BertCls(nn.Module):
    """BERT's ``cls`` wrapper around ``predictions`` (kept only for the HF param layout)."""

    config: BertConfig
    execution: Execution = Execution()

    def setup(self):
        self.predictions = MLMHead(self.config, self.execution)


class BertForMaskedLM(nn.Module):
    """Encoder with an MLM head. Call modes: ``__call__`` (full logits), ``embed``, ``hidden``, ``head_rows``.

    Submodule names follow ``config.model_type`` (``bert`` + ``cls``, or ``roberta`` + ``lm_head``).
    """

    config: BertConfig
    execution: Execution = Execution()

    def setup(self):
        cfg = self.config
        self.encoder = BertModel(cfg, self.execution, name=cfg.model_type)
        if cfg.model_type == "roberta":
            self.lm_head = MLMHead(cfg, self.execution)
        else:
            self.cls = BertCls(cfg, self.execution)

    @property
    def head(self) -> MLMHead:
        return self.lm_head if self.config.model_type == "roberta" else self.cls.predictions

    def embed(self, input_ids):
        """Word embeddings only [B, L, H]; position/type embeddings are added by ``hidden``."""
        return self.encoder.embed(input_ids)

    def hidden(self, input_ids=None, inputs_embeds=None, attention_mask=None, token_type_ids=None,
               position_ids=None):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.encoder.embed(input_ids)
        return self.encoder(inputs_embeds, attention_mask, token_type_ids, position_ids)

    def head_rows(self, hidden, row_ids):
        """MLM logits for the vocabulary rows ``row_ids`` only: hidden [..., H] -> [..., len(row_ids)]."""
        row_ids = jnp.asarray(row_ids)
        w = jnp.take(self.encoder.embeddings.word_embeddings.embedding, row_ids, axis=0)  # [R, H]
        return self.head(hidden) @ w.T + jnp.take(self.head.bias, row_ids)

    def head_select(self, hidden, rows):
        """MLM logits for the rows picked by ``rows`` [R, V] (one-hot, may be secret)."""
        w = rows @ self.encoder.embeddings.word_embeddings.embedding  # [R, H]
        return self.head(hidden) @ w.T + rows @ self.head.bias

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, token_type_ids=None,
                 position_ids=None):
        h = self.head(self.hidden(input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids))
        return self.encoder.embeddings.word_embeddings.attend(h) + self.head.bias


def init_params(config: BertConfig, seed: int = 0, seq_len: int = 4) -> Any:
    """Random parameters (tests, tiny models)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return BertForMaskedLM(config).init(jax.random.PRNGKey(seed), input_ids=ids)["params"]


# ------------------------------------------------------------------------------ HF state dicts
def _layer_modules(i: int) -> dict:
    """HF (PyTorch dotted) -> our (param-tree path) names for the linear and norm modules of layer ``i``."""
    names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
    return {f"encoder.layer.{i}.{n}": ("encoder", "layer", str(i), *n.split(".")) for n in names}


def _module_map(config: BertConfig) -> dict:
    """Every HF module holding weight/bias, mapped to its path in our tree."""
    p = config.model_type
    m = {f"{p}.{k}": (p, *v) for i in range(config.num_hidden_layers) for k, v in _layer_modules(i).items()}
    m[f"{p}.embeddings.LayerNorm"] = (p, "embeddings", "LayerNorm")
    if p == "roberta":
        m.update({"lm_head.dense": ("lm_head", "dense"), "lm_head.layer_norm": ("lm_head", "layer_norm")})
    else:
        m.update({"cls.predictions.transform.dense": ("cls", "predictions", "transform", "dense"),
                  "cls.predictions.transform.LayerNorm": ("cls", "predictions", "transform", "LayerNorm")})
    return m


def _is_norm(path) -> bool:
    return path[-1] in ("LayerNorm", "layer_norm")


def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def params_from_hf_state(state: dict, config: BertConfig) -> dict:
    """Map an HF (PyTorch-named) state dict of numpy arrays to this module's param tree.

    Accepts the old ``gamma``/``beta`` LayerNorm names and ``*.decoder.bias`` for the MLM bias;
    the decoder weight is ignored (tied to the word embeddings); pooler weights are ignored.
    """
    def get(*names):
        for n in names:
            if n in state:
                return state[n]
        raise KeyError(f"checkpoint is missing tensor {names[0]!r}")

    p, params = config.model_type, {}
    for hf, path in _module_map(config).items():
        if _is_norm(path):
            _set(params, path + ("scale",), get(hf + ".weight", hf + ".gamma"))
            _set(params, path + ("bias",), get(hf + ".bias", hf + ".beta"))
        else:  # torch [out, in] -> [in, out]
            _set(params, path + ("kernel",), get(hf + ".weight").T)
            _set(params, path + ("bias",), get(hf + ".bias"))
    for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        _set(params, (p, "embeddings", n, "embedding"), get(f"{p}.embeddings.{n}.weight"))
    head = "lm_head" if p == "roberta" else "cls.predictions"
    _set(params, tuple(head.split(".")) + ("bias",), get(head + ".bias", head + ".decoder.bias"))
    return params


def params_to_hf_state(params: dict, config: BertConfig) -> dict:
    """Inverse of :func:`params_from_hf_state` (tied decoder weight omitted, as HF's safetensors do)."""
    def at(path):
        t = params
        for k in path:
            t = t[k]
        return t

    p, out = config.model_type, {}
    for hf, path in _module_map(config).items():
        if _is_norm(path):
            out[hf + ".weight"], out[hf + ".bias"] = at(path + ("scale",)), at(path + ("bias",))
        else:
            out[hf + ".weight"], out[hf + ".bias"] = at(path + ("kernel",)).T, at(path + ("bias",))
    for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        out[f"{p}.embeddings.{n}.weight"] = at((p, "embeddings", n, "embedding"))
    head = "lm_head" if p == "roberta" else "cls.predictions"
    out[head + ".bias"] = at(tuple(head.split(".")) + ("bias",))
    return out
