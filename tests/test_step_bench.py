"""The programs of ``secptune bench step`` (SFT step, PT step, forward-only generation) do what
they claim, on tiny-llama: plaintext back end for the semantics, the simulator (ABY3) for one SFT
step against plaintext."""
import jax
import numpy as np
import optax
import pytest

from bench.step_data import one_hot_labels, sft_inputs
from bench.step_drivers import pt_run, pt_setup, sft_run, sft_setup
from bench.baselines import fixed_point_adam, make_pt_program
from spu_models.forward import embedding_table
from tuning.model_owner.models import load_model, with_policy
from tuning.data_owner.tasks import Task
from tuning.transports import make_backend
from tuning.data_owner.scorer import SecureScorer
from tuning.policy import load_policy

N_TOKENS = 2
EXAMPLES = [("a fine film", "positive"), ("dull and slow", "negative")]


@pytest.fixture(scope="module")
def setup():
    policy = load_policy("aby3")
    bundle = with_policy(load_model("tiny-llama"), policy)
    task = Task("toy", EXAMPLES, EXAMPLES, ["positive", "negative"], {"positive": " positive", "negative": " negative"},
                "Review: {text}\nSentiment:")
    return policy, bundle, task


def _leaves(bundle):
    return [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(bundle.params)]


def test_fixed_point_adam_is_optax_adam():
    rng = np.random.default_rng(0)
    p = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    out = []
    for tx in (optax.adam(1e-2, eps=1e-3), fixed_point_adam(1e-2, eps=1e-3)):
        q, state = p, tx.init(p)
        for t in range(4):
            g = jax.tree_util.tree_map(lambda x: np.sin(3.0 * x + t), q)
            u, state = tx.update(g, state, q)
            q = optax.apply_updates(q, u)
        out.append(q)
    for k in p:
        np.testing.assert_allclose(out[0][k], out[1][k], rtol=1e-5, atol=1e-6)


def test_sft_loss_decreases_over_three_steps(setup):
    policy, bundle, task = setup
    plain = make_backend("plaintext", bundle, policy)
    n = sft_setup(plain, bundle, sft_inputs(bundle, task, EXAMPLES, N_TOKENS))
    losses = []
    for step in (1, 2, 3):
        sft_run(plain, bundle.config, n, step, lr=1e-2)
        losses.append(float(plain.unsafe_open("sft_loss", "test")))  # loss before this step's update
    assert losses[0] > losses[1] > losses[2], losses
    changed = [not np.allclose(plain.unsafe_open(f"sft_p{i}", "test"), w) for i, w in enumerate(_leaves(bundle))]
    assert all(changed), "every weight leaf (tied embedding included) must be trained"


