"""Our LLaMA-family decoder against transformers' reference implementation, same weights."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from spu_models import llama
from spu_models.loading import load_hf_dir


def _hf_model(tmp_path, tie=True, theta=100000.0, kv=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=kv, rope_theta=theta,
                                   tie_word_embeddings=tie, max_position_embeddings=64)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a mis-mapped norm weight shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(tmp_path, safe_serialization=True)
    return m


@pytest.mark.parametrize("tie,theta,kv", [(True, 100000.0, 2), (False, 10000.0, 6), (True, 5e5, 1)])
def test_logits_match_transformers(tmp_path, tie, theta, kv):
    ref = _hf_model(tmp_path, tie, theta, kv)
    cfg, params = load_hf_dir(tmp_path)
    assert cfg.rope_theta == theta and cfg.tie_word_embeddings == tie
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    with torch.no_grad():
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(pos)).logits.numpy()
    got = np.asarray(llama.LlamaForCausalLM(cfg).apply({"params": params}, input_ids=jnp.asarray(ids),
                                                       attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() < 1e-4


def test_inputs_embeds_and_head_rows(tmp_path):
    _hf_model(tmp_path)
    cfg, params = load_hf_dir(tmp_path)
    model = llama.LlamaForCausalLM(cfg)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 97, size=(2, 7)))
    full = model.apply({"params": params}, input_ids=ids)
    emb = model.apply({"params": params}, ids, method=model.embed)
    h = model.apply({"params": params}, inputs_embeds=emb, method=model.hidden)
    rows = [5, 17, 3]
    part = model.apply({"params": params}, h, rows, method=model.head_rows)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full)[..., rows], atol=1e-5)


def test_matches_hf_flax_reference_at_theta_10000():
    """transformers' FlaxLlama (RoPE base fixed at 10000) with our params passed unchanged."""
    from transformers import FlaxLlamaForCausalLM
    from transformers import LlamaConfig as HFConfig

    hf = HFConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)
    cfg = llama.LlamaConfig.from_hf(hf.to_dict())
    params = llama.init_params(cfg, seed=3)
    ref = FlaxLlamaForCausalLM(hf, _do_init=False)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 50, size=(2, 9)))
    want = ref(ids, params=params).logits
    got = llama.LlamaForCausalLM(cfg).apply({"params": params}, input_ids=ids)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() < 1e-4


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        llama.LlamaConfig(num_attention_heads=9, num_key_value_heads=2)
    with pytest.raises(ValueError, match="rope_scaling"):
        llama.LlamaConfig.from_hf({"model_type": "llama", "rope_scaling": {"type": "linear"}})
