"""What several test modules share: the toy data set, the scan for a job's live processes, a
policy with a short timeout and a deployment of it on free local ports, and the check that a local
cluster left nothing behind."""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path


def toy_csv(path: Path) -> tuple[Path, list]:
    """Two clearly separable classes (disjoint word sets), 10 examples each: the file and its texts."""
    pos = ["great fun", "wonderful", "loved it", "brilliant", "superb"]
    neg = ["terrible", "awful", "hated it", "boring", "dull mess"]
    rows = [(f"{pos[i % 5]} {i}", "positive") for i in range(10)] + [(f"{neg[i % 5]} {i}", "negative")
                                                                      for i in range(10)]
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    return path, [t for t, _ in rows]


def pids_with(marker: str, module: str) -> list:
    """Live processes running ``module`` (e.g. ``tuning.transports.node``) whose command line also
    contains ``marker`` (a run's own directory)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if module in cmd and marker in cmd:
                out.append(int(d))
    return out


def replay_search(run: Path, d: int, popsize: int, seed: int = 0, sigma0: float = 1.0, start=None) -> tuple:
    """Replays a ``--save-logits`` run's search from its own opened logits: asserts that each
    generation asked exactly the candidates the strategy gives after being told the losses of the
    logits opened before, i.e. that nothing but the seed and the opened logits steers the search.
    ``start``: a checkpoint to replay from (default: the seed's fresh state). Returns the z the
    dev-loss selection keeps and the per-generation rankings of the train losses."""
    import numpy as np

    from tuning.data_owner.search import make_strategy
    from tuning.data_owner.trainer import load_checkpoint, losses_from_logits

    strategy = make_strategy("cma", d, popsize, seed, sigma0=sigma0)
    if start is None:
        search, first, best, best_loss = strategy.init(seed), 0, None, float("inf")
    else:
        st, _ = load_checkpoint(start, strategy, None, d)
        search, first, best, best_loss = st.search, st.generation, st.best_z, st.best_dev_loss
    ranks = []
    for g in sorted(Path(run, "logits").glob("gen*.npz"))[first:]:
        rec = np.load(g)
        Z, search = strategy.ask(search)
        np.testing.assert_array_equal(np.asarray(Z), rec["Z"][:-1], err_msg=g.name)
        losses = losses_from_logits(rec["train_logits"], rec["train_labels"], "ce")[: len(Z)]
        ranks.append(np.argsort(losses, kind="stable"))
        search = strategy.tell(search, Z, losses)
        dev = losses_from_logits(rec["dev_logits"], rec["dev_labels"], "ce")
        if dev.min() < best_loss:
            best, best_loss = rec["Z"][rec["dev_rows"][int(np.argmin(dev))]], float(dev.min())
    np.testing.assert_array_equal(best, np.load(Path(run, "best_z.npy")))
    return best, ranks


def small_policy(name: str, timeout_s: float = 15):
    """Shipped policy ``name`` with a short timeout (a launched cluster puts it on free local ports)."""
    from tuning.policy import load_policy

    return dataclasses.replace(load_policy(name), timeout_s=timeout_s)


def small_deployment(name: str, timeout_s: float = 15, key_dir=None):
    """Every party of shipped policy ``name`` on free local ports, with a short timeout; with
    ``key_dir``, a throwaway key and certificate per party there."""
    from tuning.transports import tls
    from tuning.transports.deployment import local_deployment

    dep = local_deployment(small_policy(name, timeout_s))
    return tls.with_local_keys(dep, key_dir) if key_dir is not None else dep


def deployment_file(tmp_path: Path, name: str, timeout_s: float = 15) -> Path:
    """:func:`small_deployment` with keys, as a file (its policy beside it): what each host of a
    deployment would hold (``secptune node --cluster FILE``)."""
    from tuning.transports.deployment import dump_deployment

    dep = small_deployment(name, timeout_s, tmp_path / "keys")
    return dump_deployment(dep, tmp_path / f"{name}-deployment.yaml", tmp_path / f"{name}-policy.yaml")


def port_free(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
        s.listen()
        return True
    except OSError:
        return False
    finally:
        s.close()


def assert_cleaned_up(cluster):
    """A closed local cluster left no process, port, key or link socket behind."""
    from tuning.transports.tlsgate import socket_base

    assert all(p.returncode is not None for p in cluster.procs.values())  # reaped: no zombies
    assert pids_with(str(cluster.log_dir), "tuning.transports.node") == []
    addrs = [a for p in cluster.deployment.nodes for a in (p.node, p.link) if a]
    assert all(port_free(a) for a in addrs), addrs
    assert not list(cluster.log_dir.glob("keys-*/*")), "the throwaway keys outlived the cluster"
    left = [d for p in cluster.procs.values() for d in socket_base().glob(f"secptune-gate-{p.pid}-*")]
    assert not left, f"the nodes' link gates outlived them: {left}"


def same_within_noise(a, b, what, tol=2e-2, margin=0.04):
    """Opened logits of one program on the same inputs through two back ends: within fixed-point
    noise, and the same predicted class wherever the class margin exceeds that noise."""
    import numpy as np

    assert a.shape == b.shape and np.abs(a - b).max() < tol, (what, np.abs(a - b).max())
    top2 = np.sort(b, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > margin
    assert (a.argmax(-1) == b.argmax(-1))[clear].all(), what


def assert_same_search_path(run_a: Path, run_b: Path, d: int, popsize: int) -> int:
    """Two ``--save-logits`` runs of the same job on two back ends took the same search path: each
    run's candidates are the seed's, replayed on the logits it opened (``replay_search``); SPU's
    share and truncation randomness cannot be seeded, so the runs share a generation's candidates
    as long as their earlier rankings agree (two of four losses can lie within 1e-4), and the same
    candidates give the same opened logits within fixed-point noise. Returns the number of
    generations whose candidates were equal."""
    import numpy as np

    (best_a, ranks_a), (best_b, ranks_b) = (replay_search(r, d=d, popsize=popsize) for r in (run_a, run_b))
    gens = sorted(p.name for p in Path(run_a, "logits").glob("gen*.npz"))
    assert gens == sorted(p.name for p in Path(run_b, "logits").glob("gen*.npz"))
    same = 0
    for g, name in enumerate(gens, start=1):
        a, b = (np.load(Path(r, "logits", name)) for r in (run_a, run_b))
        if g == 1 or all(np.array_equal(x, y) for x, y in zip(ranks_a[: g - 1], ranks_b[: g - 1])):
            assert np.array_equal(a["Z"], b["Z"]), name
        if np.array_equal(a["Z"], b["Z"]):
            same += 1
            for k in ("train_logits", "dev_logits"):
                same_within_noise(a[k], b[k], f"{name} {k}")
    a, b = (np.load(Path(r, "logits", "test_zero_shot.npz")) for r in (run_a, run_b))
    same_within_noise(a["logits"], b["logits"], "zero-shot test")
    if np.array_equal(best_a, best_b):
        a, b = (np.load(Path(r, "logits", "test_tuned.npz")) for r in (run_a, run_b))
        same_within_noise(a["logits"], b["logits"], "tuned test")
    return same


# Two measurements of one job's bytes agree within this: SPU's bytes per call vary from run to run
SAME_JOB_BYTES_REL = 0.04


def assert_same_job(summary: dict, ref: dict) -> None:
    """Two back ends' summaries of the same job: the same example counts, the same traffic (the same
    programs on the same shapes; ABY3's bytes vary by ~0.5% from run to run of the very same job on
    either back end, 2.05% seen once, SEMI2K's not at all; another program differs by far more), and
    only verbalizer logits opened, to the data owner."""
    import pytest

    for k in ("n_train", "n_dev", "n_test", "protocol"):
        assert summary[k] == ref[k], k
    for part in ("setup", "zero_shot_eval", "final_eval"):
        for k, rel in (("bytes", SAME_JOB_BYTES_REL), ("rounds", 0.02)):
            assert summary["mpc"][part][k] == pytest.approx(ref["mpc"][part][k], rel=rel), (part, k)
    per_gen = lambda s: s["mpc"]["per_generation_median"]["mpc_bytes"]  # noqa: E731
    assert per_gen(summary) == pytest.approx(per_gen(ref), rel=SAME_JOB_BYTES_REL)
    for s in (summary, ref):
        assert s["reveals"] and {(r["what"], r["to"]) for r in s["reveals"]} == {("verbalizer_logits", "data_owner")}
    if summary["backend"] == "secretflow":  # opened to the data owner's own party
        assert {r["party"] for r in summary["reveals"]} == {"alice"}


def assert_sf_parties_kept_secrets(record: Path, run: Path, texts: list, policy_name: str, d: int,
                                   n_tokens: int, seed: int = 0) -> None:
    """What every SecretFlow party but the data owner received (``SECPTUNE_RECORD_DIR``, one file
    per party) holds none of the data owner's secrets (texts, labels, z, A.z in float or fixed
    point), and no compute party received the model's weights or embeddings; each detector finds
    its secret framed as SecretFlow sends a value. ``run``: the job's ``--save-logits`` run dir."""
    import numpy as np
    from leakcheck import leaks
    from secretflow.utils import secure_pickle

    from spu_models.forward import embedding_table
    from tuning.data_owner.trainer import TuneConfig, build_subspace
    from tuning.model_owner.models import EmbeddingStats, load_model, with_policy
    from tuning.policy import load_policy

    policy = load_policy(policy_name)
    bundle = with_policy(load_model("tiny-llama"), policy)
    table = np.asarray(embedding_table(bundle.config, bundle.params), np.float32)
    sub = build_subspace(TuneConfig.of(model="tiny-llama", d=d, n_tokens=n_tokens, seed=seed), bundle,
                         EmbeddingStats.of(table))
    gens = [np.load(g) for g in sorted(Path(run, "logits").glob("gen*.npz"))]
    zs = [z for g in gens for z in g["Z"]]
    labels = [g[k] for g in gens for k in ("train_labels", "dev_labels")]
    deltas = [sub.offsets(z) for z in zs]
    data, model, clear = secret_detectors(texts, labels, zs, deltas, bundle, policy.fxp_fraction_bits)
    for party in sorted(p.stem for p in Path(record).glob("*.bin")):
        blob = (Path(record) / f"{party}.bin").read_bytes()
        if party == "alice":
            assert len(blob) > 1000  # the logits and costs it receives
            continue
        assert len(blob) > (1000 if party == "bob" else 100_000), party  # bob: descriptors and counts
        detectors = {**data, **(model if party != "bob" else {})}  # the model owner holds its model
        assert leaks(blob, detectors) == [], f"{party} received secrets"
    parties = {"alice", "bob", *(f"p{i}" for i in range(policy.world_size))}
    assert {p.stem for p in Path(record).glob("*.bin")} >= parties
    for kind, value in clear.items():  # control: each detector finds its secret, framed as SecretFlow sends it
        framed = secure_pickle.dumps({"seq_id": 7, "payload": value, "job": "j"})
        assert kind in leaks(framed, {**data, **model}), f"detector missed {kind}"


