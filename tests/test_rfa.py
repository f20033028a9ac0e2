"""Random feature attention: estimator accuracy, chunking/caching exactness, SPU agreement, policy."""

import jax.numpy as jnp
import numpy as np
import pytest

from spu_models import llama
from spu_models.config import Execution
from spu_models.rfa import (
    RFAConfig,
    frequencies,
    rfa_attention,
    sincos_double,
    softmax_reference,
)


def _qkv(L, scale=0.3, lead=(2,), H=4, KV=2, D=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(*lead, L, H, D)).astype(np.float32) * scale
    k = rng.normal(size=(*lead, L, KV, D)).astype(np.float32) * scale
    v = rng.normal(size=(*lead, L, KV, D)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("kind,stabilizer", [("positive", "max"), ("trig", "max"), ("positive", "mean")])
@pytest.mark.parametrize("causal", [True, False])
def test_estimate_approaches_softmax_as_features_grow(kind, stabilizer, causal):
    q, k, v = _qkv(48)
    mask = np.ones((2, 48), np.float32)
    mask[1, :6] = 0  # left padding in the second sequence
    ref = np.asarray(softmax_reference(q, k, v, mask, causal))[:, 6:]
    errs = []
    for m in (8, 64, 512):
        cfg = RFAConfig(features=m, kind=kind, chunk=16, stabilizer=stabilizer)
        out = rfa_attention(q, k, v, mask, frequencies(16, 2, m, 0, 0), cfg, jnp.exp, causal=causal)
        errs.append(float(np.abs(np.asarray(out)[:, 6:] - ref).mean()))
    assert errs[-1] < errs[0] and errs[-1] < 0.02, errs


def test_offered_maps_stay_bounded_at_real_scales_and_trig_is_refused():
    """Random q, k at scales 0.3-2 (SmolLM2's own q, k: RMS 1.2-2.8) at SmolLM2's attention shapes:
    the positive map's weights are positive, so every output is a convex combination of its keys'
    values and 0 (the eps floor shrinks rows whose weights underflow): inside their per-coordinate
    range widened to 0, never exploding; its mean error stays below 1 (v ~ N(0, 1)); it
    tracks softmax closely only at small scales (< 0.05 at 0.3 with 128 features). The trig map
    is accurate at scale 0.3 and explodes from 0.6 on: policies refuse it (tests/test_policy.py)."""
    import yaml

    from tuning.policy import POLICY_DIR, PolicyError, parse_policy

    H, KV, D, L = 9, 3, 64, 64
    errs = {}
    for scale in (0.3, 0.6, 1.0, 2.0):
        q, k, v = _qkv(L, scale=scale, H=H, KV=KV, D=D)
        ref = np.asarray(softmax_reference(q, k, v))
        vr = np.repeat(v, H // KV, axis=-2)
        lo = np.minimum(np.minimum.accumulate(vr, axis=1), 0.0)  # causal key ranges, widened to 0
        hi = np.maximum(np.maximum.accumulate(vr, axis=1), 0.0)
        for kind in ("positive", "trig"):
            for m in (8, 128):
                cfg = RFAConfig(features=m, kind=kind, chunk=32, sincos="exact")
                out = np.asarray(rfa_attention(q, k, v, None, frequencies(D, KV, m, 0, 0), cfg, jnp.exp))
                errs[kind, scale, m] = float(np.abs(out - ref).mean())
                if kind == "positive":
                    assert (out >= lo - 1e-4).all() and (out <= hi + 1e-4).all(), (scale, m)
                    assert errs[kind, scale, m] < 1.0, (scale, m, errs[kind, scale, m])
    assert errs["positive", 0.3, 128] < 0.05 and errs["trig", 0.3, 8] < 0.06 and errs["trig", 0.3, 128] < 0.01
    assert min(errs["trig", s, m] for s in (0.6, 1.0, 2.0) for m in (8, 128)) > 10.0, errs  # why it is refused
    d = yaml.safe_load((POLICY_DIR / "aby3-rfa.yaml").read_text())
    d["attention"] = {**d["attention"], "feature_map": "trig"}
    with pytest.raises(PolicyError, match="attention.feature_map trig is refused"):
        parse_policy(d, "x.yaml")


def test_chunked_causal_form_is_exact():
    """Chunks change only the order of the sums: chunk 5 (ragged), 16 and one chunk agree."""
    q, k, v = _qkv(37)
    W = frequencies(16, 2, 32, 0, 3)
    outs = [np.asarray(rfa_attention(q, k, v, None, W, RFAConfig(features=32, kind="trig", chunk=c), jnp.exp))
            for c in (5, 16, 37)]
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
    np.testing.assert_allclose(outs[1], outs[2], atol=1e-5)
    # and causality: changing the future does not change the past
    k2 = k.copy()
    k2[:, 30:] += 1.0
    out2 = np.asarray(rfa_attention(q, k2, v, None, W, RFAConfig(features=32, kind="trig", chunk=5), jnp.exp))
    np.testing.assert_allclose(out2[:, :30], outs[0][:, :30], atol=1e-5)


@pytest.mark.parametrize("kind,stabilizer", [("positive", "max"), ("trig", "max"), ("positive", "mean")])
def test_prefix_state_equals_full_sequence(kind, stabilizer):
    """Candidates continuing a cached prefix == the same queries in one full causal pass."""
    E, P, Lp, T = 2, 3, 12, 5
    pq, pk, pv = _qkv(Lp, lead=(E,), seed=1)
    q, k, v = _qkv(T, lead=(P, E), seed=2)
    pmask = np.ones((E, Lp), np.float32)
    pmask[0, :4] = 0
    cfg = RFAConfig(features=32, kind=kind, chunk=4, stabilizer=stabilizer)
    W = frequencies(16, 2, 32, 0, 0)
    got = np.asarray(rfa_attention(q, k, v, None, W, cfg, jnp.exp, past=(pk, pv, pmask)))
    for p in range(P):
        full = [np.concatenate([a, b[p]], axis=1) for a, b in ((pq, q), (pk, k), (pv, v))]
        mask = np.concatenate([pmask, np.ones((E, T), np.float32)], axis=1)
        want = np.asarray(rfa_attention(*full, mask, W, cfg, jnp.exp))[:, Lp:]
        np.testing.assert_allclose(got[p], want, atol=2e-5)


def test_sincos_double_accuracy():
    t = np.linspace(-32, 32, 20001).astype(np.float32)
    c, s = sincos_double(t, 32.0)
    assert np.abs(c - np.cos(t)).max() < 1e-4 and np.abs(s - np.sin(t)).max() < 1e-4


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        RFAConfig(kind="cosine")
    with pytest.raises(ValueError, match="softmax_layers"):
        Execution(attention="rfa", softmax_layers=(2,)).check(llama.LlamaConfig(num_hidden_layers=2))
    with pytest.raises(ValueError, match="attention kind"):
        Execution(attention="linear")


def _aby3_sim():
    """SPU's 3-party ABY3 simulator at FM64 with 18 fraction bits (SPU's default) and Pade exp."""
    import spu.spu_pb2 as pb
    import spu.utils.simulation as spsim

    return spsim.Simulator(3, pb.RuntimeConfig(protocol=pb.ProtocolKind.ABY3, field=pb.FieldType.FM64,
                                               fxp_fraction_bits=18,
                                               fxp_exp_mode=pb.RuntimeConfig.ExpMode.EXP_PADE))


def test_rfa_attention_under_spu_matches_plaintext():
    import spu.utils.simulation as spsim

    sim = _aby3_sim()
    q, k, v = _qkv(20, lead=(1,))
    mask = np.ones((1, 20), np.float32)
    mask[0, :3] = 0
    W = frequencies(16, 2, 16, 0, 0)
    for kind, sincos in (("positive", "exact"), ("trig", "double"), ("trig", "exact")):
        cfg = RFAConfig(features=16, kind=kind, sincos=sincos, chunk=8)
        f = lambda q, k, v, m: rfa_attention(q, k, v, m, W, cfg, jnp.exp)  # noqa: E731
        want = np.asarray(f(q, k, v, mask))[:, 3:]
        got = spsim.sim_jax(sim, f)(q, k, v, mask)[:, 3:]
        assert np.abs(got - want).max() < 2e-3, (kind, sincos, np.abs(got - want).max())


TINY = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)


def _tiny_rfa(softmax_layers=()):
    return Execution(attention="rfa", rfa=RFAConfig(features=16, kind="positive", chunk=4),
                     softmax_layers=softmax_layers)


@pytest.mark.parametrize("softmax_layers", [(), (0,)])
def test_llama_rfa_prefill_extend_equals_full_forward(softmax_layers):
    """The cached placement with RFA (and a hybrid) == a full forward over the same positions."""
    cfg = TINY
    params = llama.init_params(cfg, seed=1)
    m = llama.LlamaForCausalLM(cfg, _tiny_rfa(softmax_layers))
    rng = np.random.default_rng(0)
    E, P, Lp, T = 2, 2, 7, 3
    prefix = rng.normal(size=(E, Lp, 32)).astype(np.float32)
    mask = np.ones((E, Lp), np.float32)
    mask[1, :3] = 0
    suffix = rng.normal(size=(P, E, T, 32)).astype(np.float32)
    cache = m.apply({"params": params}, jnp.asarray(prefix), jnp.asarray(mask), method=m.prefill)
    got = np.asarray(m.apply({"params": params}, jnp.asarray(suffix), cache, jnp.asarray(mask), method=m.extend))
    for p in range(P):
        seq = np.concatenate([prefix, suffix[p]], axis=1)
        am = np.concatenate([mask, np.ones((E, T), np.float32)], axis=1)
        pos = np.broadcast_to(np.arange(Lp + T), (E, Lp + T))
        want = np.asarray(m.apply({"params": params}, inputs_embeds=jnp.asarray(seq), attention_mask=jnp.asarray(am),
                                  position_ids=jnp.asarray(pos), method=m.hidden))[:, Lp:]
        np.testing.assert_allclose(got[p], want, atol=5e-5)


def test_hybrid_layers_change_only_rfa_layers():
    """softmax_layers=all layers is exactly the softmax model; the RFA model differs from it."""
    soft = Execution()
    params = llama.init_params(TINY, seed=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 9)))
    run = lambda ex: np.asarray(llama.LlamaForCausalLM(TINY, ex).apply({"params": params}, input_ids=ids))  # noqa: E731
    np.testing.assert_allclose(run(_tiny_rfa(softmax_layers=(0, 1, 2))), run(soft), atol=1e-6)
    assert np.abs(run(_tiny_rfa()) - run(soft)).max() > 1e-4


