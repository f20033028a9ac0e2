"""Where the parties of a SecretFlow job run, whether they are alive, and the processes that run them.

A **cluster file** (``policies/clusters/*.yaml``) names the policy a job runs under and, for every
party of that policy, the ports it opens::

    policy: aby3                      # a policy name, or a path relative to this file
    job_name: secptune-aby3           # SecretFlow matches messages by job name and sequence number
    parties:
      p0:    {address: 10.0.0.1:63000, spu: 10.0.0.1:63010, watch: 10.0.0.1:63020}
      alice: {address: 10.0.0.1:63003, watch: 10.0.0.1:63023, listen: 0.0.0.0:63003}
      ...

- ``address``: SecretFlow's cross-silo link (``brpc_link``): the control messages, the shares
  that enter and leave the SPU device, and the executables;
- ``spu`` (compute parties only): the SPU runtimes' own link (the MPC protocol's traffic);
- ``watch``: the liveness heartbeats (:class:`Watchdog`);
- ``listen`` / ``spu_listen`` / ``watch_listen`` (optional): the local address to bind when the
  advertised one is not local (NAT, ``0.0.0.0``).

Roles come from the policy: its compute parties are the SPU device's nodes, its data owner and
model owner are PYU devices. Every party of the policy must be listed, and nothing else.

**Liveness** (:class:`Watchdog`): every party's process keeps a TCP connection to every other
party's ``watch`` port and pings it every second. A party whose process ends closes its
connections at once (``lost``); one that stops answering for ``timeout_s`` (stopped, hung,
unreachable) is ``stalled``. Either way every other party writes a status record naming it and
ends (``os._exit``): SecretFlow's own channel waits far longer (a secure call may run for
minutes), and SPU's link crashes a process whose peer died mid-computation, so neither can be
the liveness check.

**Processes** (:class:`Supervisor`): ``secptune sf-job`` runs each party as a worker process
(``python -m tuning.sfjob``) in its own process group that dies with its parent
(PR_SET_PDEATHSIG); its Python output is streamed, SPU's log goes to ``LOGDIR/<party>.log``, and
its end is reported from its status record (``LOGDIR/<party>.status.json``) or, when it has none
(a crash, a kill), from its exit signal: one line naming the party that was lost and why.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ..errors import UserError
from ..policy import dump_policy, load_policy, read_yaml
from .procs import REPO, STARTUP_S, free_addresses, kill_groups, launch

CLUSTER_DIR = REPO / "policies" / "clusters"
PARTY_KEYS = {"address", "spu", "watch", "listen", "spu_listen", "watch_listen"}
TOP_KEYS = {"policy", "job_name", "parties", "description"}
GRACE_S = 10.0  # after the first party ends abnormally, how long past timeout_s the rest may take
EXIT_OK, EXIT_ERROR, EXIT_PEER = 0, 2, 3  # a worker's exit codes: done / its own error / a peer failed


class ClusterFileError(UserError):
    """An invalid cluster file; the message names the file and the key."""


class JobError(UserError):
    """A SecretFlow job failed; the message names the party that was lost or failed, and why."""


# ------------------------------------------------------------------------------------ cluster files
@dataclasses.dataclass(frozen=True)
class SFParty:
    name: str
    role: str  # compute | data_owner | model_owner
    address: str  # SecretFlow cross-silo link, host:port as the other parties reach it
    watch: str  # liveness heartbeats
    spu: str = ""  # SPU link (compute parties)
    listen: str = ""
    spu_listen: str = ""
    watch_listen: str = ""

    @property
    def ports(self) -> dict:
        """What this party's process listens on, by purpose (the bind addresses)."""
        out = {"secretflow": self.listen or self.address, "watch": self.watch_listen or self.watch}
        if self.spu:
            out["spu"] = self.spu_listen or self.spu
        return out


