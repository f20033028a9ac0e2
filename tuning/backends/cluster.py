"""Cluster back end: one OS process per party, SPU runtimes linked over brpc.

    with ClusterBackend(bundle, policy) as be:      # launches the nodes locally (launch=True)
        be.put("x", array)                          # a session (``session.Session``): values
        be.run(program, {"x": "x"}, ["y"])          # stay resident as shares on the parties
        y = be.reveal("y")                          # opened here, at the data owner only, per policy
        be.drop("x", "y")
        logits = be.forward(be.make_batch(prompts, words))  # the one-shot special case
        be.costs[-1].parties                        # every compute party's traffic, per run

Process model (see ``tuning.backends.node``): one node process per compute party and one for the model
owner; this process is the data owner (the driver). At start the driver has every compute party
build its runtime, then asks the model owner to load its model and send share i of every weight
to compute party i (once; the shares stay resident). The model owner returns only the config and
the weights' shapes, from which the driver compiles every program. ``put`` makes the shares of
a value here and sends share i to party i; ``run`` sends the executable (its bytes the first
time a party needs it, then its hash) and every party runs it on its resident variables, keeping
the outputs resident and returning only its own traffic (read from its own log); ``open`` has
every party return its share of one variable and reconstructs it here; ``drop`` deletes. Only
the driver ever reconstructs, and only what it opens; no compute node receives another party's share.

Failure: a party that dies or stops answering makes the call raise :class:`PartyError` naming it,
within about ``policy.timeout_s`` plus a few seconds (the driver pings every node while a call
is in flight). The surviving compute parties give up on their own: their run fails after the
brpc receive timeout (``timeout_s``), or, when their link's send retries run out first (~9 s),
yacl aborts the process. Either way the cluster must be restarted; the back end refuses further
calls. Trust model: ppd's, semi-honest; nodes and driver exchange pickles, so run nodes only
for parties you trust to follow the protocol.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..assets.models import ModelBundle, policy_execution
from ..policy import Party, dump_policy
from . import node
from .cost import CallCost
from .rpc import PartyError, Peer, check_alive, gather
from .rpc import ping as rpc_ping
from .session import Session
from .spu_common import compile_session_program, param_names

REPO = Path(__file__).absolute().parents[2]
STARTUP_S = 60.0  # bound on a launched node's start-up (imports jax and spu)


# ---------------------------------------------------------------------------------- local cluster
_LIVE: set = set()
_PREV_HANDLERS: dict = {}
_INSTALLED = False


def _close_all():
    for c in list(_LIVE):
        c.close()


def _on_signal(signum, frame):
    _close_all()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers():
    global _INSTALLED
    if _INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    _INSTALLED = True
    atexit.register(_close_all)
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.getsignal(sig)
        if prev not in (signal.SIG_IGN, None):  # an ignored signal stays ignored
            _PREV_HANDLERS[sig] = prev
            signal.signal(sig, _on_signal)


def free_policy(policy, host: str = "127.0.0.1"):
    """``policy`` with every party's address (and link) on a free local port."""
    socks = []

    def addr():
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        return f"{host}:{s.getsockname()[1]}"

    try:
        compute = [Party(p.name, addr(), addr()) for p in policy.compute]
        return policy.with_parties(compute, Party(policy.data_owner.name, addr()),
                                   Party(policy.model_owner.name, addr()))
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    lines = [s for s in lines if "entropy source" not in s]
    return "\n".join("    " + s for s in lines[-n:]) or "(empty log)"


