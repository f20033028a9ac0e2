"""BERT / RoBERTa MLM parity: spu_models.bert vs transformers' PyTorch and Flax implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from spu_models import bert  # noqa: E402
from spu_models.loading import load_hf_dir, read_safetensors_dir  # noqa: E402

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
TOL = 1e-4
L, PAD = 10, ((0, 0), (0, 3), (0, 6), (2, 1))  # length; (left, right) padding per row: mostly right
B = len(PAD)


@pytest.fixture(scope="module", params=["bert", "roberta"])
def setup(request, tmp_path_factory):
    """A random torch MLM (every weight perturbed, so biases and norms are non-trivial), saved and reloaded."""
    kind = request.param
    torch.manual_seed(0)
    if kind == "bert":
        tm = transformers.BertForMaskedLM(transformers.BertConfig(**TINY))
    else:
        tm = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**TINY))
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tm.eval()
    path = tmp_path_factory.mktemp(kind)
    tm.save_pretrained(path, safe_serialization=True)
    cfg, params = load_hf_dir(path)

    rng = np.random.default_rng(0)
    pad_id = tm.config.pad_token_id
    ids = rng.integers(3, TINY["vocab_size"], size=(B, L))  # 0..2 are pad/bos/eos-like ids
    mask = np.ones((B, L), np.int64)
    for b, (left, right) in enumerate(PAD):
        mask[b, :left] = 0
        mask[b, L - right:] = 0
    ids = np.where(mask == 1, ids, pad_id)
    types = rng.integers(0, 2, size=(B, L)) * mask if kind == "bert" else np.zeros_like(ids)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return tm, path, cfg, params, inputs


def ours(cfg, params, method=None, **kw):
    kw = {k: jnp.asarray(v) for k, v in kw.items()}
    return np.asarray(bert.BertForMaskedLM(cfg).apply({"params": params}, method=method, **kw))


def jax_shapes(tree):
    return jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), tree)


def max_diff_real(a, b, mask):
    return float(np.abs(a - b)[mask == 1].max())


def test_config_and_layout(setup):
    tm, path, cfg, params, _ = setup
    assert cfg.model_type == tm.config.model_type and cfg.family == "bert"
    assert cfg.hidden_act == "gelu" and cfg.pad_token_id == tm.config.pad_token_id
    assert bert.BertConfig.from_hf(cfg.to_hf()) == cfg
    # same tree structure and shapes as a fresh init
    ref = bert.init_params(cfg)
    assert jax_shapes(ref) == jax_shapes(params)


def test_matches_torch(setup):
    tm, _, cfg, params, inputs = setup
    with torch.no_grad():
        ref = tm(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()
    got = ours(cfg, params, **inputs)
    assert got.shape == (B, L, TINY["vocab_size"])
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    assert max_diff_real(got, ref, inputs["attention_mask"]) <= TOL


def test_matches_flax_reference(setup):
    tm, _, cfg, params, inputs = setup
    flax_cls = transformers.FlaxBertForMaskedLM if cfg.model_type == "bert" else transformers.FlaxRobertaForMaskedLM
    fm = flax_cls(tm.config, _do_init=False)
    ref = np.asarray(fm(**inputs, params=params).logits)  # our tree is passed unchanged
    got = ours(cfg, params, **inputs)
    assert max_diff_real(got, ref, inputs["attention_mask"]) <= TOL


def test_inputs_embeds_path(setup):
    _, _, cfg, params, inputs = setup
    emb = ours(cfg, params, method="embed", input_ids=inputs["input_ids"])
    assert emb.shape == (B, L, TINY["hidden_size"])
    kw = dict(attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_type_ids"])
    a = ours(cfg, params, input_ids=inputs["input_ids"], **kw)
    b = ours(cfg, params, inputs_embeds=emb, **kw)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_head_rows(setup):
    _, _, cfg, params, inputs = setup
    full = ours(cfg, params, **inputs)
    h = ours(cfg, params, method="hidden", **inputs)
    rows = np.array([5, 17, 42, 99, 5])
    part = ours(cfg, params, method="head_rows", hidden=h, row_ids=rows)
    np.testing.assert_allclose(part, full[..., rows], atol=1e-5)


def test_hf_state_roundtrip(setup):
    _, path, cfg, params, _ = setup
    state = read_safetensors_dir(path)
    back = bert.params_to_hf_state(params, cfg)
    assert set(back) == set(state)
    for k, v in back.items():
        np.testing.assert_array_equal(np.asarray(v), state[k], err_msg=k)
    prefix = cfg.model_type
    missing = f"{prefix}.encoder.layer.1.attention.self.key.weight"
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        bert.params_from_hf_state({k: v for k, v in state.items() if k != missing}, cfg)
    # old-style LayerNorm gamma/beta names are accepted
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    again = bert.params_from_hf_state(old, cfg)
    assert jax_shapes(again) == jax_shapes(params)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        bert.BertConfig(hidden_size=65)
    with pytest.raises(ValueError, match="model_type"):
        bert.BertConfig(model_type="electra")
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