@dataclasses.dataclass(frozen=True)
class SFCluster:
    policy: object  # tuning.policy.Policy
    policy_ref: str  # as the file names it (a name, or an absolute path)
    job_name: str
    parties: tuple  # SFParty, sorted by name (SecretFlow's link ranks and SPU's node order)
    source: str = ""

    def party(self, name: str) -> SFParty:
        for p in self.parties:
            if p.name == name:
                return p
        raise ClusterFileError(f"{self.source}: no party {name!r} (parties: {', '.join(p.name for p in self.parties)})")

    @property
    def compute(self) -> list:
        """The SPU device's nodes, in SPU rank order (``sf.SPU`` sorts them by name)."""
        return sorted((p for p in self.parties if p.role == "compute"), key=lambda p: p.name)

    @property
    def data_owner(self) -> SFParty:
        return next(p for p in self.parties if p.role == "data_owner")

    @property
    def model_owner(self) -> SFParty:
        return next(p for p in self.parties if p.role == "model_owner")

    @property
    def timeout_s(self) -> float:
        return float(self.policy.timeout_s)


def _hostport(value, source: str, where: str) -> str:
    s = str(value)
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterFileError(f"{source}: {where} {s!r} is not host:port")
    return s


def parse_cluster(d, source: str = "<cluster>", base: Path | None = None) -> SFCluster:
    """A cluster file's mapping -> :class:`SFCluster` (one-line :class:`ClusterFileError` otherwise)."""
    if not isinstance(d, dict):
        raise ClusterFileError(f"{source}: a cluster file must be a YAML mapping")
    extra = set(d) - TOP_KEYS
    if extra:
        raise ClusterFileError(f"{source}: unknown key {sorted(extra)[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    if "policy" not in d:
        raise ClusterFileError(f"{source}: missing key policy (a policy name or a path)")
    ref = str(d["policy"])
    if Path(ref).suffix and not Path(ref).is_absolute() and base is not None:
        ref = str((base / ref).resolve())
    policy = load_policy(ref)
    job = str(d.get("job_name", "secptune"))
    parties = d.get("parties")
    if not isinstance(parties, dict) or not parties:
        raise ClusterFileError(f"{source}: parties must map each party's name to its addresses")
    roles = {p.name: "compute" for p in policy.compute}
    roles[policy.data_owner.name], roles[policy.model_owner.name] = "data_owner", "model_owner"
    missing = sorted(set(roles) - set(parties))
    if missing:
        raise ClusterFileError(f"{source}: policy {policy.name!r} has party {missing[0]!r}, which parties does not list")
    out, seen = [], {}
    for name in sorted(parties):
        spec = parties[name]
        where = f"parties.{name}"
        if name not in roles:
            raise ClusterFileError(f"{source}: {where}: policy {policy.name!r} has no party {name!r} "
                                   f"(its parties: {', '.join(sorted(roles))})")
        if not isinstance(spec, dict):
            raise ClusterFileError(f"{source}: {where} must be a mapping with address and watch")
        bad = set(spec) - PARTY_KEYS
        if bad:
            raise ClusterFileError(f"{source}: unknown key {where}.{sorted(bad)[0]}")
        for key in ("address", "watch") + (("spu",) if roles[name] == "compute" else ()):
            if key not in spec:
                raise ClusterFileError(f"{source}: missing key {where}.{key}")
        if roles[name] != "compute" and ("spu" in spec or "spu_listen" in spec):
            raise ClusterFileError(f"{source}: {where}.spu: only compute parties run the SPU link "
                                   f"({name} is the {roles[name].replace('_', ' ')})")
        kw = {k: _hostport(v, source, f"{where}.{k}") for k, v in spec.items()}
        party = SFParty(name, roles[name], **kw)
        for purpose, addr in party.ports.items():
            if addr in seen:
                raise ClusterFileError(f"{source}: {where}.{purpose} {addr} is also {seen[addr]}")
            seen[addr] = f"{name}'s {purpose} port"
        out.append(party)
    return SFCluster(policy, ref, job, tuple(out), source)


def cluster_path(ref) -> Path:
    """A cluster file's path: ``ref`` itself, or a shipped name (``policies/clusters/NAME.yaml``)."""
    p = Path(ref)
    if not p.suffix and not p.exists():
        p = CLUSTER_DIR / f"{ref}.yaml"
    if not p.exists():
        shipped = ", ".join(sorted(q.stem for q in CLUSTER_DIR.glob("*.yaml")))
        raise ClusterFileError(f"cluster file {ref} not found (shipped: {shipped})")
    return p.absolute()


def load_cluster(path) -> SFCluster:
    p = cluster_path(path)
    return parse_cluster(read_yaml(p, ClusterFileError), str(p), p.absolute().parent)


def cluster_dict(cluster: SFCluster) -> dict:
    """The mapping :func:`parse_cluster` reads back as ``cluster``."""
    parties = {}
    for p in cluster.parties:
        parties[p.name] = {k: v for k, v in dataclasses.asdict(p).items() if k not in ("name", "role") and v}
    return {"policy": cluster.policy_ref, "job_name": cluster.job_name, "parties": parties}


def dump_cluster(cluster: SFCluster, path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cluster_dict(cluster), sort_keys=False))
    return path


