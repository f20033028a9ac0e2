"""Prefix-state caching: prefill once, extend per candidate == one full causal forward."""
import jax.numpy as jnp
import numpy as np
import pytest

from spu_models import llama
from spu_models.config import Execution
from spu_models.rfa import RFAConfig

TINY4 = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2)


def _left_padded(rng, lens, Lp, H):
    """Texts [E, Lp, H] left-padded to Lp, junk in the pad slots (it must not matter), and their mask."""
    text = rng.normal(size=(len(lens), Lp, H)).astype(np.float32)
    mask = np.zeros((len(lens), Lp), np.float32)
    for e, l in enumerate(lens):
        mask[e, Lp - l:] = 1
        text[e, : Lp - l] = 55.0
    return text, mask


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


def _deep_reference(m, params, cfg, text, p0, tail, delta, scale, K, form):
    """What a deep prompt means, computed the long way: one example (unpadded), the hard prompt P0
    as tokens, and the candidate's offsets inserted where the prompt enters the top K layers
    (``kv``: added to the prompt's keys (before RoPE) and values in each top layer, with the
    prompt's own states left as P0 made them; ``hidden``: added to its hidden states entering
    layer L-K), then the whole model. Returns the last position's final hidden state."""
    L, n, l = cfg.num_hidden_layers, len(p0), len(text)
    top = range(L - K, L)
    if form == "kv":
        cache = list(m.apply({"params": params}, jnp.asarray(np.concatenate([text, p0]))[None], jnp.ones((1, l + n)),
                             method=m.prefill))
        cos, sin = llama.rope_tables(jnp.arange(l, l + n)[None], cfg.head_dim, cfg.rope_theta)
        for j, i in enumerate(top):
            k, v = cache[i]
            dk = llama.apply_rope((delta[j, 0] * scale[j, 0][None])[None], cos, sin)[0]
            cache[i] = (k.at[0, l:].add(dk), v.at[0, l:].add(delta[j, 1] * scale[j, 1][None]))
        return m.apply({"params": params}, jnp.asarray(tail)[None, None], cache, jnp.ones((1, l + n)),
                       method=m.extend)[0, 0, -1]
    seq = jnp.asarray(np.concatenate([text, p0, tail]))[None]
    cos, sin, msk = llama.layer_inputs(cfg, jnp.ones((1, seq.shape[1])))
    stack, lp = llama.LayerStack(cfg), {"params": params["model"]["layers"]}
    x, _ = stack.apply(lp, seq, cos, sin, msk, layers=range(L - K))
    x, _ = stack.apply(lp, x.at[0, l:l + n].add(delta * scale), cos, sin, msk, layers=top)
    return m.apply({"params": params}, x, method=m.final_norm)[0, -1]