def test_pt_changes_only_the_prompt_and_matches_the_scorer(setup):
    policy, bundle, task = setup
    plain = make_backend("plaintext", bundle, policy)
    p0_ids = list(range(100, 100 + N_TOKENS))
    sc = SecureScorer(plain, bundle, task, "prefix", N_TOKENS, p0_ids=p0_ids)
    sc.add_examples("ex", EXAMPLES)
    prompt0 = np.asarray(embedding_table(bundle.config, bundle.params))[p0_ids]
    labels = one_hot_labels(task, EXAMPLES)
    pt_setup(plain, bundle, prompt0, labels)
    before = {k: v.copy() for k, v in plain.vars.items()}
    pt_run(plain, bundle.config, "ex0", 1, lr=1e-2)
    # outputs: the prompt, its Adam moments and the loss; nothing else written, weights untouched
    changed = {k for k in plain.vars if k not in before or not np.array_equal(plain.vars[k], before[k])}
    assert changed == {"pt_prompt", "pt_m", "pt_v", "pt_loss"}
    assert np.abs(plain.unsafe_open("pt_prompt", "test") - prompt0).max() > 1e-3
    for w, w0 in zip(jax.tree_util.tree_leaves(plain.params), _leaves(bundle)):
        np.testing.assert_array_equal(np.asarray(w), w0)
    out = jax.eval_shape(lambda p, a: make_pt_program(bundle.config, bundle.execution, 1)(p, **a), plain._params_shapes,
                         {k: jax.ShapeDtypeStruct(plain.shapes[v], np.float32) for k, v in
                          {"text": "ex0_text", "select": "ex0_select", "head": "head", "labels": "pt_labels",
                           "prompt": "pt_prompt", "m": "pt_m", "v": "pt_v"}.items()})
    assert set(out) == {"loss", "prompt", "m", "v"}
    # PT's loss is the CE of the forward-only prefix scorer's logits for the same prompt (delta = 0)
    logits = sc.score("ex", np.zeros((1, N_TOKENS, bundle.config.hidden_size), np.float32))[0]
    want = -np.mean(np.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    assert float(plain.unsafe_open("pt_loss", "test")) == pytest.approx(float(want), abs=1e-5)


def test_forward_only_generation_both_placements(setup):
    policy, bundle, task = setup
    plain = make_backend("plaintext", bundle, policy)
    delta = np.random.default_rng(0).normal(size=(3, N_TOKENS, bundle.config.hidden_size)).astype(np.float32) * 0.02
    for mode in ("prefix", "cached"):
        sc = SecureScorer(plain, bundle, task, mode, N_TOKENS, p0_ids=list(range(100, 100 + N_TOKENS)))
        sc.add_examples(f"ex_{mode}", EXAMPLES)
        logits = sc.score(f"ex_{mode}", delta)
        assert logits.shape == (3, len(EXAMPLES), 2) and np.isfinite(logits).all()
        assert np.abs(logits[0] - logits[1]).max() > 0  # candidates differ


def test_sim_sft_step_matches_plaintext(setup):
    policy, bundle, task = setup
    sin = sft_inputs(bundle, task, EXAMPLES, N_TOKENS)
    plain, sim = make_backend("plaintext", bundle, policy), make_backend("sim", bundle, policy)
    n = sft_setup(plain, bundle, sin)
    sft_setup(sim, bundle, sin)
    sft_run(plain, bundle.config, n, 1, lr=1e-3)
    cost = sft_run(sim, bundle.config, n, 1, lr=1e-3)
    assert cost.send_bytes > 0 and cost.rounds > 0
    assert float(sim.unsafe_open("sft_loss", "test")) == pytest.approx(float(plain.unsafe_open("sft_loss", "test")), abs=1e-2)
    w0 = _leaves(bundle)
    dots = norms_m = norms_p = 0.0
    for i in range(n):
        mp, pp = sim.unsafe_open(f"sft_p{i}", "test"), plain.unsafe_open(f"sft_p{i}", "test")
        assert np.abs(mp - pp).max() < 1e-2
        um, up = mp - w0[i], pp - w0[i]
        dots, norms_m, norms_p = dots + (um * up).sum(), norms_m + (um * um).sum(), norms_p + (up * up).sum()
    assert dots / np.sqrt(norms_m * norms_p) > 0.95  # the MPC step points where the plaintext step does
    sim.close()


def test_no_forward_measures_sft_and_pt_only(mini_home, tmp_path):
    """`bench step --no-forward` (what bench e2e's step runs use): SFT and PT measured under SPU,
    no forward-only generation, and the table says so."""
    import json

    from bench.step import main

    main(["--model", "tiny-llama", "--policy", "aby3", "--layers", "1", "--no-forward", "--warmup", "0",
          "--vocab", "256", "--seq", "8", "--examples", "2", "--popsize", "4", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "step_aby3.json").read_text())["results"][0]
    assert set(r["methods"]) == {"sft", "pt"} and "prefill" not in r
    assert all(r["methods"][k]["send_bytes"] > 0 for k in ("sft", "pt"))
    assert "forward-only not measured (--no-forward)" in (tmp_path / "step_aby3.md").read_text()