def with_keys(cluster: SFCluster, key_dir) -> SFCluster:
    """``cluster`` with throwaway keys for every party in ``key_dir`` (``sf-job local``), its policy
    written beside them; unchanged if its policy names certificates already."""
    from . import tls

    policy = tls.with_local_keys(cluster.policy, key_dir)
    if policy is cluster.policy:
        return cluster
    ref = dump_policy(policy, Path(key_dir) / "policy.yaml").absolute()
    return dataclasses.replace(cluster, policy=policy, policy_ref=str(ref))


def local_cluster(policy_ref: str, host: str = "127.0.0.1", job_name: str | None = None) -> SFCluster:
    """Every party of policy ``policy_ref`` on this machine, on free ports (``sf-job local``)."""
    ref = str(Path(policy_ref).absolute()) if Path(policy_ref).suffix else policy_ref
    policy = load_policy(ref)
    addrs = iter(free_addresses(3 * len(policy.compute) + 4, host))
    parties = {p.name: {"address": next(addrs), "spu": next(addrs), "watch": next(addrs)} for p in policy.compute}
    for p in (policy.data_owner, policy.model_owner):
        parties[p.name] = {"address": next(addrs), "watch": next(addrs)}
    return parse_cluster({"policy": ref, "job_name": job_name or f"secptune-{policy.name}-{os.getpid()}",
                          "parties": parties}, f"<local {policy.name}>")


# ------------------------------------------------------------------------------------- liveness
def _split(addr: str) -> tuple:
    host, _, port = addr.rpartition(":")
    return host, int(port)


