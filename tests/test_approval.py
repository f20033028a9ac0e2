"""The model owner approves what runs on its weights (issue 30 item 1): the compute parties run
only executables it compiled from a known program and public shapes, open only the outputs its
approval names, within the policy's cap, and the word rows are checked one-hot inside MPC."""
import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_cleaned_up, small_policy, toy_csv

from tuning.model_owner.models import load_model, with_policy
from tuning.data_owner.encode import session_batch
from tuning.data_owner.tasks import load_user_task
from tuning.transports import cluster as clustermod
from tuning.transports import make_backend, tls
from tuning.model_owner.approval import ProgramRef
from tuning.transports.rpc import PartyRefused, Peer
from tuning.transports.session import RevealError
from tuning.programs import compile_session_program, param_names
from tuning.errors import Refused, UserError
from tuning.data_owner.scorer import SecureScorer

PROMPTS = ["Qzv!x", "Kp?yw"]  # byte tokenizer: L = 8
WORDS = ["yes", "no"]


def steal(params):
    """The skeptical user's program: every weight, in one output."""
    return {"all": jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(params)])}


def bad_rows(rows: np.ndarray) -> dict:
    """Word rows that are not one-hot, each of which would open more than one word of the head."""
    a, b, c = 40, 41, 42
    out = {k: rows.copy() for k in ("multi-hot", "half-half", "signed", "doubled")}
    out["multi-hot"][0, b] = 1.0  # two words summed
    out["half-half"][0] = 0.0
    out["half-half"][0, [a, b]] = 0.5  # a mixture; sums to 1
    out["signed"][0, [a, b, c]] = [1.0, 1.0, -1.0]  # entries in {-1, 0, 1}, sums to 1
    out["doubled"][0] *= 2.0  # a scaled word
    return out


def _forward(be, batch: dict, rows=None) -> np.ndarray:
    return be.forward({**batch, **({} if rows is None else {"rows": rows})})


def test_cluster_runs_only_approved_programs(tmp_path, monkeypatch):
    """On real nodes, as the data owner with its own certificate: the weight-stealing program is
    refused by every compute party, naming its digest, nothing run or opened, through the session
    and straight at a node; an approved forward (compiled by the model owner, not here) matches
    plaintext; rows that are not one-hot open exact zeros; a head of the data owner's own and a
    weight bound as an argument are refused; the session stays usable after each refusal."""
    policy = small_policy("semi2k")
    bundle = load_model("tiny-llama")
    plain = make_backend("plaintext", with_policy(bundle, policy), policy)
    with make_backend("cluster", bundle, policy, log_dir=tmp_path / "logs") as be:
        cluster, keyed = be.cluster, be.deployment
        batch = session_batch(be, PROMPTS, WORDS)
        # 1. an approved program: the model owner compiles it; this process compiles nothing
        with monkeypatch.context() as m:
            m.setattr(clustermod, "compile_session_program", lambda *a: pytest.fail("the data owner compiled"))
            got = _forward(be, batch)
        np.testing.assert_allclose(got, plain.forward(batch), atol=1e-2)
        assert np.abs(got).max() > 0.05  # real logits, not the invalid rows' zeros
        info = {p.name: be.node_info(p.name) for p in keyed.compute}
        assert all(i["approved"] == 1 and i["run"] == 1 and i["open"] == 1 for i in info.values())

        # 2. the weight stealer through the session: compiled here, refused by the parties
        with pytest.raises(PartyRefused, match=r"refuses executable [0-9a-f]{64}: the model owner has not approved"
                           ) as e:
            be.run(steal, {}, ["all"], key="steal")
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="no resident variable 'all'"):  # it never ran
            be.reveal("all", "verbalizer_logits")
        # ... and straight at every node, as its digest would be sent (bytes) and then opened
        exe = compile_session_program(steal, be._params_shapes, {}, ["all"]).SerializeToString()
        digest = hashlib.sha256(exe).hexdigest()
        for p in keyed.compute:
            do = Peer(p.name, p.node, 10, tls.identity(keyed, keyed.data_owner.name))
            try:
                with pytest.raises(PartyRefused, match=f"{p.name} refuses executable {digest}: .*nothing ran"):
                    do.call("run", exe, param_names(be._params_shapes), ["all"])
                with pytest.raises(PartyRefused, match="'all' is not an output its approved program opens"):
                    do.call("get_share", "all", "verbalizer_logits")
                # an approved digest bound to a weight as its argument: refused too
                fwd = next(c for r, (c, _, _) in be._programs.items() if getattr(r, "program", None) == ProgramRef("forward"))
                names = param_names(be._params_shapes) + ["w0"] + [f"x_{k}" for k in sorted(batch)][1:]
                with pytest.raises(PartyRefused, match=r"a weight \(w0\) is bound to an argument"):
                    do.call("run", fwd, names, ["logits"])
            finally:
                do.close()
        assert [be.node_info(p.name)["run"] for p in keyed.compute] == [1] * len(keyed.compute)  # nothing ran
        assert be.reveals[1:] == []  # only the approved forward's logits left the parties

        # 3. word rows that are not one-hot: every logit opens as an exact zero
        for kind, rows in bad_rows(batch["rows"]).items():
            out = _forward(be, batch, rows)
            assert out.shape == got.shape and np.all(out == 0.0), kind

        # 4. logits scored against a head of the data owner's own (not the approved head's) are refused
        task = load_user_task(toy_csv(tmp_path / "toy.csv")[0], verbalizer="positive=g,negative=b")
        sc = SecureScorer(be, with_policy(bundle, policy), task, mode="cached", n_tokens=2, p0_ids=[40, 50])
        sc.add_examples("ex", task.train[:2])
        assert np.abs(sc.score("ex", None)).max() > 0.05
        be.put("head", np.ones(be.shapes["head"], np.float32))
        with pytest.raises(PartyRefused, match="its 'head' must be the 'head' output of an approved 'head' program"):
            sc.score("ex", None)
        assert _forward(be, batch).shape == got.shape  # still usable
    assert_cleaned_up(cluster)


