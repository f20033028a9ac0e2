"""Derivative-free search (CMA-ES, SPSA) and the BBT subspace: fast, plaintext, no MPC."""
import numpy as np
import pytest

from tuning.data_owner.search import CMAES, SPSA, make_strategy
from tuning.data_owner.subspace import EmbeddingStats, make_subspace, subspace_from_stats

D = 20
SHIFT = np.linspace(-2.0, 2.0, D).astype(np.float32)


def sphere(Z):
    return np.sum((np.asarray(Z, np.float64) - SHIFT) ** 2, axis=1)


def run(es, state, gens, log=None):
    for _ in range(gens):
        Z, state = es.ask(state)
        if log is not None:
            log.append(Z)
        state = es.tell(state, Z, sphere(Z))
    return state


STRATS = [("cma", {}), ("spsa", dict(lr=0.1, c=0.1))]


def test_cma_minimizes_shifted_sphere():
    es = make_strategy("cma", D, 16, seed=0)
    z, loss = es.best(run(es, es.init(), 150))
    assert loss < 1e-3
    assert np.abs(z - SHIFT).max() < 0.05


def test_spsa_minimizes_shifted_sphere():
    es = make_strategy("spsa", D, 16, seed=0, lr=0.1, c=0.1)
    state = run(es, es.init(), 150)
    z, loss = es.best(state)
    initial = sphere(np.zeros((1, D)))[0]
    assert loss < 0.1 * initial
    assert sphere(es.mean(state)[None])[0] < 0.1 * initial  # the iterate itself, not just a lucky probe


@pytest.mark.parametrize("gaussian", [False, True])
def test_spsa_perturbation_pairs(gaussian):
    es = SPSA(D, 8, dist="gaussian" if gaussian else "rademacher", c=0.2, seed=3)
    state = es.init()
    Z, _ = es.ask(state)
    plus, minus = Z[:4] - state.z, Z[4:] - state.z
    np.testing.assert_allclose(plus, -minus, atol=1e-6)
    if not gaussian:
        np.testing.assert_allclose(np.abs(plus), 0.2, rtol=1e-5)  # c_0 = c


@pytest.mark.parametrize("name,kw", STRATS)
@pytest.mark.parametrize("via_disk", [False, True])
def test_resume_is_bit_exact(name, kw, via_disk, tmp_path):
    es = make_strategy(name, D, 16, seed=7, **kw)
    full = []
    end = run(es, es.init(), 30, full)

    es2 = make_strategy(name, D, 16, seed=7, **kw)  # a fresh object, as after a restart
    part = []
    mid = run(es2, es2.init(), 12, part)
    d = es2.state_to_dict(mid)
    assert all(isinstance(v, (np.ndarray, np.generic)) for v in d.values())
    if via_disk:
        np.savez(tmp_path / "ckpt.npz", **d)
        with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as f:
            d = dict(f)
    resumed = run(es2, es2.state_from_dict(d), 18, part)

    assert len(part) == len(full)
    for a, b in zip(full, part):
        np.testing.assert_array_equal(a, b)
    (z1, l1), (z2, l2) = es.best(end), es2.best(resumed)
    np.testing.assert_array_equal(z1, z2)
    assert l1 == l2
    np.testing.assert_array_equal(es.mean(end), es2.mean(resumed))


def test_state_dict_rejects_other_strategy():
    cma, spsa = make_strategy("cma", D, 4), make_strategy("spsa", D, 4)
    with pytest.raises(ValueError, match="spsa"):
        cma.state_from_dict(spsa.state_to_dict(spsa.init()))


def test_same_seed_same_run_different_seed_differs():
    for name, kw in STRATS:
        a, b, c = (make_strategy(name, D, 8, seed=s, **kw) for s in (1, 1, 2))
        Za = a.ask(run(a, a.init(), 3))[0]
        Zb = b.ask(run(b, b.init(), 3))[0]
        Zc = c.ask(run(c, c.init(), 3))[0]
        np.testing.assert_array_equal(Za, Zb)
        assert not np.array_equal(Za, Zc)