class Watchdog:
    """Heartbeats between this party's process and every other party's (see the module doc).

    ``on_fatal(kind, peer, message)`` is called once, from a watchdog thread, when a peer does not
    come up within ``startup_s`` (``missing``), its process ended (``lost``) or it stopped
    answering (``stalled``); it is expected to end the process.

    The orderly end: :meth:`goodbye` tells every party watching this one that it is leaving (a
    ``.`` before its connections close), so that a party that leaves first is never taken for a
    lost one; :meth:`wait_done` waits for the others' goodbyes (the data owner's proof that every
    party received the end of the job)."""

    def __init__(self, me: SFParty, peers: list, timeout_s: float, on_fatal, startup_s: float = STARTUP_S):
        self.me, self.peers, self.on_fatal = me, list(peers), on_fatal
        self.timeout_s, self.startup_s = float(timeout_s), float(startup_s)
        self.interval = min(1.0, self.timeout_s / 10)
        self.stall_s = max(1.0, self.timeout_s - 2 * self.interval)
        self.up: dict = {p.name: threading.Event() for p in self.peers}
        self.done: dict = {p.name: threading.Event() for p in self.peers}  # said goodbye
        self._leaving = threading.Event()
        self._stopped = threading.Event()
        self._fired = threading.Lock()
        self._conns: list = []
        self._conns_lock = threading.Lock()
        self._server = None

    def start(self) -> "Watchdog":
        host, port = _split(self.me.watch_listen or self.me.watch)
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind((host, port))
        except OSError as e:
            srv.close()
            raise JobError(f"party {self.me.name} cannot listen on its watch address {host}:{port}: {e.strerror}") from None
        srv.listen(16)
        self._server = srv
        threading.Thread(target=self._serve, daemon=True, name="watch-accept").start()
        for p in self.peers:
            threading.Thread(target=self._watch, args=(p,), daemon=True, name=f"watch-{p.name}").start()
        return self

    def wait_up(self, bound_s: float) -> bool:
        deadline = time.monotonic() + bound_s
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self.up.values())

    def wait_done(self, names: list, bound_s: float) -> list:
        """Wait until the parties ``names`` said goodbye (or ``bound_s``); the ones that did not."""
        deadline = time.monotonic() + bound_s
        return [n for n in names if not self.done[n].wait(max(0.0, deadline - time.monotonic()))]

    def goodbye(self) -> None:
        """This party leaves in order: every party watching it hears so before the connection
        closes. Stops watching the others too."""
        self._leaving.set()
        self._stopped.set()
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.sendall(b".")
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self._server is not None:
            self._server.close()

    def stop(self) -> None:
        """Stop watching (the process is about to end anyway)."""
        self._stopped.set()

    # -- the server half: answer every ping ("!", or "." once leaving)
    def _serve(self):
        while not self._leaving.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._conns_lock:
                self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True, name="watch-echo").start()

    def _echo(self, conn):
        try:
            while conn.recv(1):
                conn.sendall(b"." if self._leaving.is_set() else b"!")
        except OSError:
            pass

    # -- the client half: ping one peer
    def _fire(self, kind: str, peer: SFParty, message: str):
        if self._stopped.is_set() or not self._fired.acquire(blocking=False):
            return
        self.on_fatal(kind, peer.name, message)

    def _watch(self, peer: SFParty):
        addr = _split(peer.watch)
        deadline = time.monotonic() + self.startup_s
        while True:
            if self._stopped.is_set():
                return
            try:
                sock = socket.create_connection(addr, timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    return self._fire("missing", peer, f"party {peer.name} ({peer.watch}) did not come up within "
                                                       f"{self.startup_s:g}s")
                time.sleep(0.2)
        self.up[peer.name].set()
        sock.settimeout(self.stall_s)
        with sock:
            while not self._stopped.is_set():
                try:
                    sock.sendall(b"?")
                    data = sock.recv(1)
                except socket.timeout:
                    self._fire("stalled", peer, f"party {peer.name} ({peer.watch}) stopped answering for "
                                                f"{self.stall_s:g}s")
                    return
                except OSError as e:
                    data, err = b"", e.strerror or type(e).__name__
                else:
                    err = "its process ended (connection closed)"
                if data == b".":  # it left in order
                    self.done[peer.name].set()
                    return
                if not data:
                    self._fire("lost", peer, f"party {peer.name} ({peer.watch}) was lost: {err}")
                    return
                self._stopped.wait(self.interval)


# --------------------------------------------------------------------------------- status records
def status_path(log_dir, party: str) -> Path:
    return Path(log_dir) / f"{party}.status.json"


def write_status(log_dir, party: str, kind: str, message: str = "", peer: str = "", **extra) -> None:
    """A worker's last word: ``kind`` ok | error | missing | lost | stalled | failed | ended, the party
    it blames (``peer``) and a one-line ``message``; written atomically."""
    path = status_path(log_dir, party)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"party": party, "kind": kind, "peer": peer, "message": message,
                               "time": time.time(), **extra}))
    os.replace(tmp, path)


