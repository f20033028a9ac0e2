"""SecretFlow jobs (`secptune sf-job`, tuning.transports.secretflow): cluster files, the watchdog, the
one-line report of a failed job; a short tuning job on tiny-llama through SecretFlow under 3-party
ABY3 and 2-party SEMI2K against the same job on the cluster back end (same search path, opened
logits within fixed-point noise, the same traffic) and what every party but the data owner
receives; a killed party and a stalled one (every other party ends within the policy's timeout,
with a line naming it, and no process is left), and --resume after the restart (restoring the
set-up from the shares each compute party kept on its own disk).

Each job test starts one real process per party (5 under ABY3) on free local ports; on 2 busy
cores one takes 1-2 minutes."""
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import (FORGED_PUSH, assert_same_job, assert_same_search_path, assert_sf_parties_kept_secrets,
                     pids_with, plaintext_reply, replay_search, tls_without_certificate, toy_csv)

from tuning.transports import deployment as dp
from tuning.transports import sfcluster as sc
from tuning.transports import tls, tlsgate
from tuning.policy import available_policies, dump_policy, load_policy

REPO = Path(__file__).absolute().parent.parent
TOY_ARGS = ["--model", "tiny-llama", "--verbalizer", "positive=g,negative=b", "--shots", "2", "--n-test", "4",
            "--popsize", "4", "--d", "8", "--n-tokens", "2", "--seed", "0"]


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """Each test's parties keep their set-up shares in its own $SECPTUNE_HOME, not the user's."""
    monkeypatch.setenv("SECPTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def policy_file(tmp_path, name: str, timeout_s: float) -> Path:
    return dump_policy(dataclasses.replace(load_policy(name), timeout_s=timeout_s), tmp_path / f"{name}-t.yaml")


def sf_job_cmd(policy: Path, log_dir: Path, tune_args: list) -> list:
    return [sys.executable, "-m", "tuning.cli", "sf-job", "local", "--policy", str(policy), "--log-dir",
            str(log_dir), "--", *tune_args]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k != "SECPTUNE_RECORD_DIR"}
    return {**e, "PYTHONPATH": str(REPO), **extra}


def run_sf_job(policy, log_dir, tune_args, timeout=600, **extra_env):
    return subprocess.run(sf_job_cmd(policy, log_dir, tune_args), capture_output=True, text=True, cwd=REPO,
                          env=env(**extra_env), timeout=timeout)


def error_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.startswith("secptune: error:")]


# ---------------------------------------------------------------------------- deployment files
def test_shipped_deployments_load_and_keep_out_of_the_policies():
    for name, n_compute in (("aby3", 3), ("semi2k", 2), ("cheetah", 2), ("aby3-3hosts", 3)):
        c = dp.load_deployment(name).require("secretflow").require("cluster")
        assert len(c.compute) == n_compute == c.policy.world_size
        assert [p.name for p in c.compute] == [f"p{i}" for i in range(n_compute)]
        assert (c.data_owner.name, c.model_owner.name) == ("alice", "bob")
        ports = [a for p in c.parties for a in p.ports.values()]
        assert len(ports) == len(set(ports))
        assert all(("spu" in p.ports) == (p.role == "compute") for p in c.parties)
    assert not any(n.startswith("deployments") for n in available_policies())
    hosts = dp.load_deployment("aby3-3hosts")
    assert {p.address.rpartition(":")[0] for p in hosts.parties} == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert hosts.party("p0").ports["secretflow"] == "0.0.0.0:63000"


