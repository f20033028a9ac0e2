"""Checkpoint loading (GGUF, HF dirs), model names, and the CLI's one-line errors."""
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from spu_models import llama
from spu_models.loading import CheckpointError, load_gguf, read_gguf
from tuning.assets.cache import secptune_home
from tuning.assets.models import ByteTokenizer, load_model

gguf = pytest.importorskip("gguf")


def _llama_cpp_permute(w, n_head):
    """What llama.cpp's convert script does to Q/K rows (written here independently of the loader)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_tiny_gguf(path, cfg, params):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    # a valid byte-level BPE: "t", the digits, merges "t d" -> "td"; fillers up to the vocab size
    tokens = ["t", *"0123456789", *[f"t{d}" for d in range(10)]]
    w.add_token_list(tokens + [f"x{i}" for i in range(cfg.vocab_size - len(tokens))])
    w.add_token_merges([f"t {d}" for d in range(10)])
    w.add_token_types([1] * cfg.vocab_size)
    m = params["model"]
    w.add_tensor("token_embd.weight", np.asarray(m["embed_tokens"]["embedding"]))
    w.add_tensor("output_norm.weight", np.asarray(m["norm"]["weight"]))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        lp = m["layers"][str(i)]
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.asarray(lp["input_layernorm"]["weight"]))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.asarray(lp["post_attention_layernorm"]["weight"]))
        for grp in ("self_attn", "mlp"):
            for n, v in lp[grp].items():
                t = np.ascontiguousarray(np.asarray(v["kernel"]).T)  # [out, in]
                if n == "q_proj":
                    t = _llama_cpp_permute(t, cfg.num_attention_heads)
                if n == "k_proj":
                    t = _llama_cpp_permute(t, cfg.num_key_value_heads)
                w.add_tensor(f"blk.{i}.{names[n]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path):
    cfg = llama.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0,
                            max_position_embeddings=64)
    params = llama.init_params(cfg, seed=5)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, cfg, params)
    return path, cfg, params


def test_gguf_roundtrip_unpermutes_qk(tiny_gguf):
    path, cfg, params = tiny_gguf
    cfg2, params2 = load_gguf(path)
    assert cfg2.rope_theta == 100000.0 and cfg2.num_key_value_heads == 2 and cfg2.tie_word_embeddings
    ids = jnp.asarray(np.arange(10)[None] % 40)
    a = llama.LlamaForCausalLM(cfg).apply({"params": params}, input_ids=ids)
    b = llama.LlamaForCausalLM(cfg2).apply({"params": params2}, input_ids=ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_tokenizer_alone_reads_no_tensor(tiny_gguf, monkeypatch):
    """The data owner's part of a model (cluster back end): the tokenizer, never a weight."""
    from tuning.assets.models import load_model, load_tokenizer

    path, _, _ = tiny_gguf
    ids = load_model(str(path)).tokenizer("t1t2t3", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: pytest.fail("a tensor was read"))
    tok = load_tokenizer(str(path))
    assert tok("t1t2t3", add_special_tokens=False)["input_ids"] == ids and len(ids) >= 3
    assert load_tokenizer("tiny-llama")("ab") == load_model("tiny-llama").tokenizer("ab")
    with pytest.raises(ValueError, match="unknown model"):
        load_tokenizer("no-such-model")


def test_truncated_and_corrupt_gguf_fail_in_one_line(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    data = path.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    for bad in (trunc, junk):
        with pytest.raises(CheckpointError) as e:
            read_gguf(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)


def _run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "tuning.cli", *argv], capture_output=True, text=True, timeout=300)


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("secptune: error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_errors_are_one_line(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(path.read_bytes()[:200])
    _one_line_error(_run_cli("generate", "--model", "no-such-model", "--prompt", "x"), "unknown model", "no-such-model")
    _one_line_error(_run_cli("generate", "--model", str(trunc), "--prompt", "x"), str(trunc))
    csv = tmp_path / "d.csv"
    csv.write_text("text,stars\ngood,positive\nbad,negative\n")
    _one_line_error(_run_cli("tasks", "--train", str(csv)), "label", "stars")
    csv.write_text("text,label\ngood,positive\nbad,negative\nmeh,neutral\n")
    _one_line_error(_run_cli("tasks", "--train", str(csv)), "neutral", "verbalizer")
    csv.write_text("text,label\n" + "".join(f"t{i},{'positive' if i % 3 else 'negative'}\n" for i in range(12)))
    _one_line_error(_run_cli("tasks", "--train", str(csv), "--shots", "8"), "k-shot 8 is larger than class")


def test_tiny_models_load_and_generate():
    from tuning.assets.generate import greedy

    b = load_model("tiny-llama")
    assert isinstance(b.tokenizer, ByteTokenizer)
    assert isinstance(greedy(b, "hello", 3), str)
    with pytest.raises(ValueError, match="decoder"):
        greedy(load_model("tiny-bert"), "hello", 3)


SMOL = secptune_home() / "models" / "smollm2-135m" / ".complete"


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.exists(), reason="SmolLM2 not prepared in $SECPTUNE_HOME; run `secptune prepare`")
def test_real_smollm2_says_paris():
    proc = _run_cli("generate", "--model", "smollm2-135m", "--prompt", "The capital of France is",
                    "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["continuation"].startswith(" Paris"), out


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.exists(), reason="SmolLM2 not prepared in $SECPTUNE_HOME; run `secptune prepare`")
def test_real_smollm2_tokenizer_and_config():
    b = load_model("smollm2-135m")
    tok = b.tokenizer
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert tok("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    assert tok("<|im_start|>user")["input_ids"][0] == 1  # special tokens are not split
    assert b.config.rope_theta == 100000.0 and b.config.num_hidden_layers == 30 and b.config.tie_word_embeddings
    from tuning.assets.models import load_tokenizer

    alone = load_tokenizer("smollm2-135m")  # what a cluster data owner loads: same ids, no weights
    assert alone("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    assert alone.pad_token_id == 2


def test_bench_tag_is_a_suffix_with_or_without_its_underscore():
    from bench.common import tag_suffix

    assert [tag_suffix(t) for t in ("", "x", "_x")] == ["", "_x", "_x"]