def test_rfa_policy_reaches_the_model_and_runs_under_spu():
    from tuning.data_owner.encode import make_batch
    from tuning.model_owner.models import load_model, with_policy
    from tuning.transports import make_backend
    from tuning.policy import PolicyError, load_policy, parse_policy

    pol = load_policy("aby3-rfa")
    assert pol.execution.attention == "rfa" and pol.execution.rfa.kind == "positive"
    bundle = with_policy(load_model("tiny-llama"), pol)
    assert bundle.execution == pol.execution
    batch = make_batch(bundle, ["hello there my friend", "a b"], [" a", " b"], pol.embedding)
    plain = make_backend("plaintext", bundle, pol).forward(batch)
    sim = make_backend("sim", bundle, pol).forward(batch)
    assert np.abs(plain - sim).max() < 1e-2
    import yaml
    d = yaml.safe_load(open(pol.source))
    d["attention"] = {"kind": "rfa", "features": 16, "colour": "red"}
    with pytest.raises(PolicyError, match="attention.colour"):
        parse_policy(d, "x.yaml")
    d["attention"] = {"kind": "rfa", "feature_map": "cosine"}
    with pytest.raises(PolicyError, match="kind"):
        parse_policy(d, "x.yaml")
    # the encoder takes the bidirectional form, also under SPU
    bert = with_policy(load_model("tiny-bert"), pol)
    assert bert.execution.attention == "rfa"
    batch = make_batch(bert, ["hello there my friend", "a b"], [" a", " b"], pol.embedding)
    plain = make_backend("plaintext", bert, pol).forward(batch)
    sim = make_backend("sim", bert, pol).forward(batch)
    assert np.abs(plain - sim).max() < 1e-2