def read_status(log_dir, party: str) -> dict | None:
    try:
        return json.loads(status_path(log_dir, party).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ processes
SIGNAL_NOTES = {signal.SIGSEGV: "SPU's link aborts a process this way when a peer is lost mid-computation",
                signal.SIGABRT: "yacl aborts a process this way when its link gives up"}


@dataclasses.dataclass
class Worker:
    party: SFParty
    proc: subprocess.Popen
    log: Path
    started: float
    ended: float | None = None
    killed: bool = False  # by the supervisor, after the others had ended

    @property
    def returncode(self):
        return self.proc.returncode


def _describe_exit(code) -> str:
    if code is None:
        return "still running"
    if code < 0:
        sig = signal.Signals(-code)
        note = SIGNAL_NOTES.get(sig)
        return f"{'crashed' if sig in SIGNAL_NOTES else 'was killed'} ({sig.name}{'; ' + note if note else ''})"
    return f"exited with code {code}"


class Supervisor:
    """Runs one worker process per party here, streams their output, reaps every process group
    on exit (or Ctrl-C) and explains the job's end (:meth:`report`)."""

    def __init__(self, cluster: SFCluster, cluster_path, parties: list, job: dict, log_dir, out=None):
        self.cluster, self.log_dir, self.out = cluster, Path(log_dir), out or sys.stdout
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers: dict = {}
        self.lock = threading.Lock()
        self._threads = []
        try:
            for name in parties:
                party = cluster.party(name)
                (status_path(self.log_dir, name)).unlink(missing_ok=True)
                log = self.log_dir / f"{name}.log"
                with open(log, "ab") as logf:
                    proc = launch("tuning.sfjob", ["--cluster", cluster_path, "--party", name, "--log-dir",
                                                   self.log_dir, "--job", json.dumps(job)],
                                  stdout=subprocess.PIPE, stderr=logf)
                w = Worker(party, proc, log, time.time())
                self.workers[name] = w
                prefix = f"[{name}] " if len(parties) > 1 and party.role != "data_owner" else ""
                t = threading.Thread(target=self._pump, args=(w, prefix), daemon=True)
                t.start()
                self._threads.append(t)
            (self.log_dir / "parties.json").write_text(json.dumps(
                {n: {"pid": w.proc.pid, "role": w.party.role, "ports": w.party.ports} for n, w in self.workers.items()},
                indent=2))
        except BaseException:
            self.close()
            raise

    def _pump(self, w: Worker, prefix: str):
        """Copy a worker's output here: the data owner's as it comes (its progress bar included),
        the others' with their name in front when several parties run here."""
        stream = w.proc.stdout
        at_line_start = True
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                return
            text = chunk.decode("utf-8", errors="replace")
            if prefix:
                parts = text.split("\n")
                text = "\n".join((prefix + s if (i > 0 or at_line_start) and s else s) for i, s in enumerate(parts))
                at_line_start = text.endswith("\n")
            with self.lock:
                try:
                    self.out.write(text)
                    self.out.flush()
                except (OSError, ValueError):
                    pass

    def wait(self) -> dict:
        """Until every worker has ended: the first abnormal end gives the others ``timeout_s`` plus
        a grace to end by themselves (their watchdogs), then the rest are killed. Returns the report."""
        bound = self.cluster.timeout_s + GRACE_S
        first_end = None
        while True:
            now = time.time()
            for w in self.workers.values():
                if w.ended is None and w.proc.poll() is not None:
                    w.ended = now
            live = [w for w in self.workers.values() if w.ended is None]
            if not live:
                break
            ended = [w for w in self.workers.values() if w.ended is not None]
            if ended and first_end is None:
                first_end = min(w.ended for w in ended)
            stalled = {(read_status(self.log_dir, w.party.name) or {}).get("peer") for w in ended
                       if (read_status(self.log_dir, w.party.name) or {}).get("kind") == "stalled"}
            if (first_end is not None and now - first_end > bound) or {w.party.name for w in live} <= stalled:
                # past the bound, or only parties that others found stalled are left: kill them
                for w in live:
                    w.killed = True
                kill_groups([w.proc for w in live], 3.0)
                continue
            time.sleep(0.1)
        for t in self._threads:
            t.join(timeout=5)
        report = self.report()
        (self.log_dir / "job.json").write_text(json.dumps(report, indent=2))
        return report

    def report(self) -> dict:
        """Per party: exit, status record, end time; and the job's outcome in one line (``error``)."""
        parties = {}
        for name, w in self.workers.items():
            st = read_status(self.log_dir, name)
            parties[name] = {"role": w.party.role, "pid": w.proc.pid, "returncode": w.returncode,
                             "exit": _describe_exit(w.returncode), "ended": w.ended, "killed": w.killed,
                             "status": st, "log": str(w.log)}
        return {"ok": all(p["returncode"] == 0 and (p["status"] or {}).get("kind") == "ok" for p in parties.values()),
                "error": explain(parties, self.cluster), "parties": parties}

    def close(self) -> None:
        """Kill whatever is left (every worker's process group) and reap it."""
        live = [w.proc for w in self.workers.values() if w.proc.poll() is None]
        kill_groups(live, 3.0)
        for w in self.workers.values():
            if w.ended is None and w.proc.poll() is not None:
                w.ended = time.time()
            if w.proc.stdout:
                try:
                    w.proc.stdout.close()
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


BLAMES = ("missing", "lost", "stalled", "failed")  # status kinds that name another party as the cause


def explain(parties: dict, cluster: SFCluster) -> str:
    """The job's outcome as one line, or "" when every party ended cleanly.

    The cause is found by following the blame in the status records (a party that reports a lost,
    stalled or failed peer points at it) to a party that blames nobody: killed, crashed, stalled,
    or failed on its own (its message). A data owner's own error (a tuning option, a checkpoint)
    is its message as it stands."""
    if all(p["returncode"] == 0 and (p["status"] or {}).get("kind") == "ok" for p in parties.values()):
        return ""
    blame = {n: p["status"]["peer"] for n, p in parties.items()
             if p["status"] and p["status"].get("kind") in BLAMES and p["status"].get("peer") in parties}
    abnormal = [n for n, p in parties.items() if p["returncode"] != 0 or (p["status"] or {}).get("kind") != "ok"]
    own = sorted((n for n in abnormal if (parties[n]["status"] or {}).get("kind") == "error"),
                 key=lambda n: (parties[n]["role"] != "data_owner", parties[n]["status"]["time"]))
    unrecorded = sorted((n for n in abnormal if not parties[n]["status"]), key=lambda n: parties[n]["ended"] or 1e18)
    if blame:  # follow the blame from the first party that reported another
        root = min(blame, key=lambda n: parties[n]["status"]["time"])
        seen = {root}
        while root in blame and blame[root] not in seen:
            root = blame[root]
            seen.add(root)
    else:  # nobody blames anybody: a party's own error, else a party that ended without a word
        root = (own + unrecorded + abnormal)[0]
    p = parties[root]
    st = p["status"] or {}
    who = f"party {root} ({p['role'].replace('_', ' ')})"
    if st.get("kind") == "error" and p["role"] == "data_owner":
        cause = st.get("message") or "failed"
        return cause  # the data owner's own error: a tuning option, a checkpoint, ...
    if st.get("kind") in ("error", "ended"):
        cause = f"{who} failed: {st.get('message') or 'see ' + p['log']}"
    elif st.get("kind") == "ok" and p["returncode"] == 0:
        cause = f"{who} ended normally, the others did not"
    elif p["killed"] and p["returncode"] is not None:
        cause = f"{who} stopped answering (the launcher killed it once the others had ended)"
    elif p["returncode"] is None:
        cause = f"{who} is still running but stopped answering"
    else:
        cause = f"{who} {_describe_exit(p['returncode'])}"
    reporters = sorted(n for n, b in blame.items() if b == root)
    others = [n for n in parties if n != root and not parties[n]["killed"]]
    if reporters:
        t0 = parties[root]["ended"] if not p["killed"] else None
        ends = [parties[n]["ended"] for n in others if parties[n]["ended"] is not None]
        when = f" within {max(0.0, max(ends) - t0):.1f}s" if ends and t0 is not None else ""
        cause += (f"; {', '.join(others)} stopped{when} ({reporters[0]}: "
                  f"{parties[reporters[0]]['status']['message']})")
    crashed = [f"{n} {_describe_exit(parties[n]['returncode']).split(';')[0]})" for n in parties
               if n != root and not parties[n]["status"] and (parties[n]["returncode"] or 0) < 0
               and not parties[n]["killed"]]
    if crashed:
        cause += f"; {', '.join(crashed)}"
    killed = [n for n in parties if n != root and parties[n]["killed"]]
    if killed:
        cause += f"; killed after {cluster.timeout_s + GRACE_S:g}s: {', '.join(killed)}"
    return cause
