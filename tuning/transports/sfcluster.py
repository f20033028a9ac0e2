"""Whether the parties of a SecretFlow job are alive, and the processes that run them.

Where each party listens is its deployment file's ``secretflow`` section (``deployment``):
``address`` (SecretFlow's cross-silo link, ``brpc_link``: the control messages, the shares that
enter and leave the SPU device, the executables), ``spu`` (compute parties: the SPU runtimes' own
link), ``watch`` (the liveness heartbeats, :class:`Watchdog`), and the bind addresses
``listen`` / ``spu_listen`` / ``watch_listen``. Its compute parties are the SPU device's nodes,
its data owner and model owner PYU devices.

**Liveness** (:class:`Watchdog`, the SecretFlow carrier of ``liveness.Watch``, the loop the cluster
driver uses too): every party's process keeps a TCP connection to every other
party's ``watch`` port and pings it every second, under mutual TLS with the deployment's pinned
certificates (``tls.watch_tls``: a peer without one gets no byte). A party whose process ends closes its
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
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError
from .deployment import Deployment
from .deployment import Party as SFParty
from .liveness import Beat, Lost, Stalled, Watch
from .procs import STARTUP_S, kill_groups, launch
from .tlsgate import opens_with_hello, refuse, remove_stale

GOODBYE_S = 2.0  # bound on telling every watcher "." when leaving
GRACE_S = 10.0  # after the first party ends abnormally, how long past timeout_s the rest may take
EXIT_OK, EXIT_ERROR, EXIT_PEER = 0, 2, 3  # a worker's exit codes: done / its own error / a peer failed


class JobError(UserError):
    """A SecretFlow job failed; the message names the party that was lost or failed, and why."""


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

    def __init__(self, me: SFParty, peers: list, timeout_s: float, on_fatal, startup_s: float = STARTUP_S, *,
                 tls):
        self.me, self.peers, self.tls = me, list(peers), tls  # tls: tls.PinnedTLS
        # the client half: liveness.Watch, one link per peer's watch port
        self.watch = Watch(self.peers, timeout_s, on_fatal, self._dial, startup_s,
                           label=lambda p: f"party {p.name} ({p.watch})")
        self.up, self.done, self.stall_s = self.watch.up, self.watch.done, self.watch.stall_s
        self._tls_refused: dict = {}  # per peer: why its watch port's handshake failed, if it did
        self._leaving = threading.Event()
        self._conns: list = []  # the echo threads of authenticated watchers
        self._conns_lock = threading.Lock()
        self._server = None
        self._wake_r, self._wake_w = os.pipe()  # readable once leaving: wakes every echo thread

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
        self.watch.start()
        return self

    def wait_up(self, bound_s: float) -> bool:
        return self.watch.wait_up(bound_s)

    def wait_done(self, names: list, bound_s: float) -> list:
        """Wait until the parties ``names`` said goodbye (or ``bound_s``); the ones that did not."""
        return self.watch.wait_done(names, bound_s)

    def goodbye(self) -> None:
        """This party leaves in order: every party watching it hears so before the connection
        closes. Stops watching the others too."""
        self._leaving.set()
        self.watch.stop()
        os.write(self._wake_w, b".")  # each echo thread answers "." (one TLS connection, one thread)
        with self._conns_lock:
            threads, self._conns = self._conns, []
        deadline = time.monotonic() + GOODBYE_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._server is not None:
            self._server.close()

    def stop(self) -> None:
        """Stop watching (the process is about to end anyway)."""
        self.watch.stop()

    # -- the server half: answer every ping ("!", or "." once leaving)
    def _serve(self):
        while not self._leaving.is_set():
            try:
                raw, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(raw,), daemon=True, name="watch-echo").start()

    def _echo(self, raw):
        """Answer one watcher, once it proved to be a party (its pinned certificate), until either
        side leaves. Only this thread touches the TLS connection; goodbye wakes it (the pipe)."""
        try:
            if not opens_with_hello(raw, self.stall_s):  # OpenSSL would answer some garbage with an alert
                return refuse(raw)
            raw.settimeout(self.stall_s)
            conn = self.tls.server.wrap_socket(raw, server_side=True)
            conn.settimeout(None)
        except OSError:  # no pinned certificate, or silent
            raw.close()
            return
        with self._conns_lock:
            self._conns.append(threading.current_thread())
        try:
            while True:
                if not conn.pending() and self._wake_r in select.select([conn, self._wake_r], [], [])[0]:
                    break
                if not conn.recv(1):
                    return
                if self._leaving.is_set():
                    break
                conn.sendall(b"!")
            conn.sendall(b".")
            conn.shutdown(socket.SHUT_WR)  # kept open until the process ends: no reset before the "."
        except OSError:
            pass

    # -- the client half: dial one peer's watch port (liveness.Watch beats it)
    def _dial(self, peer: SFParty) -> "_WatchLink":
        raw = socket.create_connection(_split(peer.watch), timeout=1.0)  # OSError: not up yet
        raw.settimeout(self.stall_s)
        try:  # the peer must present its pinned certificate under its name
            sock = self.tls.client(peer.name).wrap_socket(raw, server_hostname=peer.name)
        except socket.timeout:  # connected, but its process does not answer
            raw.close()
            raise Stalled(f"party {peer.name} ({peer.watch}) stopped answering for {self.stall_s:g}s") from None
        except OSError as e:
            raw.close()
            if isinstance(e, ssl.SSLError):
                self._tls_refused[peer.name] = f"; its watch port failed the TLS handshake ({e.reason or e})"
            e.why = self._tls_refused.get(peer.name, "")
            raise
        sock.settimeout(self.stall_s)
        return _WatchLink(sock, peer)


class _WatchLink(Beat):
    """A beat is "?" answered by "!" (alive) or "." (leaving in order)."""

    def __init__(self, sock, peer: SFParty):
        self.sock, self.peer = sock, peer

    def beat(self, stall_s: float) -> str:
        where = f"party {self.peer.name} ({self.peer.watch})"
        try:
            self.sock.sendall(b"?")
            data = self.sock.recv(1)
        except socket.timeout:
            raise Stalled(f"{where} stopped answering for {stall_s:g}s") from None
        except OSError as e:
            data, err = b"", e.strerror or type(e).__name__
        else:
            err = "its process ended (connection closed)"
        if data == b".":
            return "done"
        if not data:
            raise Lost(f"{where} was lost: {err}")
        return "ok"

    def close(self) -> None:
        self.sock.close()


LINK_GRACE_S = 30.0  # past startup_s, for a peer that came up last to open its SecretFlow port


class LinkCheck:
    """This party's TLS links to its peers, checked from Python while SecretFlow waits for them in
    ``sf.init`` (brpc retries a failing handshake for ~10 s per try, 180 tries, and then names no
    peer): a peer's SecretFlow address and, between compute parties, its SPU address. What
    answers is classified (``tls.check_peer``): not TLS, another certificate, or a refusal of this
    party's certificate ends the process at once through ``on_wrong(peer, message)``. A port that
    refuses or closes at the handshake is retried (the peer may not be listening yet); a
    SecretFlow address still so ``startup_s + grace_s`` after the start ends it too (its SPU
    address comes up only after every party's ``sf.init``: SPU's link times that one)."""

    def __init__(self, me: SFParty, peers: list, tls, on_wrong, startup_s: float = STARTUP_S,
                 grace_s: float = LINK_GRACE_S):
        self.targets = [(p, "SecretFlow address", p.address) for p in peers]
        if me.role == "compute":
            self.targets += [(p, "SPU address", p.spu) for p in peers if p.role == "compute"]
        self.tls, self.on_wrong = tls, on_wrong  # tls: tls.PinnedTLS
        self.bound_s = startup_s + grace_s
        self.last: dict = {}  # address -> why it is not up yet
        self._up: set = set()  # kinds of port brpc has linked (no more checks)
        self._stop = threading.Event()

    def start(self) -> "LinkCheck":
        self.thread = threading.Thread(target=self._run, daemon=True, name="link-check")
        self.thread.start()
        return self

    def linked(self, what: str) -> None:
        """brpc's links to every peer's ``what`` are up (``sf.init`` returned): stop checking those."""
        self._up.add(what)

    def stop(self) -> None:
        self._stop.set()

    def _run(self):
        from .tls import check_peer

        left = list(self.targets)
        deadline = time.monotonic() + self.bound_s
        while not self._stop.is_set():
            left = [t for t in left if t[1] not in self._up]
            if not left:
                return
            if time.monotonic() > deadline:
                late = [(p, what, addr) for p, what, addr in left if what == "SecretFlow address"]
                if late:
                    peer, what, addr = late[0]
                    self.on_wrong(peer.name, f"party {peer.name}'s {what} {addr}: "
                                             f"{self.last.get(addr, 'no answer')}, for {self.bound_s:g}s")
                return
            for t in list(left):
                peer, what, addr = t
                state, why = check_peer(addr, self.tls.client(peer.name), peer.name)
                if self._stop.is_set():
                    return
                if what in self._up:  # sf.init returned while this one was checked
                    continue
                if state == "ok":
                    left.remove(t)
                    self.last.pop(addr, None)
                elif state == "wrong":
                    return self.on_wrong(peer.name, f"party {peer.name}'s {what} {addr}: {why}")
                else:
                    self.last[addr] = why
            self._stop.wait(1.0)

    def pending(self) -> str:
        """The links not up yet and why (for an error that ends SecretFlow's wait first)."""
        return "; ".join(f"party {p.name}'s {what} {addr}: {self.last[addr]}"
                         for p, what, addr in self.targets if addr in self.last)


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

    def __init__(self, cluster: Deployment, cluster_path, parties: list, job: dict, log_dir, out=None):
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
        remove_stale()  # the link sockets of parties that were killed or crashed
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


def explain(parties: dict, cluster: Deployment) -> str:
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