# ------------------------------------------------------------------ learned (Hedgehog-style) maps
def _learned(KV=2, G=2, D=16, m=24, seed=0):
    import jax

    from spu_models.rfa import init_learned

    W = init_learned(D, KV, G, m, seed=seed)
    rng = np.random.default_rng(seed)
    W = {k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32) for k, v in W.items()}  # not the init
    return jax.tree_util.tree_map(jnp.asarray, W)


@pytest.mark.parametrize("stabilizer,window", [("max", 0), ("mean", 0), ("max", 5), ("mean", 5), ("mean", 12)])
def test_learned_map_is_a_linear_attention_with_softmax_normalised_rows(stabilizer, window):
    """The chunked linear form == its explicit weight matrix (rows sum to 1, causal) times v;
    the prefix-state placement == one full pass. Also with a sliding window of exact attention,
    shorter and longer than the cached prefix."""
    from spu_models.rfa import attention_weights

    q, k, v = _qkv(21, scale=1.0)
    mask = np.ones((2, 21), np.float32)
    mask[1, :2] = 0
    cfg = RFAConfig(features=24, kind="learned", chunk=4, stabilizer=stabilizer, window=window)
    W = _learned()
    a = np.asarray(attention_weights(q, k, mask, W, cfg))
    np.testing.assert_allclose(a[:, :, 2:].sum(-1), 1.0, atol=1e-5)
    assert np.abs(np.triu(a, 1)).max() == 0 and np.abs(a[1, :, :, :2]).max() == 0
    want = np.einsum("bhts,bshd->bthd", a, np.repeat(v, 2, axis=-2))
    got = np.asarray(rfa_attention(q, k, v, mask, W, cfg, jnp.exp))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # prefix cache: P candidates continuing E cached prefixes
    E, P, Lp, T = 2, 3, 9, 4
    _, pk, pv = _qkv(Lp, lead=(E,), seed=1)
    q2, k2, v2 = _qkv(T, lead=(P, E), seed=2)
    pmask = np.ones((E, Lp), np.float32)
    pmask[0, :3] = 0
    got = np.asarray(rfa_attention(q2, k2, v2, None, W, cfg, jnp.exp, past=(pk, pv, pmask)))
    for p in range(P):
        qf = np.concatenate([np.zeros((E, Lp, 4, 16), np.float32), q2[p]], axis=1)
        full = [qf] + [np.concatenate([a_, b[p]], axis=1) for a_, b in ((pk, k2), (pv, v2))]
        m = np.concatenate([pmask, np.ones((E, T), np.float32)], axis=1)
        np.testing.assert_allclose(got[p], np.asarray(rfa_attention(*full, m, W, cfg, jnp.exp))[:, Lp:], atol=2e-5)


