"""Checkpoint loading into plain param pytrees: HF safetensors directories and llama.cpp GGUF.

Only reads the files it is handed; fetching and caching live in ``tuning``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import llama
from .config import CheckpointError  # noqa: F401  (re-exported: loaders raise it)


# ------------------------------------------------------------------------------ HF directories
def read_safetensors_dir(path: Path) -> dict:
    """All tensors of ``model.safetensors`` or a sharded ``model.safetensors.index.json``, as float32 numpy."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors (or index) found; only safetensors checkpoints are read")
    state = {}
    for f in files:
        state.update(_read_safetensors(path / f))
    return state


FEATURE_MAPS_FILE = "feature_maps.safetensors"
# transformers' PyTorch from_pretrained reads the file's metadata and fails on a file without it
# ('NoneType' object has no attribute 'get'); safetensors' numpy writer adds none by itself
SAFETENSORS_METADATA = {"format": "pt"}


def write_safetensors(tensors: dict, file) -> None:
    """Write numpy ``tensors`` to ``file`` with the metadata other tools' loaders expect."""
    from safetensors.numpy import save_file

    save_file(tensors, str(file), metadata=SAFETENSORS_METADATA)


def safetensors_metadata(file) -> dict:
    """The metadata of a safetensors file ({} if it has none); reads the header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def _read_safetensors(file: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        part = load_file(str(file))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    return {k: np.asarray(v, dtype=np.float32) for k, v in part.items()}


def load_hf_dir(path, **config_overrides):
    """Load an HF model directory (config.json + safetensors). Returns ``(config, params)``."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    d = json.loads(cfg_file.read_text())
    kind = d.get("model_type")
    state = read_safetensors_dir(path)
    if (path / FEATURE_MAPS_FILE).exists():  # learned attention feature maps (convert-attention)
        if kind != "llama" or not d.get("feature_maps"):
            raise CheckpointError(f"{path}: {FEATURE_MAPS_FILE} needs a llama config with feature_maps > 0")
        state.update(_read_safetensors(path / FEATURE_MAPS_FILE))
    if kind == "llama":
        cfg = llama.LlamaConfig.from_hf(d, **config_overrides)
        return cfg, check_params(cfg, llama.params_from_hf_state(state, cfg), path)
    if kind in ("bert", "roberta"):
        from . import bert

        cfg = bert.BertConfig.from_hf(d, **config_overrides)
        return cfg, check_params(cfg, bert.params_from_hf_state(state, cfg), path)
    raise CheckpointError(f"{path}: model_type {kind!r} is not supported (llama, bert, roberta)")


def check_params(config, params, source) -> dict:
    """``params`` as the architecture ``config`` expects them: every tensor of the shape the model
    builds (from the config, without computing anything) and finite. CheckpointError naming the
    first tensor that is not (a checkpoint whose config and tensors disagree, or a corrupt one)."""
    import jax

    from . import bert

    if isinstance(config, llama.LlamaConfig):
        want = jax.eval_shape(lambda: llama.init_params(config))
    else:
        want = jax.eval_shape(lambda: bert.init_params(config))
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for k, w in jax.tree_util.tree_leaves_with_path(want):
        name = jax.tree_util.keystr(k)
        if name in got and tuple(np.shape(got[name])) != tuple(w.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(np.shape(got[name]))}, the config "
                                  f"needs {tuple(w.shape)}")
    for name, v in got.items():
        if not np.isfinite(np.asarray(v)).all():
            raise CheckpointError(f"{source}: tensor {name} holds NaN or Inf")
    return params


# ------------------------------------------------------------------------------------- GGUF
def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of Q/K rows (HF rotate-half -> interleaved)."""
    # llama.cpp applied w.reshape(n_head, 2, half, in).swapaxes(1, 2); this is its inverse.
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_gguf(path):
    """Read a llama-architecture GGUF. Returns ``(hf_config_dict, hf_state_dict, tokenizer_meta)``.

    Tensors are dequantized with the ``gguf`` package (numpy only) and renamed to HF names; Q and
    K are un-permuted back to HF's rotate-half layout.
    """
    import gguf

    path, reader, field = _open_gguf(path)
    arch = field("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama)")
    n_head, n_kv = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    tokens = field("tokenizer.ggml.tokens")
    hf_cfg = {
        "model_type": "llama",
        "vocab_size": int(field("llama.vocab_size", len(tokens))),
        "hidden_size": int(field("llama.embedding_length")),
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("llama.context_length")),
    }
    state = {}
    for t in reader.tensors:
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {t.name} cannot be dequantized ({e})") from None
        shape = tuple(int(s) for s in reversed(t.shape))  # GGML lists dims innermost first
        w = np.asarray(w, np.float32).reshape(shape)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _GGUF_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = _unpermute_qk(w, n_head)
            elif parts[2] == "attn_k":
                w = _unpermute_qk(w, n_kv)
        else:
            continue  # e.g. rope_freqs; not used by this architecture
        state[name] = w
    expected = 3 + 9 * hf_cfg["num_hidden_layers"] - 1  # embed, norm, (lm_head) + 9 per layer
    if len(state) < expected:
        raise CheckpointError(f"{path}: only {len(state)} of {expected} tensors found; file is truncated or corrupt")
    hf_cfg["tie_word_embeddings"] = "lm_head.weight" not in state
    return hf_cfg, state, _tokenizer_meta(field)


def read_gguf_tokenizer(path) -> dict:
    """Only the tokenizer metadata of a GGUF (no tensor is read): what the data owner needs."""
    return _tokenizer_meta(_open_gguf(path)[2])


def _open_gguf(path):
    """``(path, reader, field)``: ``field(key, default)`` reads metadata, raising on a missing key."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
            return default
        return f.contents()

    return path, reader, field


def _tokenizer_meta(field) -> dict:
    return {
        "model": field("tokenizer.ggml.model"),
        "pre": field("tokenizer.ggml.pre", "default"),
        "tokens": list(field("tokenizer.ggml.tokens")),
        "merges": list(field("tokenizer.ggml.merges")),
        "token_type": [int(x) for x in field("tokenizer.ggml.token_type")],
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id", -1)),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id", -1)),
        "padding_token_id": int(field("tokenizer.ggml.padding_token_id", -1)),
        "chat_template": field("tokenizer.chat_template", ""),
    }


def load_gguf(path, **config_overrides):
    """Load a GGUF directly into ``(config, params)`` (the tokenizer metadata is dropped)."""
    hf_cfg, state, _ = read_gguf(path)
    cfg = llama.LlamaConfig.from_hf(hf_cfg, **config_overrides)
    return cfg, check_params(cfg, llama.params_from_hf_state(state, cfg), path)