def test_cma_respects_bounds():
    es = CMAES(D, 16, sigma0=10.0, bounds=(-1.0, 2.0), seed=0)
    state = es.init()
    for _ in range(10):
        Z, state = es.ask(state)
        assert Z.dtype == np.float32 and Z.shape == (16, D)
        assert Z.min() >= -1.0 and Z.max() <= 2.0
        assert (Z == -1.0).any() and (Z == 2.0).any()  # sigma=10: clipping is active
        state = es.tell(state, Z, np.sum((Z - 5.0) ** 2, axis=1))  # optimum outside the box
    assert es.mean(state).min() >= -1.0 and es.mean(state).max() <= 2.0 + 1e-6


def test_cma_starts_at_zero_and_nan_is_worst():
    es = CMAES(D, 8, seed=0)
    state = es.init()
    np.testing.assert_array_equal(es.mean(state), 0.0)
    assert es.best(state)[1] == float("inf")
    Z, state = es.ask(state)
    losses = sphere(Z)
    losses[0] = np.nan
    z, loss = es.best(es.tell(state, Z, losses))
    assert loss == float(np.float32(losses[1:].min()))  # evosax keeps fitness in float32


def test_factory_errors():
    with pytest.raises(ValueError, match="cma, spsa"):
        make_strategy("adam", D, 8)
    for name in ("cma", "spsa"):
        with pytest.raises(ValueError, match="popsize"):
            make_strategy(name, D, 1)
    with pytest.raises(ValueError, match="even"):
        make_strategy("spsa", D, 7)
    es = make_strategy("cma", D, 8)
    Z, state = es.ask(es.init())
    with pytest.raises(ValueError, match="losses"):
        es.tell(state, Z, np.zeros(7))


# ------------------------------------------------------------------------------------ subspace

V, H = 300, 24


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(123)
    return (0.05 * rng.standard_normal((V, H))).astype(np.float32)