def test_window_covering_the_sequence_is_exact_softmax():
    from spu_models.rfa import softmax_reference

    q, k, v = _qkv(13, scale=1.0)
    cfg = RFAConfig(features=24, kind="learned", chunk=4, stabilizer="max", window=13)
    got = np.asarray(rfa_attention(q, k, v, None, _learned(), cfg, jnp.exp))
    np.testing.assert_allclose(got, np.asarray(softmax_reference(q, k, v)), atol=1e-5)
    with pytest.raises(ValueError, match="window"):
        RFAConfig(kind="positive", window=4)


def test_learned_map_under_spu_matches_plaintext():
    import spu.utils.simulation as spsim

    sim = _aby3_sim()
    q, k, v = _qkv(20, lead=(1,), scale=1.0)
    mask = np.ones((1, 20), np.float32)
    mask[0, :3] = 0
    W = _learned()
    for stabilizer, window in (("mean", 0), ("max", 0), ("mean", 6)):
        cfg = RFAConfig(features=24, kind="learned", chunk=8, stabilizer=stabilizer, window=window)
        f = lambda q, k, v, m, W: rfa_attention(q, k, v, m, W, cfg, jnp.exp)  # noqa: E731  W secret
        want = np.asarray(f(q, k, v, mask, W))[:, 3:]
        got = spsim.sim_jax(sim, f)(q, k, v, mask, W)[:, 3:]
        assert np.abs(got - want).max() < 5e-3, (stabilizer, np.abs(got - want).max())


