"""Cluster back end with real node processes: parity with plaintext (one-shot forward, the secure
scorer and the whole tuning loop), privacy of what the compute parties receive, and failure
handling (a killed party, an unreachable one, a node that cannot start)."""
import dataclasses
import json
import os
import signal
import socket
import time

import jax
import numpy as np
import pytest
from helpers import (FORGED_PUSH, assert_cleaned_up, deployment_file, pids_with, plaintext_reply, secret_detectors,
                     small_deployment, small_policy, tls_without_certificate, toy_csv)
from leakcheck import WindowDetector, leaks

from tuning.data_owner.encode import make_batch, session_batch, tokenize_prompts
from tuning.model_owner.models import load_model
from tuning.transports import cluster as clustermod
from tuning.transports import make_backend, procs, tls, tlsgate
from tuning.transports.cluster import LocalCluster, PartyError, Peer
from tuning.transports.rpc import ping
from tuning.errors import UserError
from tuning.policy import dump_policy

PROMPTS = ["Qzv!x", "Kp?yw"]  # byte tokenizer: L = 8 for both families
WORDS = ["yes", "no"]


def secrets_of(bundle, batch, fxp_bits: int):
    """Detectors of what no compute party may see, by kind; and the weights and token ids used."""
    leaves = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(bundle.params)]
    weights = [w for w in leaves if w.size >= 1024 and len(np.unique(w)) > 0.9 * w.size][:4]
    assert len(weights) >= 3
    scaled = [w.astype(np.float64) * 2.0 ** fxp_bits for w in weights]
    ids = [np.asarray(s + [bundle.tokenizer.pad_token_id] * (8 - len(s))) for s in tokenize_prompts(bundle, PROMPTS)]
    substrings = lambda items: lambda blob: any(s in blob for s in items)  # noqa: E731
    return {
        "weights f32": WindowDetector(weights),
        # SPU encodes by truncation (the control below finds those); round() too, as a superset
        "weights fxp": WindowDetector([np.trunc(x).astype(np.int64) for x in scaled]
                                      + [np.round(x).astype(np.int64) for x in scaled]),
        # under embedding: data_owner the data owner shares the embeddings themselves
        **({"embeds f32": WindowDetector([np.asarray(batch["embeds"], np.float32)])} if "embeds" in batch else {}),
        "text": substrings([p.encode() for p in PROMPTS]),
        "ids": substrings([i.astype(np.int32).tobytes() for i in ids] + [i.astype(np.int64).tobytes() for i in ids]),
    }, weights, ids


# --------------------------------------------------------------------------------------- tests
# cheetah over real nodes is soak: test_sim runs both models under cheetah, and the node code is
# the same for every protocol
CASES = [("tiny-llama", "aby3"), ("tiny-llama", "semi2k"), ("tiny-bert", "aby3"), ("tiny-bert", "semi2k"),
         pytest.param("tiny-llama", "cheetah", marks=pytest.mark.soak),
         pytest.param("tiny-bert", "cheetah", marks=pytest.mark.soak)]


@pytest.mark.parametrize("model,policy_name", CASES,
                         ids=["-".join(c.values if hasattr(c, "values") else c) for c in CASES])