def test_subspace_shapes_and_determinism(table):
    s = make_subspace(table, n_tokens=5, d=50, seed=4)
    assert s.A.shape == (5 * H, 50) and s.A.dtype == np.float32
    assert s.P0.shape == (5, H) and s.P0.dtype == np.float32
    assert s.init.startswith("vocab") and min(s.init_ids) >= 20 and len(set(s.init_ids)) == 5
    np.testing.assert_array_equal(s.P0, table[list(s.init_ids)])
    Z = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    P = s.prompts(Z)
    assert P.shape == (3, 5, H) and P.dtype == np.float32
    np.testing.assert_allclose(s.prompts(Z[1]), P[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(s.prompts(np.zeros(50)), s.P0)
    # same seed -> identical; other seed -> different A and P0; A does not depend on init
    t = make_subspace(table, n_tokens=5, d=50, seed=4)
    np.testing.assert_array_equal(s.A, t.A)
    np.testing.assert_array_equal(s.P0, t.P0)
    u = make_subspace(table, n_tokens=5, d=50, seed=5)
    assert not np.array_equal(s.A, u.A) and s.init_ids != u.init_ids
    txt = make_subspace(table, n_tokens=5, d=50, seed=4, init="text", init_ids=[30, 31, 32, 33, 34])
    np.testing.assert_array_equal(txt.A, s.A)
    np.testing.assert_array_equal(txt.P0, table[30:35])
    with pytest.raises(ValueError, match="d=50"):
        s.prompts(np.zeros((2, 49)))


def test_subspace_from_statistics_is_the_same_search_without_the_table(table):
    """A data owner without the weights (cluster back end) searches the same A from three public
    numbers; it shares A z, and the parties add their own P0."""
    ids = [30, 31, 32, 33, 34]
    s = make_subspace(table, n_tokens=5, d=50, seed=4, init="text", init_ids=ids)
    stats = EmbeddingStats.of(table)
    assert (stats.vocab_size, stats.hidden) == table.shape and stats.std == pytest.approx(table.std(), rel=1e-5)
    t = subspace_from_stats(stats, n_tokens=5, d=50, seed=4, init="text", init_ids=ids)
    np.testing.assert_array_equal(t.A, s.A)
    assert t.P0 is None and t.init_ids == s.init_ids and t.scale == s.scale and t.hidden == H
    Z = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_allclose(t.offsets(Z), s.prompts(Z) - s.P0, atol=1e-6)
    np.testing.assert_allclose(t.offsets(Z[0]), t.offsets(Z)[0], atol=1e-7)
    with pytest.raises(ValueError, match="holds no P0"):
        t.prompts(Z)
    v = subspace_from_stats(stats, n_tokens=5, d=50, seed=4)  # vocab init: same ids as from the table
    assert v.init_ids == make_subspace(table, n_tokens=5, d=50, seed=4).init_ids


def test_embedding_table_is_refused_when_the_policy_keeps_it_secret():
    import dataclasses

    from tuning.model_owner.models import load_model
    from tuning.transports import make_backend
    from tuning.policy import load_policy

    bundle = load_model("tiny-llama")
    assert load_policy("aby3").embedding == "secret"  # every shipped policy keeps the table secret
    policy = dataclasses.replace(load_policy("aby3"), embedding="data_owner")  # the opt-in
    be = make_backend("plaintext", bundle, policy)
    assert be.embedding_table().shape == (bundle.config.vocab_size, bundle.config.hidden_size)
    secret = make_backend("plaintext", bundle, dataclasses.replace(policy, embedding="secret"))
    with pytest.raises(PermissionError, match="keeps the embedding table secret"):
        secret.embedding_table()
    assert secret.embedding_stats() == be.embedding_stats()  # public statistics under every policy
    # the plaintext back end's lookup is the embed program on one-hot tokens, without the one-hot array
    from spu_models.forward import make_tuning_programs

    ids = np.array([[3, 7, 7, 250], [0, 1, 2, 3]])
    onehot = np.eye(bundle.config.vocab_size, dtype=np.float32)[ids]
    embed = make_tuning_programs(bundle.config)["embed"]
    np.testing.assert_array_equal(secret.lookup(ids), np.asarray(embed(bundle.params, onehot)["embeds"]))


@pytest.mark.parametrize("alpha,dist", [(1.0, "normal"), (0.5, "normal"), (1.0, "he")])
def test_subspace_scale(table, alpha, dist):
    """With z ~ N(0, I_d): entries of A z have std alpha*std(E) ("normal"; sqrt(2) times that for
    "he"), and entries of P0 + A z have std sqrt(std(P0)^2 + std(Az)^2) -- sqrt(2)*std(E) for
    alpha=1, "normal". Checked to 5% over 200 draws of z (2400 prompt entries each)."""
    s = make_subspace(table, n_tokens=5, d=500, seed=0, alpha=alpha, dist=dist)
    sE = table.std()
    Z = np.random.default_rng(1).standard_normal((200, 500)).astype(np.float32)
    P = s.prompts(Z)
    az = alpha * sE * (np.sqrt(2) if dist == "he" else 1.0)
    assert np.std(P - s.P0) == pytest.approx(az, rel=0.05)
    assert np.std(P) == pytest.approx(np.sqrt(np.var(s.P0) + az ** 2), rel=0.05)
    if alpha == 1.0 and dist == "normal":
        assert np.std(P) == pytest.approx(np.sqrt(2) * sE, rel=0.1)


def test_subspace_text_init_errors(table):
    with pytest.raises(ValueError, match="n_tokens"):
        make_subspace(table, n_tokens=5, d=10, init="text", init_ids=[30, 31, 32])
    with pytest.raises(ValueError, match="init_ids"):
        make_subspace(table, n_tokens=5, d=10, init="text")
    with pytest.raises(ValueError, match="range"):
        make_subspace(table, n_tokens=2, d=10, init="text", init_ids=[30, V])
    with pytest.raises(ValueError, match="vocab, text|'vocab', 'text'"):
        make_subspace(table, n_tokens=2, d=10, init="random")