# what a stranger sends a link port in the clear: a forged message to brpc's receiver service
FORGED_PUSH = (b"POST /ReceiverService/Push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 2\r\n\r\n{}")


def plaintext_reply(addr: str, data: bytes = FORGED_PUSH, wait_s: float = 3.0) -> bytes:
    """What ``addr`` (host:port, or unix:PATH) answers ``data`` sent in the clear, until it closes
    the connection or ``wait_s`` passes (b"": nothing)."""
    fam, where = (socket.AF_UNIX, addr[5:]) if addr.startswith("unix:") else \
        (socket.AF_INET, (addr.rpartition(":")[0], int(addr.rpartition(":")[2])))
    got = b""
    with socket.socket(fam) as s:
        s.settimeout(5)
        try:
            s.connect(where)
            s.sendall(data)
            s.settimeout(wait_s)
            while len(got) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except OSError:  # a reset, a timeout: what came before it is the answer
            pass
    return got


def tls_without_certificate(addr: str) -> bytes:
    """What a TLS client with no certificate gets from ``addr`` for an HTTP request (b"": nothing)."""
    import ssl

    host, _, port = addr.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(FORGED_PUSH)
            return s.recv(200)
    except (ssl.SSLError, OSError):
        return b""


def secret_detectors(texts: list, labels: list, zs: list, deltas: list, bundle, fxp_bits: int) -> tuple:
    """Detectors (``leakcheck``) for what only the data owner may hold (``data``: texts, labels, z
    and A.z in float or fixed point) and what only the model owner may (``model``: weights,
    embeddings), and one value of each in the clear (``clear``) to check the detectors with."""
    import jax
    import numpy as np
    from leakcheck import WindowDetector

    from spu_models.forward import embedding_table

    table = np.asarray(embedding_table(bundle.config, bundle.params), np.float32)
    leaves = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(bundle.params)]
    weights = [w for w in leaves if w.size >= 1024 and len(np.unique(w)) > 0.9 * w.size][:4]
    fxp = 2.0 ** fxp_bits
    fixed = lambda x: np.trunc(x.astype(np.float64) * fxp).astype(np.int64)  # noqa: E731
    data = {
        "labels": lambda blob: any(lb.astype(t).tobytes() in blob for lb in labels
                                   for t in (np.int64, np.int32, np.float32, np.float64)),
        "z f32": WindowDetector([z.astype(np.float32) for z in zs]),
        "z f64": WindowDetector([z.astype(np.float64) for z in zs]),
        "delta f32": WindowDetector(deltas),
        "delta fxp": WindowDetector([fixed(x) for x in deltas]),
        "text": lambda blob: any(t.encode() in blob for t in texts),
    }
    model = {"weights f32": WindowDetector(weights), "embeddings f32": WindowDetector([table])}
    clear = {"labels": labels[0], "z f32": zs[0], "z f64": zs[0].astype(np.float64), "delta f32": deltas[0],
             "delta fxp": fixed(deltas[0]), "text": texts[3], "weights f32": weights[0],
             "embeddings f32": table[40:50]}
    return data, model, clear