class LocalCluster:
    """Every node of ``policy`` (compute parties + model owner) as a child process of this one.

    Each child runs ``python -m tuning.backends.node`` in its own process group, logs to
    ``log_dir/<party>.log`` and dies with this process (PR_SET_PDEATHSIG). ``close()`` (also at
    exit, on SIGTERM/SIGINT and leaving a ``with`` block) terminates, then kills, and reaps them.
    """

    def __init__(self, policy, log_dir=None, startup_s: float = STARTUP_S):
        self.policy = policy
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="secptune-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.policy_path = dump_policy(policy, self.log_dir / "cluster.yaml")
        self.parties = [*policy.compute, policy.model_owner]
        self.procs: dict = {}
        self.closed = False
        env = dict(os.environ, SECPTUNE_LAUNCHER_PID=str(os.getpid()))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.setdefault("JAX_PLATFORMS", "cpu")
        _install_handlers()
        _LIVE.add(self)
        try:
            for p in self.parties:
                with open(self.log_dir / f"{p.name}.log", "ab") as log:
                    self.procs[p.name] = subprocess.Popen(
                        [sys.executable, "-m", "tuning.backends.node", "--policy", str(self.policy_path),
                         "--party", p.name, "--log-dir", str(self.log_dir)],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                        start_new_session=True)
            self.wait_ready(startup_s)
        except BaseException:
            self.close()
            raise

    def log_path(self, party: str) -> Path:
        return self.log_dir / f"{party}.log"

    def wait_ready(self, bound_s: float) -> None:
        """Return when every node answers a ping; PartyError (with the log tail) otherwise."""
        waiting = {p.name: Peer(p.name, p.address, 2.0) for p in self.parties}
        deadline = time.monotonic() + bound_s
        try:
            while waiting:
                for name, peer in list(waiting.items()):
                    code = self.procs[name].poll()
                    if code is not None:
                        raise PartyError(f"party {name} ({peer.addr}) exited with code {code} during start-up; "
                                         f"log {self.log_path(name)}:\n{_tail(self.log_path(name))}")
                    try:
                        peer.call(rpc_ping, timeout=1.0)
                        waiting.pop(name).close()
                    except PartyError:
                        pass
                if waiting and time.monotonic() > deadline:
                    name = next(iter(waiting))
                    raise PartyError(f"party {name} ({waiting[name].addr}) did not come up within {bound_s:g}s; "
                                     f"log {self.log_path(name)}:\n{_tail(self.log_path(name))}")
                if waiting:
                    time.sleep(0.2)
        finally:
            for peer in waiting.values():
                peer.close()

    def wait(self) -> None:
        """Block until a node exits (PartyError naming it), ``close()`` or an interrupt."""
        while not self.closed:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise PartyError(f"party {name} exited with code {proc.returncode}; "
                                     f"log {self.log_path(name)}:\n{_tail(self.log_path(name))}")
            time.sleep(0.5)

    def close(self, grace_s: float = 5.0) -> None:
        """SIGTERM every node's process group, SIGKILL what is left after ``grace_s``, reap all."""
        _LIVE.discard(self)
        self.closed = True
        procs = list(self.procs.values())
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            for proc in procs:
                for s in (sig, signal.SIGCONT):  # SIGCONT: a stopped node handles SIGTERM too
                    try:
                        os.killpg(proc.pid, s)  # start_new_session: pgid == pid
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + wait_s
            for proc in procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in procs):
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_local_cluster(policy, log_dir=None) -> LocalCluster:
    """Launch ``policy``'s nodes on this machine and wait until they answer (``secptune cluster up``)."""
    return LocalCluster(policy, log_dir)