def test_cluster_matches_plaintext_and_keeps_secrets(model, policy_name, tmp_path, monkeypatch):
    record = tmp_path / "record"
    monkeypatch.setenv(procs.ENV_RECORD, str(record))
    policy = small_policy(policy_name)
    bundle = load_model(model)
    ref_batch = make_batch(bundle, PROMPTS, WORDS, policy.embedding)
    expected = make_backend("plaintext", bundle, policy).forward(ref_batch)

    with make_backend("cluster", bundle, policy, log_dir=tmp_path / "logs") as be:
        cluster, dep = be.cluster, be.deployment
        batch = session_batch(be, PROMPTS, WORDS)
        assert all(np.array_equal(batch[k], ref_batch[k]) for k in ref_batch)
        outs = [be.forward(batch) for _ in range(2)]
        for out in outs:
            assert out.shape == expected.shape and out.dtype == np.float32
            assert np.abs(out - expected).max() < 1e-2
            assert (out.argmax(-1) == expected.argmax(-1)).all()
        # weights went over once and stayed resident; each forward: put the batch, run, open, drop
        assert be.node_info(dep.model_owner.name)["share_weights"] == 1
        n_leaves = len(jax.tree_util.tree_leaves(bundle.params))
        for p in dep.compute:
            info = be.node_info(p.name)
            assert info["set_share"] == n_leaves and info["run"] == 2 and info["open"] == 2
            assert info["put"] == 2 * len(batch) and info["drop"] == 2 * (len(batch) + 1)
        assert be.shapes == {}  # nothing left resident but the weights
        assert len(be.costs) == 2
        for cost in be.costs:
            assert set(cost.parties) == {p.name for p in dep.compute}
            assert all(c.send_bytes > 0 and c.recv_bytes > 0 for c in cost.parties.values())
            assert cost.ops and cost.wall_s > 0

        # privacy: nothing any compute party received contains a secret, in any encoding
        secrets, weights, ids = secrets_of(bundle, batch, policy.fxp_fraction_bits)
        files = {p.name: record / f"{p.name}.bin" for p in dep.compute}
        for name, path in files.items():
            blob = path.read_bytes()
            assert len(blob) > 10_000
            assert leaks(blob, secrets) == [], f"{name} received secrets"

        # control: the same detector finds each secret once it is sent in the clear
        import spu.api as spu_api
        from spu import spu_pb2

        io = spu_api.Io(policy.world_size, policy.runtime_config())
        public = [io.make_shares(w, spu_pb2.Visibility.VIS_PUBLIC)[0] for w in weights]
        p0 = dep.compute[0]
        peer = Peer(p0.name, p0.node, policy.timeout_s, tls.identity(dep, dep.data_owner.name))
        try:
            kinds = {"weights f32": weights[0], "weights fxp": public, "text": PROMPTS[0],
                     "ids": ids[0].astype(np.int32), **({"embeds f32": batch["embeds"]} if "embeds" in batch else {})}
            for kind, clear in kinds.items():
                before = files[p0.name].stat().st_size
                peer.call(ping, clear)
                blob = files[p0.name].read_bytes()[before:]
                assert kind in leaks(blob, secrets), f"detector missed {kind}"
        finally:
            peer.close()
    assert_cleaned_up(cluster)


