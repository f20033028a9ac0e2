"""Prefix-state caching: prefill once, extend per candidate == one full causal forward."""
import jax.numpy as jnp
import numpy as np
import pytest

from spu_models import llama
from spu_models.config import Execution
from spu_models.rfa import RFAConfig


@pytest.mark.parametrize("window", [None, 0, 3, 9])  # softmax; learned linear; sliding-window hybrids
def test_extend_from_cache_equals_full_forward(window):
    maps = {} if window is None else dict(feature_maps=8, feature_window=window)
    ex = Execution() if window is None else Execution(
        attention="rfa", rfa=RFAConfig(kind="learned", features=8, window=window, stabilizer="mean", chunk=4))
    cfg = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0, **maps)
    params = llama.init_params(cfg, seed=1, execution=ex)
    m = llama.LlamaForCausalLM(cfg, ex)
    rng = np.random.default_rng(0)
    E, P, Lp, T, Hd = 3, 2, 7, 4, cfg.hidden_size
    lens = [7, 4, 1]  # ragged prefixes, left-padded
    prefix = rng.normal(size=(E, Lp, Hd)).astype(np.float32)
    mask = np.zeros((E, Lp), np.float32)
    for e, n in enumerate(lens):
        mask[e, Lp - n:] = 1
        prefix[e, : Lp - n] = 123.0  # junk in the pad slots must not matter
    suffix = rng.normal(size=(P, E, T, Hd)).astype(np.float32)
    shift = None
    if llama.position_sensitive(cfg, ex):  # linear attention sees absolute positions: texts start at 0
        assert window is not None
        shift = llama.rope_tables(jnp.asarray([[n - Lp] for n in lens]), cfg.head_dim, cfg.rope_theta)
    cache = m.apply({"params": params}, jnp.asarray(prefix), jnp.asarray(mask), shift, method=m.prefill)
    got = np.asarray(m.apply({"params": params}, jnp.asarray(suffix), cache, jnp.asarray(mask), shift,
                             method=m.extend))
    for p in range(P):
        for e, n in enumerate(lens):
            seq = np.concatenate([prefix[e, Lp - n:], suffix[p, e]])[None]
            want = np.asarray(m.apply({"params": params}, inputs_embeds=jnp.asarray(seq), method=m.hidden))[0, n:]
            np.testing.assert_allclose(got[p, e], want, atol=2e-5)