@pytest.mark.parametrize("L,window", [(64, 0), (64, 16), (512, 0), (512, 16)])
def test_learned_map_under_spu_holds_at_large_exponents(L, window):
    """Scores of a real model's spread (q, k ~ N(0, 9)) drive the mean-stabilised exponents to their
    cap, exp(12): the products that sum them over keys carry 2 x 18 fraction bits before
    truncation and overflowed FM64 (outputs 20-60% off), and the key map's 1 / sum of exps fell
    below 2^-18. Lowered exponents and a corrected quotient keep the secure output within 0.5%;
    at 512 keys only if the query's exponents are lowered with the number of keys (a fixed
    shift of 4 left 0.8-3% here)."""
    import spu.utils.simulation as spsim

    q, k, v = _qkv(L, lead=(1,), scale=3.0)
    mask = np.ones((1, L), np.float32)
    W = _learned()
    W = dict(W, q_bias=W["q_bias"] + 4.0)
    cfg = RFAConfig(features=24, kind="learned", chunk=16 if L == 64 else 64, stabilizer="mean", window=window)
    f = lambda q, k, v, m, W: rfa_attention(q, k, v, m, W, cfg, jnp.exp)  # noqa: E731
    want = np.asarray(f(q, k, v, mask, W))
    got = np.asarray(spsim.sim_jax(_aby3_sim(), f)(q, k, v, mask, W))
    assert np.abs(got - want).max() < 5e-3 * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


def test_learned_policy_needs_a_converted_model():
    from tuning.model_owner.models import load_model, with_policy
    from tuning.policy import load_policy

    with pytest.raises(ValueError, match="convert-attention"):
        with_policy(load_model("tiny-llama"), load_policy("aby3-rfa-learned"))
    with pytest.raises(ValueError, match="learned feature maps"):
        Execution(attention="rfa", rfa=RFAConfig(kind="learned", features=8)).check(llama.LlamaConfig())


def test_cached_scoring_with_linear_attention_equals_the_uncached_forward(tmp_path):
    """Linear attention sees absolute positions, so the left-padded prefix cache shifts every text
    to start at position 0 (RoPE tables of minus its pad count, from the data owner): zero-shot
    logits through the cache == the plain forward, in plaintext and under SPU."""
    from tuning.model_owner.models import load_model, with_policy
    from tuning.data_owner.tasks import load_user_task
    from tuning.transports import make_backend
    from tuning.data_owner.scorer import SecureScorer
    from tuning.policy import load_policy

    csv = tmp_path / "toy.csv"
    rows = ["text,label", "good fun,positive", "a long and rather dull film,negative",
            "ok,positive", "not for me at all,negative", "great stuff,positive", "boring,negative"]  # 3 per class:
    # the held-out 20% test split needs one of each
    csv.write_text("\n".join(rows) + "\n")
    task = load_user_task(csv, verbalizer="positive=g,negative=b")
    pol = load_policy("aby3-rfa")
    bundle = with_policy(load_model("tiny-llama"), pol)
    got = {}
    for backend, mode in (("plaintext", "cached"), ("plaintext", "prefix"), ("sim", "cached")):
        sc = SecureScorer(make_backend(backend, bundle, pol), bundle, task, mode=mode, n_tokens=2, p0_ids=[40, 50])
        sc.add_examples("ex", task.train)
        got[backend, mode] = sc.score("ex", None)
    np.testing.assert_allclose(got["plaintext", "cached"], got["plaintext", "prefix"], atol=1e-4)
    assert np.abs(got["sim", "cached"] - got["plaintext", "cached"]).max() < 2e-2