def _deployment_dict():
    return yaml.safe_load((dp.DEPLOYMENT_DIR / "semi2k.yaml").read_text())


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["parties"].pop("bob"), "parties: bob (the model owner) is not listed"),
    (lambda d: d["parties"].update(carol={"secretflow": {"address": "127.0.0.1:1", "watch": "127.0.0.1:2"}}),
     "unknown party 'carol'"),
    (lambda d: d["parties"]["alice"]["secretflow"].update(spu="127.0.0.1:3"),
     "parties.alice.secretflow.spu: only compute parties"),
    (lambda d: d["parties"]["p0"]["secretflow"].pop("watch"), "missing key parties.p0.secretflow.watch"),
    (lambda d: d["parties"]["p1"]["secretflow"].pop("spu"), "missing key parties.p1.secretflow.spu"),
    (lambda d: d["parties"]["p0"]["secretflow"].update(address="nohost"),
     "parties.p0.secretflow.address 'nohost' is not host:port"),
    (lambda d: d["parties"]["p1"]["secretflow"].update(watch=d["parties"]["p0"]["secretflow"]["address"]),
     "is also parties.p0.secretflow.address"),
    (lambda d: d["parties"]["p0"].update(port=1), "unknown key parties.p0.port"),
    (lambda d: d.update(hosts=[]), "unknown key 'hosts'"),
    (lambda d: d.pop("policy"), "missing key policy"),
])
def test_bad_deployment_files_rejected_naming_the_key(edit, needle):
    d = _deployment_dict()
    edit(d)
    with pytest.raises(dp.DeploymentError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        dp.parse_deployment(d, "c.yaml")
    assert "\n" not in str(err.value)


def test_local_deployment_round_trips_through_its_file(tmp_path):
    c = tls.with_local_keys(dp.local_deployment("aby3"), tmp_path / "keys")
    back = dp.load_deployment(dp.dump_deployment(c, tmp_path / "c.yaml"))
    assert back.parties == c.parties and back.job_name == c.job_name and back.policy == c.policy
    assert back.view() == c.view()


def test_sf_job_usage_errors_are_one_line(capsys):
    from tuning.cli import main

    cases = [(["sf-job", "local", "--policy", "aby3", "--", "--backend", "sim"], "--backend is not a tune argument"),
             (["sf-job", "local", "--policy", "aby3", "--", "--policy", "semi2k"], "--policy is not a tune argument"),
             (["sf-job", "local", "--", "--task", "mr"], "give --policy NAME"),
             (["sf-job", "local", "--policy", "aby3", "--state-dir", "s"], "--state-dir is for"),
             (["sf-job", "--cluster", "aby3", "--", "--task", "mr"], "give --cluster FILE --party NAME"),
             (["sf-job", "--cluster", "nope", "--party", "p0"], "deployment file nope not found"),
             (["sf-job", "--cluster", "aby3", "--party", "carol"], "no party 'carol'"),
             (["sf-job", "--cluster", "aby3", "--party", "p0"], "names no certificate")]  # no keys: no job
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("secptune: error:") and needle in err[0], (argv, err)


def test_the_secretflow_session_needs_a_job():
    from tuning.transports import make_backend
    from tuning.transports.secretflow import SecretFlowBackend
    from tuning.errors import UserError

    with pytest.raises(UserError, match="runs inside a SecretFlow job"):
        make_backend("secretflow", None, load_policy("aby3"))
    assert SecretFlowBackend.allows_unsafe_open is False  # only the policy's reveals leave the parties


# ------------------------------------------------------------------------------------ liveness
def _free_addr():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    return addr


def test_watchdog_names_lost_and_stalled_peers_and_lets_leavers_go(tmp_path):
    """Heartbeats under mutual TLS: a lost peer, a stalled one (connected, silent) and one that
    leaves in order are told apart in time; a stranger gets no byte from a watch port, and a
    peer whose watch port presents another certificate never counts as up."""
    import threading

    names = ["me", "lost", "stalled", "leaver", "me2"]
    keys = tls.generate_keys(names, tmp_path / "keys")
    certs = {n: Path(keys[n][0]).read_bytes() for n in names}
    pinned = {n: tls.pinned_tls(n, *keys[n], certs) for n in names}
    fired = []
    mk = lambda name: sc.SFParty(name, "compute", address=_free_addr(), watch=_free_addr())  # noqa: E731
    me, lost, stalled, leaver = mk("me"), mk("lost"), mk("stalled"), mk("leaver")

    def server(party, behaviour, ctx):  # a peer's watch port: answers, then closes / never answers
        srv = socket.socket()
        host, port = sc._split(party.watch)
        srv.bind((host, port))
        srv.listen()

        def run():
            raw, _ = srv.accept()
            while behaviour == "impostor":  # handshakes with every caller, which refuses it
                try:
                    ctx.wrap_socket(raw, server_side=True).recv(1)
                except OSError:
                    pass
                raw.close()
                try:
                    raw, _ = srv.accept()
                except OSError:
                    return
            if behaviour == "close":
                conn = ctx.wrap_socket(raw, server_side=True)
                conn.recv(1)
                conn.sendall(b"!")
                time.sleep(0.5)
                conn.close()
            else:
                time.sleep(30)

        threading.Thread(target=run, daemon=True).start()
        return srv

    servers = [server(lost, "close", pinned["lost"].server), server(stalled, "hang", None)]
    watchdog = lambda party, peers, **kw: sc.Watchdog(party, peers, 3.0, kw.pop("on", fired.append),  # noqa: E731
                                                      tls=pinned[party.name], **kw).start()
    peer = watchdog(leaver, [me], on=lambda *a: fired.append(("leaver",) + a))
    wd = watchdog(me, [lost, stalled, leaver], on=lambda *a: fired.append(a))
    assert all(wd.up[n].wait(10) for n in ("lost", "leaver"))  # up: they proved who they are
    # a stranger: plaintext (a forged request, a heartbeat), TLS without a certificate, and TLS
    # with a certificate of its own under a party's name get nothing from the watch port
    assert plaintext_reply(me.watch) == b"" and plaintext_reply(me.watch, b"?", wait_s=1) == b""
    assert tls_without_certificate(me.watch) == b""
    fake = tls.generate_keys(["leaver"], tmp_path / "stranger")["leaver"]
    ctx = tls.pinned_tls("leaver", *fake, {"leaver": Path(fake[0]).read_bytes(), "me": certs["me"]}).client("me")
    try:
        with socket.create_connection(sc._split(me.watch), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="me") as s:
            s.sendall(b"?")
            got = s.recv(1)
    except OSError:
        got = b""
    assert got == b""
    with socket.create_connection(sc._split(me.watch), timeout=5) as raw, \
            pinned["leaver"].client("me").wrap_socket(raw, server_hostname="me") as s:
        s.sendall(b"?")
        assert s.recv(1) == b"!"  # control: a party's own certificate gets the answer
    peer.goodbye()  # leaves in order: never reported
    assert wd.wait_done(["leaver"], 5) == []
    deadline = time.monotonic() + 10
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fired and fired[0][:2] == ("lost", "lost") and "was lost" in fired[0][2], fired
    time.sleep(0.2)
    assert len(fired) == 1  # one report per process: it ends right after
    wd2 = watchdog(mk("me2"), [stalled], on=lambda *a: fired.append(a))
    t0 = time.monotonic()
    while len(fired) < 2 and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert fired[1][:2] == ("stalled", "stalled") and time.monotonic() - t0 <= 3.5, fired
    # an impostor at a peer's address (its own certificate under the peer's name): never up
    impostor = mk("lost")
    servers.append(server(impostor, "impostor", tls.pinned_tls("lost", *tls.generate_keys(
        ["lost"], tmp_path / "impostor")["lost"], {"me": certs["me"]}).server))
    wd3 = sc.Watchdog(mk("me"), [impostor], 3.0, lambda *a: fired.append(a), 1.0, tls=pinned["me"]).start()
    t0 = time.monotonic()
    while len(fired) < 3 and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert fired[2][:2] == ("missing", "lost") and "failed the TLS handshake" in fired[2][2], fired
    assert not wd3.up["lost"].is_set()
    for w in (wd, wd2, wd3):
        w.stop()
    for s in servers:
        s.close()


def test_link_check_waits_for_a_closed_port_then_names_it(tmp_path):
    """A peer's SecretFlow port that closes at the TLS handshake (a TLS-only gate with no brpc
    behind it yet: a party still starting looks the same) is no error at first; the check keeps
    trying and, once the start-up bound is over, ends the party naming that port and what it saw
    (brpc would go on retrying for half an hour). An SPU port is checked only between compute
    parties."""
    names = ["alice", "p0"]
    keys = tls.generate_keys(names, tmp_path / "keys")
    pinned = tls.pinned_tls("alice", *keys["alice"], {n: Path(keys[n][0]).read_bytes() for n in names})
    gate = tlsgate.TLSGate(_free_addr(), "p0's SecretFlow address").start()
    p0 = sc.SFParty("p0", "compute", address=gate.bind, spu=_free_addr(), watch=_free_addr())
    wrong = []
    check = sc.LinkCheck(sc.SFParty("alice", "data_owner"), [p0], pinned, lambda *a: wrong.append(a), startup_s=2,
                         grace_s=0)
    assert [t[1] for t in check.targets] == ["SecretFlow address"]
    check.start()
    try:
        for _ in range(600):  # first a wait, said so
            if check.pending():
                break
            time.sleep(0.05)
        assert check.pending() == f"party p0's SecretFlow address {gate.bind}: it closed the connection at the TLS handshake"
        check.thread.join(60)  # then, past the bound, the end
    finally:
        check.stop()
        gate.stop()
    assert wrong == [("p0", f"party p0's SecretFlow address {gate.bind}: it closed the connection at the TLS "
                            "handshake, for 2s")]
    both = sc.LinkCheck(sc.SFParty("p1", "compute"), [p0], pinned, None)
    assert [t[1] for t in both.targets] == ["SecretFlow address", "SPU address"]
    # once brpc linked the SecretFlow addresses (sf.init returned), they are no longer checked
    gate = tlsgate.TLSGate(_free_addr(), "p0's SecretFlow address").start()
    p0 = sc.SFParty("p0", "compute", address=gate.bind, watch=_free_addr())
    check = sc.LinkCheck(sc.SFParty("alice", "data_owner"), [p0], pinned, lambda *a: wrong.append(a), startup_s=2,
                         grace_s=0)
    check.linked("SecretFlow address")
    check.start().thread.join(60)
    gate.stop()
    assert not check.thread.is_alive() and len(wrong) == 1  # it ended with nothing to check or report


def test_the_report_follows_the_blame_to_the_lost_party():
    c = dp.local_deployment("aby3")
    st = lambda kind, peer="", msg="", t=0.0: {"kind": kind, "peer": peer, "message": msg, "time": t}  # noqa: E731
    base = {n: {"role": c.party(n).role, "returncode": 3, "ended": 10.5, "killed": False, "log": f"{n}.log"}
            for n in ("alice", "bob", "p0", "p1", "p2")}
    parties = {n: dict(v, status=st("lost", "p2", f"party p2 was lost (seen by {n})", 10.2)) for n, v in base.items()}
    parties["p2"] = dict(base["p2"], status=st("lost", "p1", "party p1 (x) was lost: its process ended", 10.1))
    parties["p1"] = dict(base["p1"], returncode=-9, ended=10.0, status=None)
    msg = sc.explain(parties, c)
    assert msg.startswith("party p1 (compute) was killed (SIGKILL); alice, bob, p0, p2 stopped within 0.5s"), msg
    parties["p0"] = dict(base["p0"], returncode=-11, status=None)  # a survivor that SPU's link crashed
    msg = sc.explain(parties, c)
    assert msg.startswith("party p1 (compute) was killed (SIGKILL)") and msg.endswith("; p0 crashed (SIGSEGV)"), msg
    parties["p1"].update(returncode=-11)
    assert "party p1 (compute) crashed (SIGSEGV; SPU's link aborts" in sc.explain(parties, c)
    # the data owner's own error is the message, whatever the others report
    own = {n: dict(v, returncode=2, status=st("ended", "alice", "the data owner ended the job", 1.0))
           for n, v in base.items()}
    own["alice"] = dict(base["alice"], returncode=2, status=st("error", "", "--resume x: no checkpoint there", 2.0))
    assert sc.explain(own, c) == "--resume x: no checkpoint there"
    ok = {n: dict(v, returncode=0, status=st("ok")) for n, v in base.items()}
    assert sc.explain(ok, c) == ""


# ---------------------------------------------------------------------------------- the jobs
def _cluster_run(tmp_path, name, csv, out):
    """The same job on the cluster back end, in this process (the data owner's driver)."""
    from tuning.data_owner.trainer import TuneConfig, tune

    policy = dump_policy(dataclasses.replace(load_policy(name), timeout_s=30), tmp_path / "cl.yaml")
    return tune(TuneConfig.of(model="tiny-llama", policy=str(policy), backend="cluster", task=None, train=str(csv),
                              verbalizer="positive=g,negative=b", shots=2, n_test=4, popsize=4, budget=2, d=8,
                              n_tokens=2, seed=0, out=str(out), save_logits=True),
                show_progress=False, log=lambda *a: None)


def _netns_available() -> bool:
    from netns import available

    return available()


@pytest.mark.parametrize("name", [
    pytest.param("aby3", marks=pytest.mark.skipif(_netns_available(), reason="test_multihost runs this job and "
                                                  "these checks across network namespaces")),
    pytest.param("semi2k", marks=pytest.mark.soak)])
def test_sf_job_matches_the_cluster_back_end_and_keeps_secrets(name, tmp_path):
    """The same short job through SecretFlow and on the cluster back end: the same search path
    (helpers.assert_same_search_path), the same traffic and reveals, and no secret in what any
    party but the data owner received."""
    csv, texts = toy_csv(tmp_path / "toy.csv")
    ref = _cluster_run(tmp_path, name, csv, tmp_path / "cluster")
    record = tmp_path / "record"
    t0 = time.monotonic()
    p = run_sf_job(policy_file(tmp_path, name, 30), tmp_path / "logs",
                   ["--train", str(csv), *TOY_ARGS, "--budget", "2", "--out", str(tmp_path / "sf"), "--save-logits",
                    "--json"], SECPTUNE_RECORD_DIR=str(record))
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])  # stdout: the result alone
    assert summary["backend"] == "secretflow" and summary["generations"] == 2
    assert pids_with(str(tmp_path / "logs"), "tuning.sfjob") == []
    report = json.loads((tmp_path / "logs" / "job.json").read_text())
    assert report["ok"] and all(p_["status"]["kind"] == "ok" for p_ in report["parties"].values())
    assert assert_same_search_path(tmp_path / "sf", tmp_path / "cluster", d=8, popsize=4) >= 1
    assert_same_job(summary, ref)
    assert_sf_parties_kept_secrets(record, tmp_path / "sf", texts, name, d=8, n_tokens=2)
    print(f"{name}: sf-job {wall:.0f}s; per generation sf {summary['mpc']['per_generation_median']['mpc_s']:.1f}s "
          f"cluster {ref['mpc']['per_generation_median']['mpc_s']:.1f}s")