@pytest.mark.parametrize("form", ["kv", "hidden"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_deep_prompt_equals_a_full_forward_with_the_inserted_prompt(form, K):
    """prefill_deep once + score_deep per candidate (top K layers only, last layer for the last
    token only) == the full forward with the prompt inserted at its depth, for left-padded texts
    of several lengths; at delta = 0 it is the hard prompt P0; the zero-shot logits come too."""
    from spu_models.forward import make_tuning_programs

    cfg = TINY4
    params = llama.init_params(cfg, seed=1)
    m = llama.LlamaForCausalLM(cfg)
    rng = np.random.default_rng(0)
    Lp, n, t, H, P = 6, 2, 3, 32, 2
    lens = [6, 3, 1]
    text, mask = _left_padded(rng, lens, Lp, H)
    p0, tail = rng.normal(size=(n, H)).astype(np.float32), rng.normal(size=(t, H)).astype(np.float32)
    head = rng.normal(size=(2, H)).astype(np.float32)
    pr = make_tuning_programs(cfg, depth=K, form=form)
    res = pr["prefill_deep"](params, text, mask, tail, p0, head)
    scale = pr["deep_scale"](params, p0, text_mask=mask, **res)["deep_scale"]
    shape = (P, K, 2, n, 2, 8) if form == "kv" else (P, n, H)
    delta = rng.normal(size=shape).astype(np.float32)
    deep = {k: v for k, v in res.items() if k != "zs_logits"}
    got = np.asarray(pr["score_deep"](params, head, mask, delta=delta, deep_scale=scale, **deep)["logits"])
    got0 = np.asarray(pr["score_deep"](params, head, mask, delta=0 * delta, deep_scale=scale, **deep)["logits"])
    for e, l in enumerate(lens):
        x = text[e, Lp - l:]
        for p in range(P):
            want = _deep_reference(m, params, cfg, x, p0, tail, delta[p], scale, K, form) @ head.T
            np.testing.assert_allclose(got[p, e], np.asarray(want), atol=5e-5)
        hard = m.apply({"params": params}, inputs_embeds=jnp.asarray(np.concatenate([x, p0, tail]))[None],
                       method=m.hidden)[0, -1] @ head.T
        np.testing.assert_allclose(got0[0, e], np.asarray(hard), atol=5e-5)
        zs = m.apply({"params": params}, inputs_embeds=jnp.asarray(np.concatenate([x, tail]))[None],
                     method=m.hidden)[0, -1] @ head.T
        np.testing.assert_allclose(np.asarray(res["zs_logits"])[0, e], np.asarray(zs), atol=5e-5)


def test_deep_scoring_under_spu_reuses_the_cache_and_matches_plaintext(tmp_path):
    """A deep kv prompt on tiny-llama through the scorer: plaintext and the SPU simulator agree;
    the prefill runs once per chunk, and every later score of any candidates reads the resident
    cache (one call per chunk, no prefill), also after other sets were shared."""
    from tuning.model_owner.models import load_model, with_policy
    from tuning.data_owner.tasks import load_user_task
    from tuning.transports import make_backend
    from tuning.data_owner.scorer import SecureScorer, delta_shape
    from tuning.policy import load_policy

    csv = tmp_path / "toy.csv"
    csv.write_text("text,label\n" + "".join(f"{w} {i},{l}\n" for i in range(4) for w, l in
                                           (("good fun", "positive"), ("a dull and slow film", "negative"))))
    task = load_user_task(csv, verbalizer="positive=g,negative=b")
    pol = load_policy("aby3")
    bundle = with_policy(load_model("tiny-llama"), pol)
    delta = 0.5 * np.random.default_rng(0).normal(size=(3, *delta_shape(bundle.config, 2, 1, "kv")))
    got, keys = {}, {}
    for backend in ("plaintext", "sim"):
        with make_backend(backend, bundle, pol) as s:
            sc = SecureScorer(s, bundle, task, n_tokens=2, p0_ids=[40, 50], depth=1, form="kv")
            sc.add_examples("ex", task.train, zero_shot=True)
            n0 = len(s.costs)
            got[backend] = [sc.score("ex", delta), sc.score("ex", delta[:1]), sc.score("ex", None)]
            keys[backend] = [(r.program.name, dict(r.args).keys() >= {"head"}) for r in s._programs]
            assert len(s.costs) - n0 == 2  # two scores, one call each (zero-shot: from the prefill)
    assert keys["sim"].count(("prefill_deep", True)) == 1 and ("score_deep", True) in keys["sim"]
    for g, r in zip(got["sim"], got["plaintext"]):
        assert g.shape == r.shape and np.abs(g - r).max() < 2e-2


def test_virtual_deep_prompt_is_padding_invariant():
    """Form ``virtual``: below layer L-K the zero-shot forward, in the top K layers n key/value pairs
    that are the offsets alone. A left-padded batch scores each text as it scores alone (the
    prefix's keys stand at the same place relative to the tail whatever the padding)."""
    from spu_models.forward import make_tuning_programs

    cfg = TINY4
    params = llama.init_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    Lp, t, H, n, K = 6, 3, 32, 2, 2
    lens = [6, 3, 1]
    text, mask = _left_padded(rng, lens, Lp, H)
    tail, head = rng.normal(size=(t, H)).astype(np.float32), rng.normal(size=(2, H)).astype(np.float32)
    pr = make_tuning_programs(cfg, depth=K, form="virtual")
    res = pr["prefill_deep"](params, text, mask, tail, head=head)
    scale = pr["deep_scale"](params, text_mask=mask, **res)["deep_scale"]
    assert scale.shape == (K, 2, 2, 8) and np.all(np.asarray(scale) > 0)
    delta = rng.normal(size=(2, K, 2, n, 2, 8)).astype(np.float32)
    deep = {k: v for k, v in res.items() if k != "zs_logits"}
    got = np.asarray(pr["score_deep"](params, head, mask, delta=delta, deep_scale=scale, **deep)["logits"])
    zero = np.asarray(pr["score_deep"](params, head, mask, delta=0 * delta, deep_scale=scale, **deep)["logits"])
    for e, l in enumerate(lens):  # the same text alone, unpadded, with the same scale
        one = pr["prefill_deep"](params, text[e:e + 1, Lp - l:], mask[e:e + 1, Lp - l:], tail, head=head)
        alone = {k: v for k, v in one.items() if k != "zs_logits"}
        want = np.asarray(pr["score_deep"](params, head, mask[e:e + 1, Lp - l:], delta=delta, deep_scale=scale,
                                           **alone)["logits"])
        np.testing.assert_allclose(got[:, e], want[:, 0], atol=5e-5)
        np.testing.assert_allclose(np.asarray(res["zs_logits"])[0, e], np.asarray(one["zs_logits"])[0, 0], atol=5e-5)
    np.testing.assert_array_equal(zero[0], zero[1])  # delta = 0: the same (zero) prefix for every candidate


@pytest.mark.parametrize("form", ["virtual", "kv"])
def test_deep_scale_is_padding_invariant(form):
    """The per-channel scale of a deep prompt's offsets does not depend on how far the texts were
    left-padded (the plaintext back end pads to multiples of 32, SPU's to 16, and a chunk pads to
    its longest text). Offsets are taken before RoPE and so is the keys' spread; measured on the
    rotated cache it moved by up to 19% per channel on SmolLM2 between pads of 32 and 16."""
    from spu_models.forward import make_tuning_programs

    cfg = TINY4
    params = llama.init_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    E, Lp, n, t, H, K = 3, 7, 2, 3, 32, 2
    lens = [7, 4, 2]
    text, mask = _left_padded(rng, lens, Lp, H)
    p0, tail = rng.normal(size=(n, H)).astype(np.float32), rng.normal(size=(t, H)).astype(np.float32)
    pr = make_tuning_programs(cfg, depth=K, form=form)
    scales = []
    for extra in (0, 9):  # the same texts, 9 more pad slots in front
        tx = np.concatenate([np.full((E, extra, H), 55.0, np.float32), text], 1)
        mk = np.concatenate([np.zeros((E, extra), np.float32), mask], 1)
        res = pr["prefill_deep"](params, tx, mk, tail, None if form == "virtual" else p0)
        scales.append(np.asarray(pr["deep_scale"](params, p0, text_mask=mk, **res)["deep_scale"]))
    assert scales[0].shape == (K, 2, 2, 8)
    np.testing.assert_allclose(scales[0], scales[1], rtol=1e-4)


def test_virtual_deep_scale_is_precise_under_spu():
    """The virtual prompt's per-channel scale is computed once inside MPC (ABY3, FM64, 18 fraction
    bits) over every real text position of the example set: within 0.1% of float64 also for
    channels whose spread is small next to their mean. Weighting each position by mask / n first
    (each weight rounded to 2^-18) was off by up to ~1%; an error the prompt's offsets carry into
    every logit, growing with |z|."""
    import spu.utils.simulation as spsim

    from spu_models.forward import make_tuning_programs
    from tuning.policy import load_policy

    cfg = llama.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)
    K, E, L, KV, D = 2, 8, 80, 2, 16
    pr = make_tuning_programs(cfg, depth=K, form="virtual")
    rng = np.random.default_rng(0)
    mask = (np.arange(L)[None] < rng.integers(40, L, E)[:, None]).astype(np.float32)
    caches = {}
    for i in range(cfg.num_hidden_layers - K, cfg.num_hidden_layers):
        for kv in "kv":
            spread, centre = np.exp(rng.normal(0, 1.2, (KV, D))), rng.normal(0, 2, (KV, D))
            caches[f"cache_{kv}{i}"] = (rng.normal(size=(E, L, KV, D)) * spread + centre).astype(np.float32)
    std = lambda x: np.sqrt(x[mask > 0].astype(np.float64).var(0) + 1e-6)  # noqa: E731  over real positions
    cos, sin = (np.asarray(t, np.float64) for t in llama.rope_tables(np.arange(L)[None], D, cfg.rope_theta))
    unrot = lambda k: llama.apply_rope(k.astype(np.float64), cos, -sin)  # noqa: E731  keys: before RoPE
    want = np.stack([np.stack([std(np.asarray(unrot(caches[f"cache_k{i}"]))), std(caches[f"cache_v{i}"])])
                     for i in range(cfg.num_hidden_layers - K, cfg.num_hidden_layers)])
    sim = spsim.Simulator(3, load_policy("aby3-fast").runtime_config(profile=False))
    scale = lambda m, c: pr["deep_scale"](None, text_mask=m, **c)["deep_scale"]  # noqa: E731
    got = np.asarray(spsim.sim_jax(sim, scale)(mask, caches))
    assert got.shape == want.shape == (K, 2, KV, D)
    assert np.abs(got / want - 1).max() < 1e-3, np.abs(got / want - 1).max()