# ------------------------------------------------------------------------------------ the backend
class ClusterBackend(Session):
    """The data owner's session on a cluster (see the module doc and ``session.Session``).

    ``bundle`` gives the config and tokenizer; the weights this session computes with are the
    model owner's, shared by its node, and the driver compiles from their shapes alone
    (``share_weights`` returns them). ``model`` is the name the model owner loads (default
    ``bundle.name``). ``launch=False`` connects to nodes already running at the policy's
    addresses (``secptune cluster up`` / ``secptune node``).

    Only ``bundle.name`` and ``bundle.tokenizer`` are read: ``backends.open_backend`` gives
    a bundle without weights (``params=None``), and the data owner's process never loads them.
    What it learns of the weights comes from the model owner's node, per the policy:
    ``embedding_stats()`` (shape and std of the embedding table, for the subspace's scale) always,
    and ``embedding_table()`` only under ``embedding: data_owner``.
    """

    name = "cluster"
    allows_unsafe_open = False  # real party processes: only the policy's reveals leave them

    def __init__(self, bundle, policy, model: str | None = None, launch: bool = True, log_dir=None):
        import spu.api as spu_api
        from spu import spu_pb2

        self.policy, self.bundle, self.model = policy, bundle, model or bundle.name
        self.costs: list = []
        self.shapes: dict = {}
        self._vis = spu_pb2.Visibility.VIS_SECRET
        self._rc = policy.runtime_config(profile=True)
        self.io = spu_api.Io(policy.world_size, self._rc)
        self._sent: set = set()  # (party, executable digest) the party already holds
        self._table = None
        self._broken = ""
        self.peers, self.owner, self.cluster = [], None, None
        try:
            if launch:
                self.cluster = start_local_cluster(policy, log_dir)
            t = policy.timeout_s
            self.peers = [Peer(p.name, p.address, t) for p in policy.compute]
            self.owner = Peer(policy.model_owner.name, policy.model_owner.address, t)
            self._all = [*self.peers, self.owner]
            config, shapes = self._setup()
            # the session compiles from the model owner's public metadata (config, weight shapes),
            # run as the policy says, as in every back end
            Session.__init__(self, ModelBundle(self.model, config, shapes, bundle.tokenizer,
                                               policy_execution(config, policy)), policy)
        except BaseException:
            self.close()
            raise

    def _setup(self):
        check_alive(self._all)
        # every party drops the previous session's link before any builds a new one: a new link
        # could otherwise handshake with a peer's old link, still listening on the same port
        gather([(peer, node.reset, ()) for peer in self.peers], self._all)
        rc = self._rc.SerializeToString()
        links = [p.link for p in self.policy.compute]
        gather([(peer, node.init_runtime, (r, links, rc, self.policy.timeout_s)) for r, peer in enumerate(self.peers)],
               self._all)
        compute = [(p.name, p.address) for p in self.policy.compute]
        (meta,) = gather([(self.owner, node.share_weights, (self.model, rc, compute, self.policy.timeout_s))],
                         self._all)
        return meta["config"], meta["shapes"]

    # ---------------------------------------------------------------------------- data owner
    def embedding_table(self) -> np.ndarray:
        """Asked of the model owner once, under policy ``embedding: data_owner`` only."""
        if self.policy.embedding != "data_owner":
            return Session.embedding_table(self)  # raises: the policy keeps the table secret
        if self._table is None:
            self._table = self.owner.call(node.embedding_table, self.model)
        return self._table

    def embedding_stats(self):
        return self.owner.call(node.embedding_stats, self.model)

    def _gather(self, jobs: list) -> list:
        """``gather`` over the compute parties; a failure makes the back end refuse further calls."""
        if self._broken:
            raise PartyError(f"cluster unusable after an earlier failure: {self._broken}")
        if not self.peers:
            raise RuntimeError("the cluster back end is closed")
        try:
            return gather(jobs, self.peers)
        except PartyError as e:
            self._broken = str(e)
            raise

    def put(self, name: str, value) -> None:
        """Secret-share ``value`` here (the data owner) and send share i to compute party i."""
        value = np.asarray(value, np.float32)
        shares = self.io.make_shares(value, self._vis)
        self._gather([(peer, node.put, (name, share)) for peer, share in zip(self.peers, shares)])
        self.shapes[name] = value.shape

    def _compile(self, program, arg_shapes, out_keys):
        exe = compile_session_program(program, self._params_shapes, arg_shapes, out_keys).SerializeToString()
        return exe, hashlib.sha256(exe).hexdigest()

    def _execute(self, compiled, ins, outs):
        """Every party runs the executable on its resident variables ``ins`` and keeps the outputs
        as ``outs`` (the executable's bytes go to a party once, then its hash)."""
        exe, digest = compiled
        names = (param_names(self._params_shapes) + list(ins), list(outs))
        t0 = time.perf_counter()
        outs = self._gather([(peer, node.run, (digest if (peer.name, digest) in self._sent else exe, *names))
                             for peer in self.peers])
        self._sent.update((peer.name, digest) for peer in self.peers)
        parties = {peer.name: cost for peer, (cost, _) in zip(self.peers, outs)}
        return CallCost(time.perf_counter() - t0, parties, outs[0][1])

    def _reconstruct(self, name: str) -> np.ndarray:
        """Reconstruct ``name`` here, at the data owner: the only place anything is opened."""
        if name not in self.shapes:
            raise KeyError(f"no resident variable {name!r}")
        shares = self._gather([(peer, node.get_share, (name,)) for peer in self.peers])
        return np.asarray(self.io.reconstruct(shares), np.float32)

    def drop(self, *names: str) -> None:
        """The parties delete ``names``. After a failure this is a no-op (the cluster is unusable
        and must be restarted, which discards every variable), so a ``finally: drop(...)`` does
        not hide the failure."""
        for n in names:
            self.shapes.pop(n, None)
        if names and not self._broken and self.peers:
            self._gather([(peer, node.drop, (list(names),)) for peer in self.peers])

    def node_info(self, party: str) -> dict:
        """Counters of a node (calls of share_weights / set_share / put / run / open, variables
        dropped), its pid and whether a run is in progress (``busy``)."""
        peer = next(p for p in self._all if p.name == party)
        return peer.call(node.info)

    def close(self):
        for peer in [*self.peers, *([self.owner] if self.owner else [])]:
            peer.close()
        self.peers, self.owner = [], None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