def _start_job(tmp_path, policy, budget, log_dir, out, extra=()):
    csv, _ = toy_csv(tmp_path / "toy.csv")
    proc = subprocess.Popen(sf_job_cmd(policy, log_dir, ["--train", str(csv), *TOY_ARGS, "--budget", str(budget),
                                                         "--out", str(out), *extra]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env())
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no generation within 300s"
        time.sleep(0.3)
    return proc, json.loads((log_dir / "parties.json").read_text())


@pytest.mark.soak  # test_multihost runs one command per party, each in its own network namespace
def test_one_command_per_party_as_on_separate_hosts(tmp_path):
    """`sf-job --cluster FILE --party NAME`, one command per party (what each host runs): the data
    owner's command prints the result, every other party's prints that it is up and done."""
    csv, _ = toy_csv(tmp_path / "toy.csv")
    cluster = tls.with_local_keys(dp.local_deployment(str(policy_file(tmp_path, "semi2k", 20))), tmp_path / "keys")
    path = dp.dump_deployment(cluster, tmp_path / "deployment.yaml")
    tune = ["--train", str(csv), *TOY_ARGS, "--budget", "1", "--out", str(tmp_path / "run")]
    procs = {p.name: subprocess.Popen([sys.executable, "-m", "tuning.cli", "sf-job", "--cluster", str(path), "--party",
                                       p.name, "--log-dir", str(tmp_path / p.name), "--", *tune],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env())
             for p in reversed(cluster.parties)}  # any start order: they wait for each other
    outs = {n: p.communicate(timeout=600) for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, (n, outs[n][1][-2000:])
    assert "zero-shot test accuracy" in outs["alice"][0] and "results in" in outs["alice"][0]
    for n in ("bob", "p0", "p1"):
        assert outs[n][0] == "" and f"{n}: up" in outs[n][1] and f"{n}: done" in outs[n][1]
        assert json.loads((tmp_path / n / "job.json").read_text())["ok"]
        assert pids_with(str(tmp_path / n), "tuning.sfjob") == []


def test_killed_party_ends_every_party_in_time_and_the_job_resumes(tmp_path):
    timeout = 10
    policy = policy_file(tmp_path, "aby3", timeout)
    logs, out = tmp_path / "logs", tmp_path / "run"
    proc, pids = _start_job(tmp_path, policy, 3, logs, out, ["--save-logits"])
    # every SecretFlow, SPU and watch port speaks TLS only and wants a pinned client certificate:
    # a stranger gets no byte, in TLS without one or in plaintext (a forged push to brpc's receiver)
    cluster = yaml.safe_load((logs / "deployment.yaml").read_text())
    for name, party in cluster["parties"].items():
        for kind, addr in party["secretflow"].items():
            assert tls_without_certificate(addr) == b"", (name, kind)
            assert plaintext_reply(addr, FORGED_PUSH) == b"", (name, kind)
    # control: brpc behind p0's gates (its private Unix sockets) answers the same plaintext
    gates = list(tlsgate.socket_base().glob(f"secptune-gate-{pids['p0']['pid']}-*/brpc.sock"))
    assert len(gates) == 2 and all(plaintext_reply(f"unix:{g}", FORGED_PUSH).startswith(b"HTTP/1.1 ") for g in gates)
    os.kill(pids["p1"]["pid"], signal.SIGKILL)  # a compute party, mid-job
    t_kill = time.time()
    _, stderr = proc.communicate(timeout=timeout + 60)
    shutil.copy(out / "ckpt.npz", tmp_path / "ckpt_at_kill.npz")
    assert proc.returncode == 2
    err = error_lines(stderr)
    assert len(err) == 1 and err[0].startswith("secptune: error: party p1 (compute) was killed (SIGKILL); "), err
    assert "stopped within" in err[0]
    report = json.loads((logs / "job.json").read_text())
    for name, p in report["parties"].items():
        if name == "p1":
            continue
        assert p["returncode"] == sc.EXIT_PEER and not p["killed"], (name, p)  # they ended by themselves
        assert p["status"]["kind"] == "lost" and p["status"]["peer"] in report["parties"]
        assert p["ended"] - t_kill < timeout, (name, p["ended"] - t_kill)
    assert pids_with(str(logs), "tuning.sfjob") == []
    left = [d for p in pids.values() for d in tlsgate.socket_base().glob(f"secptune-gate-{p['pid']}-*")]
    assert not left, f"link sockets outlived their parties (the killed one's too): {left}"
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 3

    # the parties restart; the data owner continues from its checkpoint
    p = run_sf_job(policy, tmp_path / "logs2", ["--resume", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed at generation {done}" in p.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generations"] == 3
    assert pids_with(str(tmp_path / "logs2"), "tuning.sfjob") == []
    # the set-up came back from the shares each compute party kept in its own private directory
    # (the killed one's too) instead of being computed again
    from tuning.compute_party.state import namespace

    first_mb = float(re.search(r"set-up \(.*?MPC ([0-9.]+) MB", stderr).group(1))
    resumed_mb = summary["mpc"]["setup"]["bytes"] / 1e6
    assert first_mb > 1 and resumed_mb <= 0.05 * first_mb, (first_mb, resumed_mb)
    print(f"set-up MPC {first_mb} MB first, {resumed_mb:.3f} MB resumed")
    kept = [tmp_path / "home" / "state" / q / namespace(out / "state") for q in ("p0", "p1", "p2")]  # own_home
    assert all(d.is_dir() and any(d.iterdir()) and stat.S_IMODE(d.stat().st_mode) == 0o700 for d in kept)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for d in kept for f in d.iterdir())
    assert not any((tmp_path / "home" / "state" / q).exists() for q in ("alice", "bob"))  # they keep nothing
    # the resumed search is the one the checkpoint determines, given the logits it opened
    replay_search(out, d=8, popsize=4, start=tmp_path / "ckpt_at_kill.npz")
    # `secptune clean` deletes the run and every compute party's kept shares
    p = subprocess.run([sys.executable, "-m", "tuning.cli", "clean", str(out)], capture_output=True, text=True,
                       cwd=REPO, env=env(), timeout=120)
    assert p.returncode == 0 and not out.exists() and not any(d.exists() for d in kept), p.stderr[-2000:]


@pytest.mark.soak  # the killed-party test covers the restore; this one also opens a restored output
def test_the_same_command_after_its_set_up_restores_and_opens_the_kept_shares(tmp_path):
    """A job that ended after its set-up, before its first checkpoint, run again: the compute
    parties restore their kept shares (no set-up traffic), and the deep prefill's zero-shot logits,
    a restored output its approval opens, open to the same values as before."""
    import numpy as np

    csv, _ = toy_csv(tmp_path / "toy.csv")
    policy, out = policy_file(tmp_path, "semi2k", 20), tmp_path / "run"
    args = ["--train", str(csv), *TOY_ARGS, "--budget", "1", "--prompt-depth", "1", "--save-logits", "--out", str(out),
            "--json"]
    runs = []
    for i in range(2):
        p = run_sf_job(policy, tmp_path / f"logs{i}", args)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append((json.loads(p.stdout.strip().splitlines()[-1]), np.load(out / "logits" / "test_zero_shot.npz")))
        (out / "ckpt.npz").unlink()  # as if it had ended before its first checkpoint
    (first, zs0), (again, zs1) = runs
    assert 0.05 * first["mpc"]["setup"]["bytes"] >= again["mpc"]["setup"]["bytes"], (first["mpc"], again["mpc"])
    np.testing.assert_array_equal(zs0["logits"], zs1["logits"])


def test_stalled_party_ends_every_party_in_time(tmp_path):
    timeout = 8
    policy = policy_file(tmp_path, "semi2k", timeout)
    logs, out = tmp_path / "logs", tmp_path / "run"
    proc, pids = _start_job(tmp_path, policy, 6, logs, out)
    os.kill(pids["p0"]["pid"], signal.SIGSTOP)  # alive, silent
    t_stop = time.time()
    try:
        _, stderr = proc.communicate(timeout=timeout + 60)
    finally:
        os.kill(pids["p0"]["pid"], signal.SIGCONT) if pids["p0"]["pid"] in pids_with(str(logs), "tuning.sfjob") else None
    assert proc.returncode == 2
    err = error_lines(stderr)
    assert len(err) == 1 and err[0].startswith("secptune: error: party p0 (compute) stopped answering"), err
    report = json.loads((logs / "job.json").read_text())
    for name, p in report["parties"].items():
        if name != "p0":
            assert p["returncode"] == sc.EXIT_PEER and not p["killed"], (name, p)
            assert p["ended"] - t_stop < timeout + 1, (name, p["ended"] - t_stop)
    assert report["parties"]["p0"]["killed"]  # the launcher reaped the stopped one
    assert pids_with(str(logs), "tuning.sfjob") == []


def test_data_owner_error_ends_every_party_with_its_one_line(tmp_path):
    p = run_sf_job(policy_file(tmp_path, "semi2k", 20), tmp_path / "logs", ["--resume", str(tmp_path / "nope")])
    assert p.returncode == 2
    assert error_lines(p.stderr) == [f"secptune: error: --resume {tmp_path / 'nope'}: no checkpoint there"], p.stderr
    report = json.loads((tmp_path / "logs" / "job.json").read_text())
    assert {n: q["status"]["kind"] for n, q in report["parties"].items()} == \
        {"alice": "error", "bob": "ended", "p0": "ended", "p1": "ended"}
    assert pids_with(str(tmp_path / "logs"), "tuning.sfjob") == []


def test_a_peer_address_without_tls_ends_the_party_with_one_line(tmp_path):
    """A party whose deployment points a peer's SecretFlow address at a port that answers in
    plaintext ends with one line naming that peer and what answered there, instead of SecretFlow
    retrying the handshake until its start-up wait (180 s) ends with "failed to setup connection
    to rank=1". Only the data owner runs: the other peers are not up, which is no error."""
    import threading

    csv, _ = toy_csv(tmp_path / "toy.csv")
    srv = socket.create_server(("127.0.0.1", 0))  # speaks HTTP: answers whatever comes with a 400

    def http():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=http, daemon=True).start()
    plain = f"127.0.0.1:{srv.getsockname()[1]}"
    cluster = tls.with_local_keys(dp.local_deployment(str(policy_file(tmp_path, "semi2k", 20))), tmp_path / "keys")
    cluster = dataclasses.replace(cluster, parties=tuple(dataclasses.replace(p, address=plain) if p.name == "p0" else p
                                                         for p in cluster.parties))
    path = dp.dump_deployment(cluster, tmp_path / "deployment.yaml")
    try:
        p = subprocess.run([sys.executable, "-m", "tuning.cli", "sf-job", "--cluster", str(path), "--party", "alice",
                            "--log-dir", str(tmp_path / "alice"), "--", "--train", str(csv), *TOY_ARGS, "--budget",
                            "1", "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, env=env(),
                           timeout=170)  # under SecretFlow's own 180 s wait
    finally:
        srv.close()
    assert p.returncode == 2, p.stderr[-3000:]
    assert error_lines(p.stderr) == [f"secptune: error: party p0's SecretFlow address {plain}: it does not answer "
                                     "in TLS (wrong version number)"], p.stderr[-3000:]
    status = json.loads((tmp_path / "alice" / "alice.status.json").read_text())
    assert status["kind"] == "error" and status["peer"] == "p0"
    assert pids_with(str(tmp_path / "alice"), "tuning.sfjob") == []


def test_ctrl_c_reaps_every_party(tmp_path):
    csv, _ = toy_csv(tmp_path / "toy.csv")
    logs = tmp_path / "logs"
    proc = subprocess.Popen(sf_job_cmd(policy_file(tmp_path, "semi2k", 20), logs,
                                       ["--train", str(csv), *TOY_ARGS, "--budget", "50", "--out", str(tmp_path / "r")]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env(),
                            # as from a terminal: a child inherits an ignored SIGINT, and the pytest process can
                            # have had SIGINT set to ignored by a library by the time this test runs
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (logs / "parties.json").exists() or len(pids_with(str(logs), "tuning.sfjob")) < 4:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)  # a bound on Ctrl-C to exit on a loaded 2-core machine
    assert proc.returncode == 130 and "secptune: interrupted" in stderr
    assert pids_with(str(logs), "tuning.sfjob") == []


# A deviating data owner: it skips its own session's checks and asks the parties directly, through
# the job's descriptors: the head program's output (rows of the LM head) opened as if it were
# verbalizer logits, an approved program run to overwrite a weight with its output, or its own
# input kept on the parties' disks and restored as the output of an approved program.
_HOSTILE = r"""
import sys
import numpy as np
import tuning.sfjob as sj
from tuning.model_owner.approval import ProgramRef, Request
from tuning.transports import secretflow as sfb

def hostile(job, spec, party):
    job.check_run = job.check_open = lambda *a, **k: None  # its own gate skipped
    meta = job.lead({"op": "setup", "model": "tiny-llama", "version": sfb.PROTOCOL})
    V = meta["config"].vocab_size
    rows = np.eye(V, dtype=np.float32)[:2]
    job.lead({"op": "put", "name": "rows", "shape": list(rows.shape)}, value=rows)
    approval = job.lead({"op": "approve", "request": Request.of(ProgramRef("head"), {"rows": rows.shape}, ["head"])})
    if spec["attack"] == "run":
        job.lead({"op": "run", "exe": approval.digest, "ins": ["rows"], "outs": ["w0"]})
    elif spec["attack"] == "restore":
        job.lead({"op": "state_open", "namespace": "0" * 64})
        job.lead({"op": "state_keep", "outs": ["rows"], "keys": ["1" * 64]})
        chunks = job.lead({"op": "state_has", "keys": ["1" * 64]})
        job.lead({"op": "state_restore", "exe": approval.digest, "ins": ["rows"], "outs": ["stolen"],
                  "keys": ["1" * 64], "chunks": chunks})
        print("RESTORED", flush=True)
    else:
        job.lead({"op": "run", "exe": approval.digest, "ins": ["rows"], "outs": ["head"]})
        got = job.lead({"op": "open", "name": "head", "what": "verbalizer_logits"})
        print("OPENED", np.asarray(got).shape, flush=True)

sj.run_data_owner = hostile
sj.main(sys.argv[1:])
"""


@pytest.mark.parametrize("attack,refusal", [("open", "is not an output its approved program opens"),
                                            pytest.param("run", "a weight (w0) is bound to", marks=pytest.mark.soak),
                                            pytest.param("restore", "was 'None|None', not", marks=pytest.mark.soak)])
def test_compute_parties_refuse_a_deviating_data_owner(attack, refusal, tmp_path):
    cluster = tls.with_local_keys(dp.local_deployment(str(policy_file(tmp_path, "aby3", 15))), tmp_path / "keys")
    path = dp.dump_deployment(cluster, tmp_path / "deployment.yaml")
    job = json.dumps({"tune": {"model": "tiny-llama"}, "attack": attack})
    procs = {}
    for p in reversed(cluster.parties):
        args = ["--cluster", str(path), "--party", p.name, "--log-dir", str(tmp_path / p.name), "--job", job]
        cmd = [sys.executable, "-c", _HOSTILE, *args] if p.role == "data_owner" else \
            [sys.executable, "-m", "tuning.sfjob", *args]
        procs[p.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                         env=env())
    outs = {n: p.communicate(timeout=600) for n, p in procs.items()}
    assert "OPENED" not in outs["alice"][0] and "RESTORED" not in outs["alice"][0]
    assert procs["alice"].returncode != 0
    # every compute party refuses as it reads the operation; one that sees another leave first ends
    # on that (the order is the scheduler's), so at least one names the refusal and none went on
    statuses = {n: sc.read_status(tmp_path / n, n) for n in ("p0", "p1", "p2")}
    refused = [n for n, s in statuses.items() if s["kind"] == "error" and refusal in s["message"]]
    assert refused, statuses
    assert all(n in refused or s["kind"] in ("lost", "failed") for n, s in statuses.items()), statuses
    for n in procs:
        assert pids_with(str(tmp_path / n), "tuning.sfjob") == []


def test_a_party_decodes_its_link_with_an_allow_list(tmp_path):
    """brpc answers plaintext messages on a TLS port, so a forged message can reach the decoder: a
    party decodes with an allow-list, where SecretFlow's deny-list lets ``builtins.exec`` through."""
    import pickle

    from secretflow.distributed.fed.proxy.brpc_link import brpc_link
    from secretflow.utils import secure_pickle

    from tuning.model_owner.approval import ProgramRef, Request
    from tuning.transports import secretflow as sfb

    marker = tmp_path / "ran"

    class Exec:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    forged = pickle.dumps({"seq_id": 1, "payload": Exec(), "job": "j"})
    secure_pickle.loads(forged, filter_type=secure_pickle.FilterType.BLACKLIST)  # control: SecretFlow's runs it
    assert marker.exists()
    marker.unlink()
    sfb._decode_with_allow_list()  # what every party does before sf.init
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec is not allowed on a SecretFlow link"):
        brpc_link.secure_pickle.loads(forged, filter_type=secure_pickle.FilterType.BLACKLIST)
    assert not marker.exists()
    # what a job sends still decodes (the SecretFlow job tests run whole jobs through it)
    msg = {"seq_id": 2, "payload": Request.of(ProgramRef("head"), {"rows": (2, 5)}, ["head"]), "job": "j"}
    assert brpc_link.secure_pickle.loads(brpc_link.secure_pickle.dumps(msg)) == msg


def test_a_party_turns_tls_on_for_secretflows_link(tmp_path):
    """SecretFlow 1.11's brpc link fills in ``tls_config``'s certificates but leaves TLS off (its
    messages went in plaintext); a party turns it on, and refuses a link without certificates."""
    from secretflow.distributed.fed.proxy.brpc_link import brpc_link

    from tuning.transports import secretflow as sfb

    cert, key = tls.generate_keys(["alice"], tmp_path)["alice"]
    args = ({"alice": "127.0.0.1:1", "bob": "127.0.0.1:2"}, "alice", "job",
            {"cert": str(cert), "key": str(key), "ca_cert": str(cert)}, {})
    cls = brpc_link.BrpcLinkProxy
    control = cls.__new__(cls)
    getattr(cls.__init__, "__wrapped__", cls.__init__)(control, *args)  # SecretFlow's own
    assert control._desc.server_ssl_opts.cert.certificate_path == str(cert) and not control._desc.enable_ssl
    sfb._link_with_tls()  # what every party does before sf.init
    assert cls(*args)._desc.enable_ssl
    with pytest.raises(sc.JobError, match="needs TLS"):
        cls(*args[:3], None, {})
