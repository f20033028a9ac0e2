"""Checkpoint loading (GGUF, HF dirs), model names, and the CLI's one-line errors."""
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from spu_models import llama
from spu_models.loading import CheckpointError, load_gguf, read_gguf
from tuning.cache import secptune_home
from tuning.model_owner.models import ByteTokenizer, load_model

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
    from tuning.model_owner.models import load_model, load_tokenizer

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
    from tuning.model_owner.generate import greedy

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
    from tuning.model_owner.models import load_tokenizer

    alone = load_tokenizer("smollm2-135m")  # what a cluster data owner loads: same ids, no weights
    assert alone("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    assert alone.pad_token_id == 2


def test_bench_tag_is_a_suffix_with_or_without_its_underscore():
    from bench.common import tag_suffix

    assert [tag_suffix(t) for t in ("", "x", "_x")] == ["", "_x", "_x"]


# ----------------------------------------------------------- prepared directories in transformers
def _hf_dir_from(kind, tiny_gguf, tmp_path):
    """A directory as ``secptune prepare`` (a GGUF through convert_gguf) or convert-attention's
    writer (tiny-llama with its byte tokenizer, through write_hf_files) leaves it."""
    from tuning.model_owner.models import convert_gguf, write_hf_files

    out = tmp_path / kind
    if kind == "gguf":
        return convert_gguf(tiny_gguf[0], out)
    b = load_model("tiny-llama")
    out.mkdir()
    write_hf_files(out, b.config.to_hf(), {k: np.ascontiguousarray(v, np.float32)
                                           for k, v in llama.params_to_hf_state(b.params, b.config).items()}, b.tokenizer)
    return out


def _transformers_agrees(path, text, atol=1e-4):
    """transformers (PyTorch) loads model and tokenizer from ``path``; its tokens and logits are
    ours (tuning.model_owner.models.load_model, the Flax model); generate takes the tokenizer's output as is."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    ours = load_model(str(path))
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = ours.tokenizer(text, add_special_tokens=False)["input_ids"]
    enc = tok(text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ids and set(enc) == {"input_ids", "attention_mask"}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        want = model(**enc).logits.numpy()
    got = np.asarray(llama.LlamaForCausalLM(ours.config).apply({"params": ours.params}, input_ids=jnp.asarray([ids])))
    assert np.abs(got - want).max() < atol, np.abs(got - want).max()
    out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert model.generation_config.eos_token_id == ours.tokenizer.eos_token_id
    return tok, out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["gguf", "tiny-llama"])
def test_prepared_tiny_dirs_load_in_transformers(kind, tiny_gguf, tmp_path):
    from spu_models.loading import safetensors_metadata

    path = _hf_dir_from(kind, tiny_gguf, tmp_path)
    assert safetensors_metadata(path / "model.safetensors") == {"format": "pt"}
    tok, _ = _transformers_agrees(path, "t1t2t3t4" if kind == "gguf" else "héllo, wörld ☃")
    if kind == "tiny-llama":  # AutoTokenizer reads the byte tokenizer's HF files: same ids, every byte
        text = bytes(range(256)).decode("latin-1")
        assert tok(text)["input_ids"] == ByteTokenizer().encode(text)
        assert tok.decode(tok("héllo ☃")["input_ids"]) == "héllo ☃"
        assert isinstance(load_model(str(path)).tokenizer, ByteTokenizer)  # ours still reads the marker


def test_converted_dir_base_weights_load_in_transformers(tmp_path):
    """convert-attention's directory: transformers loads the base (softmax) model from it."""
    import json

    from spu_models.loading import FEATURE_MAPS_FILE, safetensors_metadata
    from spu_models.rfa import init_learned
    from tuning.model_owner.convert import ConvertConfig, _write

    b = load_model("tiny-llama")
    c = b.config
    partial = tmp_path / "tiny-rfa.partial"
    partial.mkdir()
    for i in range(c.num_hidden_layers):
        W = init_learned(c.head_dim, c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, 8, layer=i)
        np.savez(partial / f"layer{i}.npz", **W, metrics=json.dumps({"val_kl": 0.1, "val_rel_err": 0.2}))
    out = tmp_path / "tiny-rfa"
    _write(b, ConvertConfig(model="tiny-llama", features=8), partial, out, 0.0)
    assert load_model(str(out)).config.feature_maps == 8
    for f in ("model.safetensors", FEATURE_MAPS_FILE):
        assert safetensors_metadata(out / f) == {"format": "pt"}
    _transformers_agrees(out, "the match ended")


def _as_an_older_version_wrote_it(path):
    """Undo what write_hf_files adds: no safetensors metadata, no generation_config.json,
    tokenizers without model_input_names (the byte tokenizer: its marker only)."""
    from safetensors.numpy import load_file, save_file

    for f in path.glob("*.safetensors"):
        save_file(load_file(str(f)), str(f))
    (path / "generation_config.json").unlink()
    if (path / ByteTokenizer.MARKER).exists():
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (path / f).unlink()
    else:
        import json

        d = json.loads((path / "tokenizer_config.json").read_text())
        del d["model_input_names"]
        (path / "tokenizer_config.json").write_text(json.dumps(d))
    (path / ".complete").write_text("ok\n")


def test_prepare_upgrades_older_dirs_in_place_and_a_kill_loses_nothing(tiny_gguf, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from spu_models.loading import safetensors_metadata
    from tuning.model_owner import models

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    smol = _hf_dir_from("gguf", tiny_gguf, home / "models")
    smol = smol.rename(home / "models" / "smollm2-135m")
    conv = _hf_dir_from("tiny-llama", tiny_gguf, home / "models").rename(home / "models" / "tiny-llama-rfa")
    for d in (smol, conv):
        _as_an_older_version_wrote_it(d)
    before = load_file(str(smol / "model.safetensors"))
    monkeypatch.setattr(models, "pip_download", lambda *a: pytest.fail("prepare downloaded again"))

    real_replace = models.os.replace

    def killed(src, dst):
        raise KeyboardInterrupt  # a kill at the rename of the first rewritten file
    monkeypatch.setattr(models.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        models.prepare_smollm2(home)
    monkeypatch.setattr(models.os, "replace", real_replace)
    assert safetensors_metadata(smol / "model.safetensors") == {}  # the old file, whole
    load_model(str(smol))

    assert models.prepare_smollm2(home) == smol
    assert models.upgrade_hf_dir(smol) == [] and models.upgrade_hf_dir(conv) == []  # nothing left to do
    assert not list((home / "models").glob("*.tmp")) and not list(smol.glob("*.tmp"))
    after = load_file(str(smol / "model.safetensors"))
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)
    _transformers_agrees(smol, "t1t2t3t4")
    _transformers_agrees(conv, "héllo")


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.exists(), reason="SmolLM2 not prepared in $SECPTUNE_HOME; run `secptune prepare`")
def test_real_smollm2_dir_loads_in_transformers_with_our_logits():
    from spu_models.loading import safetensors_metadata

    path = SMOL.parent
    assert safetensors_metadata(path / "model.safetensors").get("format") == "pt", \
        f"{path} was prepared by an older version: run `secptune prepare` (it upgrades the directory in place)"
    tok, new = _transformers_agrees(path, "The capital of France is", atol=1e-3)
    assert tok.decode(new).startswith(" Paris")