def test_cluster_refuses_a_reveal_over_the_cap(tmp_path):
    """The model owner refuses, before anything runs, a program that would open more rows or words
    than its policy's cap; its own word rows above the word cap too; the session goes on."""
    policy = dataclasses.replace(small_policy("semi2k"), caps={"verbalizer_logits": {"rows": 2, "words": 2}})
    bundle = load_model("tiny-llama")
    with make_backend("cluster", bundle, policy, log_dir=tmp_path / "logs") as be:
        cluster = be.cluster
        for prompts, words, what in ((PROMPTS + ["x!"], WORDS, "3 rows x 2 words"),
                                     (PROMPTS, WORDS + ["maybe"], "2 rows x 3 words")):
            with pytest.raises(PartyRefused, match=rf"bob .*refused approve: .*forward's logits would open {what} "
                                                   r"of verbalizer_logits, over policy .*'s cap of 2 x 2") as e:
                be.forward(session_batch(be, prompts, words))
            assert "\n" not in str(e.value)
        be.put("rows", np.eye(3, bundle.config.vocab_size, 40, dtype=np.float32))
        with pytest.raises(PartyRefused, match="head would score 3 word rows, over policy .* cap of 2 words"):
            be.run("head", {"rows": "rows"}, ["head"])
        assert all(be.node_info(p.name)["run"] == 0 for p in be.deployment.compute)  # nothing ran
        assert be.reveals == []
        assert be.forward(session_batch(be, PROMPTS, WORDS)).shape == (2, 2)  # within the cap: runs
    assert_cleaned_up(cluster)


# ------------------------------------------------------------------------------------ simulator
@pytest.fixture(scope="module")
def sim():
    policy = small_policy("aby3")
    bundle = with_policy(load_model("tiny-llama"), policy)
    with make_backend("sim", bundle, policy) as s:
        yield s, bundle, make_backend("plaintext", bundle, policy)