def test_tuning_loop_over_cluster_matches_plaintext_and_keeps_secrets(tmp_path, monkeypatch):
    """The real tuning loop (``tuning.data_owner.trainer.tune``) over launched nodes under ABY3, then the
    secure scorer on both back ends: the prefix caches stay resident on the parties between
    programs, the opened logits match plaintext, and no compute party ever receives a label,
    a search vector z or a shared A.z delta in the clear (nor weights, embeddings or texts)."""
    import tempfile

    from tuning.data_owner.tasks import load_user_task
    from tuning.data_owner.scorer import SecureScorer
    from tuning.data_owner.search import CMAES
    from tuning.data_owner.trainer import TuneConfig, tune

    record = tmp_path / "record"
    monkeypatch.setenv(procs.ENV_RECORD, str(record))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the cluster tune launches logs here
    csv, texts = toy_csv(tmp_path / "toy.csv")
    put_log, asked, labels = [], [], []
    orig_put, orig_ask, orig_add = clustermod.ClusterBackend.put, CMAES.ask, SecureScorer.add_examples

    def put(self, name, value):
        put_log.append((name, np.asarray(value, np.float32).copy()))
        return orig_put(self, name, value)

    def ask(self, st):
        Z, st = orig_ask(self, st)
        asked.append(np.asarray(Z).copy())
        return Z, st

    def add_examples(self, name, examples, *a, **k):
        ex = orig_add(self, name, examples, *a, **k)
        labels.append(np.asarray(ex.labels).copy())
        return ex

    monkeypatch.setattr(clustermod.ClusterBackend, "put", put)
    monkeypatch.setattr(CMAES, "ask", ask)
    monkeypatch.setattr(SecureScorer, "add_examples", add_examples)

    # 1. the tuning loop, driven through a freed policy file. The data owner's process (this one)
    #    never loads the model owner's weights: only the model owner's node does
    import tuning.model_owner.models

    def no_weights_here(*a, **k):
        raise AssertionError("the data owner's process loaded the model's weights")

    policy_path = dump_policy(small_policy("aby3"), tmp_path / "aby3-free.yaml")
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning.model_owner.models, "load_model", no_weights_here)
        summary = tune(TuneConfig.of(model="tiny-llama", policy=str(policy_path), backend="cluster", task=None,
                                     train=str(csv), verbalizer="positive=g,negative=b", shots=2, n_test=4,
                                     popsize=4, budget=1, d=8, n_tokens=2, seed=0, out=str(out)),
                       show_progress=False, log=lambda *a: None)
    assert summary["generations"] == 1 and summary["backend"] == "cluster"
    assert json.loads((out / "summary.json").read_text())["tuned_test_acc"] == summary["tuned_test_acc"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert summary["mpc"]["setup"]["bytes"] > 0 and summary["mpc"]["per_generation_median"]["mpc_bytes"] > 0
    deltas = [v for n, v in put_log if n == "delta"]
    assert len(asked) == 1 and len(deltas) == 3  # one generation (train, dev) + the final test evaluation

    # 2. the secure scorer on both back ends: opened logits agree
    policy = small_policy("aby3")
    bundle = load_model("tiny-llama")
    task = load_user_task(csv, verbalizer="positive=g,negative=b")
    examples = task.train[:4]
    rng = np.random.default_rng(0)
    delta = (0.1 * rng.standard_normal((3, 2, bundle.config.hidden_size))).astype(np.float32)
    ref_sc = SecureScorer(make_backend("plaintext", bundle, policy), bundle, task, mode="cached", n_tokens=2,
                          p0_ids=[40, 50])
    ref_sc.add_examples("ex", examples)
    ref = [ref_sc.score("ex", delta), ref_sc.score("ex", None)]
    with make_backend("cluster", bundle, policy, log_dir=tmp_path / "logs") as be:
        cluster, compute = be.cluster, be.deployment.compute
        sc = SecureScorer(be, bundle, task, mode="cached", n_tokens=2, p0_ids=[40, 50])
        sc.add_examples("ex", examples)
        caches = [v for v in be.shapes if v.startswith("ex0_cache_")]
        assert len(caches) == 2 * bundle.config.num_hidden_layers  # the prefix cache, resident
        # what the data owner learns of the weights: the subspace's statistics, same as in process
        plain_stats = make_backend("plaintext", bundle, policy).embedding_stats()
        stats = be.embedding_stats()
        assert (stats.vocab_size, stats.hidden) == (plain_stats.vocab_size, plain_stats.hidden)
        assert stats.std == pytest.approx(plain_stats.std, rel=1e-6)
        runs = be.node_info(compute[0].name)["run"]
        got = [sc.score("ex", delta), sc.score("ex", None)]
        assert be.node_info(compute[0].name)["run"] == runs + 2  # scoring reads the cache
        assert all(v in be.shapes for v in caches) and "logits" not in be.shapes
        # prefill + extend is a longer program than the plain forward (whose parity bound, 1e-2, is
        # tested above); ABY3's probabilistic truncation put it at 0.0098-0.011 across runs here.
        for g, r in zip(got, ref):
            assert g.shape == r.shape and np.abs(g - r).max() < 2e-2, np.abs(g - r).max()
            margin = np.abs(np.diff(r, axis=-1)).squeeze(-1)
            clear = margin > 0.04  # argmax must agree wherever plaintext is not a near-tie
            assert (g.argmax(-1) == r.argmax(-1))[clear].all()
        for cost in be.costs:
            assert set(cost.parties) == {p.name for p in compute}
    assert_cleaned_up(cluster)
    labels.append(np.asarray(ref_sc.sets["ex"].labels))
    deltas.append(delta)

    # 3. privacy: nothing either cluster's compute parties received contains a secret
    assert not any("label" in n or "loss" in n for n, _ in put_log)
    zs = [z for Z in asked for z in Z]
    data, model, clear = secret_detectors(texts, [lb for lb in labels if lb.size >= 4], zs, deltas, bundle,
                                          policy.fxp_fraction_bits)
    secrets = {**data, **model}
    for p in compute:
        blob = (record / f"{p.name}.bin").read_bytes()
        assert len(blob) > 100_000
        assert leaks(blob, secrets) == [], f"{p.name} received secrets"
    # control: each detector finds its secret in the clear, framed as a node receives it
    import cloudpickle

    for kind, value in clear.items():
        assert kind in leaks(cloudpickle.dumps((ping, (value,), {})), secrets), f"detector missed {kind}"


def test_killed_party_raises_party_error_and_cleanup(tmp_path):
    policy = small_policy("aby3", timeout_s=10)
    bundle = load_model("tiny-llama")
    be = make_backend("cluster", bundle, policy, log_dir=tmp_path)
    cluster = be.cluster
    try:
        batch = session_batch(be, PROMPTS, WORDS)
        be.forward(batch)
        for k, v in batch.items():  # the inputs are resident before the party dies
            be.put(f"x_{k}", v)
        first = next(iter(batch))  # embeds, or one-hot tokens under embedding: secret
        victim = be.deployment.compute[1]
        os.kill(cluster.procs[victim.name].pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(PartyError, match=rf"party {victim.name} \({victim.node}\)") as err:
            be.run("forward", {k: f"x_{k}" for k in batch}, ["logits"])  # approved for the forward above
        assert time.monotonic() - t0 < policy.timeout_s + 10
        assert "\n" not in str(err.value)
        with pytest.raises(PartyError, match="earlier failure"):  # the cluster is marked unusable
            be.forward(batch)
        with pytest.raises(ValueError, match="earlier failure|not an output its approved program opens"):
            be.reveal(f"x_{first}")  # an input: refused in any case
        be.drop(f"x_{first}")  # a no-op now: it must not hide the failure in a ``finally``
        # the survivors do not hang on the dead peer: their link gives up (brpc send retries or
        # receive timeout) and yacl aborts the process, or the run returns
        survivors = [p.name for p in be.deployment.compute if p.name != victim.name]
        deadline = time.monotonic() + policy.timeout_s + 10
        while True:
            live = [n for n in survivors if cluster.procs[n].poll() is None]
            if not any(_busy(be, n) for n in live):
                break
            assert time.monotonic() < deadline, f"surviving parties {live} still hang in their run"
            time.sleep(0.5)
        print({n: cluster.procs[n].poll() for n in survivors})
    finally:
        be.close()
    assert_cleaned_up(cluster)


def _busy(be, name):
    try:
        return be.node_info(name)["busy"]
    except PartyError:  # died meanwhile
        return False


def test_unreachable_party_fails_fast(tmp_path):
    dep = small_deployment("semi2k", timeout_s=5, key_dir=tmp_path)  # free ports: nothing listens
    bundle = load_model("tiny-llama")
    t0 = time.monotonic()
    with pytest.raises(PartyError, match=rf"party p0 \({dep.compute[0].node}\)"):
        make_backend("cluster", bundle, dep.policy, deployment=dep)  # a deployment: nothing is launched
    assert time.monotonic() - t0 < dep.timeout_s + 2


def test_node_that_cannot_start_is_named(tmp_path):
    dep = small_deployment("semi2k", timeout_s=5)
    host, _, port = dep.compute[1].node.rpartition(":")
    blocker = socket.socket()
    blocker.bind((host, int(port)))
    blocker.listen()
    try:  # refused before any node starts, in one line naming the port and the party
        with pytest.raises(UserError, match=rf"port {port} \(p1's address .*\) is not available") as err:
            LocalCluster(dep, tmp_path)
        assert "\n" not in str(err.value)
    finally:
        blocker.close()
    assert pids_with(str(tmp_path), "tuning.transports.node") == []


# ------------------------------------------------------------------------------ authenticated links
def _raw_call(address: str, payload: bytes, credentials=None, name: str = "p1"):
    """One RunReturn call with our own channel: (reply bytes received, grpc error or None)."""
    import grpc
    from spu.utils import distributed_pb2, distributed_pb2_grpc

    opts = [("grpc.ssl_target_name_override", name)]
    ch = grpc.secure_channel(address, credentials, options=opts) if credentials else grpc.insecure_channel(address)
    got = b""
    try:
        stub = distributed_pb2_grpc.NodeServiceStub(ch)
        for r in stub.RunReturn(iter([distributed_pb2.RunRequest(data=payload)]), timeout=10):
            got += r.data
        return got, None
    except grpc.RpcError as e:
        return got, e
    finally:
        ch.close()


def test_links_refuse_strangers_and_the_wrong_party(tmp_path):
    """A stranger on loopback (no certificate, or its own certificate under a party's name) gets no
    reply bytes at all; a compute party or the model owner asking a node for its share of an
    output is refused, and so is the data owner for anything but an output its approved program
    opens as the policy's revealable kind; a request carrying code is refused; a driver whose
    deployment differs from the nodes' is refused in one line naming the difference."""
    import cloudpickle
    import grpc

    from tuning.transports.rpc import dumps

    policy = small_policy("semi2k")
    bundle = load_model("tiny-llama")
    with make_backend("cluster", bundle, policy, log_dir=tmp_path / "logs") as be:
        cluster, keyed = be.cluster, be.deployment
        batch = session_batch(be, PROMPTS, WORDS)
        for k, v in batch.items():
            be.put(f"x_{k}", v)
        be.run("forward", {k: f"x_{k}" for k in batch}, {"logits": "y"})  # its approval opens the logits
        be.run("head", {"rows": "x_rows"}, {"head": "c"})  # an output no approval opens
        p1 = keyed.compute[1]
        request = dumps(("get_share", ("y", "verbalizer_logits")))

        # 1. strangers: plaintext, and TLS with a self-made certificate for the data owner's name
        got, err = _raw_call(p1.node, request)
        assert err is not None and got == b"", "a plaintext stranger got an answer"
        tls.generate_keys([keyed.data_owner.name], tmp_path / "stranger")
        fake = (tmp_path / "stranger" / f"{keyed.data_owner.name}.key").read_bytes()
        fake_cert = (tmp_path / "stranger" / f"{keyed.data_owner.name}.pem").read_bytes()
        real_p1 = open(p1.cert, "rb").read()
        creds = grpc.ssl_channel_credentials(real_p1, fake, fake_cert)
        got, err = _raw_call(p1.node, request, creds)
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE and got == b"", err

        # ... and every SPU link (brpc behind the node's gate), in TLS without a pinned certificate
        # or in plaintext (a forged push to brpc's receiver service): no byte
        for p in keyed.compute:
            assert tls_without_certificate(p.link) == b"" and plaintext_reply(p.link, FORGED_PUSH) == b"", p.name
        # control: brpc itself, on p1's private Unix socket, answers that plaintext
        (sock,) = tlsgate.socket_base().glob(f"secptune-gate-{cluster.procs[p1.name].pid}-*/brpc.sock")
        assert plaintext_reply(f"unix:{sock}", FORGED_PUSH).startswith(b"HTTP/1.1 ")

        # 2. parties that may not ask for shares: another compute party, the model owner
        for who in (keyed.compute[0].name, keyed.model_owner.name):
            peer = Peer(p1.name, p1.node, 10, tls.identity(keyed, who))
            try:
                with pytest.raises(PartyError, match=rf"refused the call: .*refuses get_share from {who}"):
                    peer.call("get_share", "y", "verbalizer_logits")
                assert peer.call(ping)["party"] == p1.name  # while a ping is fine
            finally:
                peer.close()
        mo = Peer(p1.name, p1.node, 10, tls.identity(keyed, keyed.model_owner.name))
        try:  # the model owner writes its weights only, never the data owner's inputs
            with pytest.raises(PartyError, match="'x' is not a weight; the model owner writes weights only"):
                mo.call("set_share", "x", None)
        finally:
            mo.close()

        # 3. the data owner: only the approved opened output, never an input, a weight or another output
        do = Peer(p1.name, p1.node, 10, tls.identity(keyed, keyed.data_owner.name))
        try:
            for var, what in (("x_rows", "verbalizer_logits"), ("c", "verbalizer_logits"),
                              ("w0", "verbalizer_logits"), ("y", "weights")):
                with pytest.raises(PartyError, match=f"refused get_share: .*{var!r} is not an output its approved"):
                    do.call("get_share", var, what)
            with pytest.raises(PartyError, match="refuses set_share from alice"):
                do.call("set_share", "w0", None)
            with pytest.raises(PartyError, match="'w0' is a weight; only the model owner writes it"):
                do.call("put", "w0", None)  # nor may it overwrite a weight with values of its own
            # code is not plain data: refused before it is unpickled
            code = cloudpickle.dumps((lambda server: server._locals, ()))
            got, err = _raw_call(p1.node, code, tls.identity(keyed, keyed.data_owner.name).channel_credentials(p1.name))
            assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED and got == b""
            assert do.call("info")["refused"] >= 4
        finally:
            do.close()
        expected = make_backend("plaintext", bundle, policy).forward(batch)
        np.testing.assert_allclose(be.reveal("y"), expected, atol=1e-2)  # the approved output opens

        # the model owner's node serves the model it was started with, never one a request names
        mo = keyed.model_owner
        owner = Peer(mo.name, mo.node, 10, tls.identity(keyed, keyed.data_owner.name))
        try:
            assert owner.call("embedding_stats", "tiny-llama").hidden == 64
            for other in ("smollm2-135m", str(tmp_path), "/opt/models/x"):
                with pytest.raises(PartyError, match=r"serves model 'tiny-llama', not ") as e:
                    owner.call("embedding_stats", other)
                assert "exist" not in str(e.value) and "No such" not in str(e.value)
        finally:
            owner.close()
        log = cluster.log_path(p1.name).read_text()
        assert "refused get_share from p0" in log and "refused get_share from bob" in log

        # 4. a driver with another cluster file (here: other fixed-point bits) is refused by name
        other = dataclasses.replace(policy, fxp_fraction_bits=policy.fxp_fraction_bits + 1)
        with pytest.raises(PartyError, match="deployment differs from the driver's at fxp_fraction_bits") as e:
            make_backend("cluster", bundle, other, deployment=keyed)
        assert "\n" not in str(e.value)
    assert_cleaned_up(cluster)


# ------------------------------------------------------------------- nodes started elsewhere
REPO = clustermod.procs.REPO
TOY_ARGS = ["--model", "tiny-llama", "--verbalizer", "positive=g,negative=b", "--shots", "2", "--n-test", "4",
            "--popsize", "4", "--d", "8", "--n-tokens", "2", "--seed", "0"]


def _cli_env():
    """A command's environment as on another host: this checkout, no launcher, no recording."""
    drop = (procs.ENV_PARENT, procs.ENV_RECORD)
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _cli(args, timeout=600):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tuning.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=_cli_env(), timeout=timeout)


def _error_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and lines and lines[-1].startswith("secptune: error:"), (p.returncode, p.stderr[-2000:])
    assert sum(ln.startswith("secptune: error:") for ln in lines) == 1
    return lines[-1]


@pytest.mark.soak  # test_multihost drives nodes started elsewhere (each in its own namespace) the same way
def test_tune_drives_nodes_started_elsewhere_like_the_launched_cluster(tmp_path):
    """`secptune node --cluster FILE --party NAME` per party (as each host would run it), then
    `secptune tune --backend cluster --cluster FILE` at the data owner: it launches nothing, the
    started nodes serve it, and the search path is the locally launched run's (same candidates,
    opened logits within SPU noise). A driver whose deployment differs, or a node that is gone,
    is refused in one line (exit 2)."""
    import subprocess
    import sys

    from tuning.data_owner.trainer import TuneConfig, tune
    from tuning.transports.deployment import load_deployment
    from helpers import replay_search

    csv, _ = toy_csv(tmp_path / "toy.csv")
    path = deployment_file(tmp_path, "semi2k", timeout_s=20)
    dep = load_deployment(path)
    nodes = {}
    try:
        for p in dep.nodes:
            with open(tmp_path / f"{p.name}.out", "wb") as out:
                nodes[p.name] = subprocess.Popen(
                    [sys.executable, "-m", "tuning.cli", "node", "--cluster", str(path), "--party", p.name,
                     "--log-dir", str(tmp_path / "nodes"), "--state-dir", str(tmp_path / "state" / p.name),
                     *(["--model", "tiny-llama"] if p.role == "model_owner" else [])],
                    cwd=REPO, env=_cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        for p in dep.nodes:
            while not clustermod._accepts(p.node):
                assert nodes[p.name].poll() is None, (tmp_path / f"{p.name}.out").read_text()[-2000:]
                assert time.monotonic() < deadline, f"node {p.name} did not come up"
                time.sleep(0.3)

        t0 = time.monotonic()
        remote = _cli(["tune", "--backend", "cluster", "--cluster", path, "--train", csv, *TOY_ARGS, "--budget", "2",
                       "--save-logits", "--out", tmp_path / "remote", "--json"])
        wall = time.monotonic() - t0
        assert remote.returncode == 0, remote.stderr[-3000:]
        summary = json.loads(remote.stdout.strip().splitlines()[-1])
        assert summary["backend"] == "cluster" and summary["generations"] == 2
        assert pids_with(str(tmp_path / "remote"), "tuning.transports.node") == []  # it launched no node
        assert all(n.poll() is None for n in nodes.values())  # the started nodes served it and still run
        ident = tls.identity(dep, dep.data_owner.name)
        owner = Peer(dep.model_owner.name, dep.model_owner.node, 10, ident)
        try:
            assert owner.call("info")["share_weights"] == 1
        finally:
            owner.close()
        assert json.loads((tmp_path / "remote" / "config.json").read_text())["cluster"] == str(path)

        # the same job with its nodes launched here (no --cluster): the same search path
        local = tune(TuneConfig.of(model="tiny-llama", policy=dep.policy_ref, backend="cluster", task=None,
                                   train=str(csv), verbalizer="positive=g,negative=b", shots=2, n_test=4, popsize=4,
                                   budget=2, d=8, n_tokens=2, seed=0, out=str(tmp_path / "local"), save_logits=True),
                     show_progress=False, log=lambda *a: None)
        for k in ("n_train", "n_dev", "n_test", "protocol"):
            assert summary[k] == local[k], k
        (_, ranks_a), (_, ranks_b) = (replay_search(tmp_path / r, d=8, popsize=4) for r in ("remote", "local"))
        for g in (1, 2):
            a, b = (np.load(tmp_path / r / "logits" / f"gen{g:04d}.npz") for r in ("remote", "local"))
            if g == 1 or np.array_equal(ranks_a[0], ranks_b[0]):
                assert np.array_equal(a["Z"], b["Z"]), g
            if np.array_equal(a["Z"], b["Z"]):
                for k in ("train_logits", "dev_logits"):
                    assert np.abs(a[k] - b[k]).max() < 2e-2, (g, k, np.abs(a[k] - b[k]).max())
        a, b = (np.load(tmp_path / r / "logits" / "test_zero_shot.npz") for r in ("remote", "local"))
        assert np.abs(a["logits"] - b["logits"]).max() < 2e-2
        print(f"tune --cluster: {wall:.0f}s")

        # a driver whose deployment differs from the nodes' (its policy: other fraction bits)
        import yaml

        from tuning.policy import dump_policy

        other = yaml.safe_load(path.read_text())
        pol = dataclasses.replace(dep.policy, fxp_fraction_bits=dep.policy.fxp_fraction_bits + 1)
        other["policy"] = str(dump_policy(pol, tmp_path / "other-policy.yaml"))
        (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
        fwd = ["forward", "--backend", "cluster", "--model", "tiny-llama", "--text", "a fine film"]
        line = _error_line(_cli([*fwd, "--cluster", tmp_path / "other.yaml"]))
        assert "deployment differs from the driver's at fxp_fraction_bits" in line, line
        assert _cli([*fwd, "--cluster", path]).returncode == 0  # the nodes serve the next driver
        # a node that is gone: named in one line
        os.killpg(nodes["p1"].pid, signal.SIGKILL)
        nodes["p1"].wait()
        line = _error_line(_cli([*fwd, "--cluster", path]))
        assert f"party p1 ({dep.party('p1').node})" in line, line
    finally:
        procs.kill_groups([n for n in nodes.values()], 3.0)


@pytest.mark.parametrize("case", ["unknown party", "duplicate port", "missing key", "missing policy"])
def test_a_bad_deployment_is_one_line_and_starts_nothing(tmp_path, capsys, monkeypatch, case):
    """Each is refused by `secptune node` (and `tune --cluster`) before any port or process starts."""
    import yaml

    from tuning.cli import main

    monkeypatch.setenv("SECPTUNE_NO_STDOUT_SPLIT", "1")

    path = deployment_file(tmp_path, "semi2k")
    d = yaml.safe_load(path.read_text())
    parties = d["parties"]
    edit, needle = {
        "unknown party": (lambda: parties.update(p2=dict(parties["p1"])), "parties.p2: unknown party 'p2'"),
        "duplicate port": (lambda: parties["p1"]["cluster"].update(address=parties["p0"]["cluster"]["address"]),
                           "parties.p1.cluster.address"),
        "missing key": (lambda: [parties[n].update(key=str(tmp_path / "gone.key")) for n in ("p0", "alice")],
                        "parties.p0.key"),
        "missing policy": (lambda: d.update(policy="nope"), "policy: unknown policy 'nope'"),
    }[case]
    edit()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(d))
    capsys.readouterr()
    commands = [["node", "--cluster", str(bad), "--party", "p0"],
                ["tune", "--backend", "cluster", "--cluster", str(bad), "--train", str(toy_csv(tmp_path / "toy.csv")[0]),
                 *TOY_ARGS, "--budget", "1", "--out", str(tmp_path / "run")]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith(f"secptune: error: {bad}: ") and needle in err[0], (argv, err)
        if case == "missing key":
            needle = "parties.alice.key"  # the driver's own key, for tune
    assert not (tmp_path / "run").exists()
    for p in parties.values():
        for a in p.get("cluster", {}).values():
            from helpers import port_free

            assert port_free(a), a