def test_sim_opens_only_approved_outputs_within_the_cap(sim):
    """In the simulator a program of the caller's own still runs (benchmarks), but nothing of it
    opens, by the session's check and the parties' (Gate); an approved forward matches
    plaintext; the parties check the cap again on the share itself before it leaves."""
    s, bundle, plain = sim
    s.run(steal, {}, ["all"], key="steal")
    assert s.shapes["all"] == (sum(x.size for x in jax.tree_util.tree_leaves(bundle.params)),)  # 90,624 weights
    with pytest.raises(RevealError, match="'all' is not an output its approved program opens"):
        s.reveal("all", "verbalizer_logits")
    with pytest.raises(Refused, match="'all' is not an output its approved program opens"):
        s._reconstruct("all", "verbalizer_logits")  # the parties' own check, under the session's
    s.drop("all")
    batch = session_batch(s, PROMPTS, WORDS)
    got = s.forward(batch)
    np.testing.assert_allclose(got, plain.forward(batch), atol=1e-2)
    assert np.abs(got).max() > 0.05
    # a party whose own policy caps lower than the approval it admitted keeps its share
    for k, v in batch.items():
        s.put(f"x_{k}", v)
    s.run("forward", {k: f"x_{k}" for k in batch}, ["logits"])
    strict = dataclasses.replace(s.policy, caps={"verbalizer_logits": {"rows": 1, "words": 2}})
    gate = s.parties[0].gate  # one party is enough to keep the value closed
    gate.policy, loose = strict, gate.policy
    try:
        with pytest.raises(Refused, match="would open 2 rows x 2 words of verbalizer_logits, over .* cap of 1 x 2"):
            s.reveal("logits")
    finally:
        gate.policy = loose
    assert s.reveal("logits").shape == (2, 2)
    s.drop("logits", *[f"x_{k}" for k in batch])
    with pytest.raises(Refused, match="no program 'steal' to approve"):
        s.run("steal", {}, ["all"])


def test_sim_invalid_rows_open_nothing_through_the_head(sim, tmp_path):
    """The tuning path: a head from rows that are not one-hot is all zeros inside MPC, so every
    deep-prompt logit scored against it opens as ~0 (fixed point's truncation of a product with
    zero: a few 2^-18), where one-hot rows open real logits; a head of the caller's own is refused."""
    s, bundle, _ = sim
    task = load_user_task(toy_csv(tmp_path / "toy.csv")[0], verbalizer="positive=g,negative=b")
    sc = SecureScorer(s, bundle, task, mode="cached", n_tokens=2, depth=1, form="virtual")
    sc.add_examples("ex", task.train[:2])
    delta = (0.1 * np.random.default_rng(0).standard_normal((2,) + sc.delta_shape)).astype(np.float32)
    good = sc.score("ex", delta)
    assert np.abs(good).max() > 0.05
    rows = np.zeros((2, bundle.config.vocab_size), np.float32)
    rows[[0, 1], [ord("g"), ord("b")]] = 1.0
    for kind, bad in bad_rows(rows).items():
        s.put("rows", bad)
        s.run(ProgramRef("head", sc.depth, sc.form), {"rows": "rows"}, ["head"])
        out = sc.score("ex", delta)
        assert out.shape == good.shape and np.abs(out).max() < 1e-4, (kind, np.abs(out).max())
    s.put("head", np.ones((2, bundle.config.hidden_size), np.float32))
    with pytest.raises(Refused, match="its 'head' must be the 'head' output of an approved 'head' program"):
        sc.score("ex", delta)
    s.drop("rows", "head")


def test_a_kept_share_comes_back_only_as_what_it_was(sim, tmp_path):
    """A party keeps set-up shares under digests the data owner names; a restore must name the
    program and output that wrote the share. Before, a deviating data owner could keep any
    resident share (a weight's, or a cache no approval opens) and restore it as an approved
    program's openable output, then open it."""
    from tuning.compute_party.state import digest

    s, bundle, plain = sim
    party = s.parties[0]
    party.state_root = tmp_path / "p0"
    party.open_state()
    batch = session_batch(s, PROMPTS, WORDS)
    for k, v in batch.items():
        s.put(f"x_{k}", v)
    try:
        s.run("forward", {k: f"x_{k}" for k in batch}, ["logits"])
        fwd = party.gate.source["logits"]
        names = param_names(s._params_shapes) + [f"x_{k}" for k in sorted(batch)]
        k_w, k_in, k_out = (digest("test", i) for i in range(3))
        with pytest.raises(Refused, match="refuses to keep 'w0': weights are not set-up shares"):
            party.keep(["w0"], [k_w])
        assert not party.has([k_w])
        party.keep(["x_" + sorted(batch)[0]], [k_in])  # the data owner's input: no approved origin
        with pytest.raises(Refused, match="was 'None|None', not .*forward/logits"):
            party.restore(fwd, names, ["stolen"], [k_in])
        assert "stolen" not in party.gate.marks
        party.keep(["logits"], [k_out])  # restored as what it was: it opens as its approval says
        party.restore(fwd, names, ["again"], [k_out])
        assert party.gate.marks["again"] == "verbalizer_logits"
        np.testing.assert_array_equal(party.rt.get_var("again").share_chunks, party.rt.get_var("logits").share_chunks)
    finally:
        s.drop("logits", *[f"x_{k}" for k in batch])
        party.drop(["again"])
        party.store, party.state_root = None, None
