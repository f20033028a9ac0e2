"""Cluster back end: one OS process per party, SPU runtimes linked over brpc.

    with ClusterBackend(bundle, policy) as be:      # launches the nodes locally, on free ports
        be.put("x", array)                          # a session (``session.Session``): values
        be.run("forward", {"rows": "x", ...}, ["y"])  # stay resident as shares on the parties; the
                                                    # model owner approved and compiled the program
        y = be.reveal("y")                          # opened here, at the data owner only, per approval and policy
        be.drop("x", "y")
        logits = be.forward(session_batch(be, prompts, words))  # encode.session_batch: the one-shot case
        be.costs[-1].parties                        # every compute party's traffic, per run

Process model (see ``tuning.transports.node``): one node process per compute party and one for the model
owner; this process is the data owner (the driver). At start the driver has every compute party
build its runtime, then asks the model owner to load its model and send share i of every weight
to compute party i (once; the shares stay resident). The model owner returns only the config and
the weights' shapes. The driver names each program it needs (``approval.Request``: a known
program, public shapes); the model owner builds, checks and compiles it and hands every compute
party the executable with its approval (``node.approve``), returning the digest. ``put`` makes
the shares of a value here and sends share i to party i; ``run`` sends the digest and every
party runs that approved executable on its resident variables, keeping the outputs resident and
returning only its own traffic (read from its own log); ``open`` has every party return its
share of one variable and reconstructs it here; ``drop`` deletes. Only the driver ever
reconstructs, and only what the approvals open; no compute node receives another party's share.

Where the nodes run is a deployment (``deployment``): without one the back end launches every
node here on free local ports (``LocalCluster``); with one (``--cluster FILE``) it drives the
nodes started there (``secptune node --cluster FILE --party NAME``) and launches nothing. Links:
every call to a node is mutual TLS with the deployment's pinned party certificates (``tls``); a
local cluster without them gets a fresh set in its log directory. A node runs
only its own named functions, and only for the roles that may call them (``node.FUNCTIONS``);
a compute node runs only executables the model owner approved and hands out its share only of
the outputs their approvals open, within the policy's caps (``compute_party.gate.Gate``). A refusal
(``rpc.PartyRefused``) leaves the session usable: nothing ran.

Failure: a party that dies or stops answering (a compute party or the model owner, whose presence
the session needs) makes the call raise :class:`PartyError` naming it, within about
``policy.timeout_s`` plus a few seconds (the driver pings every node while a call is in flight).
The driver then tells every surviving node why (``node.shutdown``: one log line naming the lost
party); launched nodes exit, and the launcher reaps them. The back end refuses further calls;
``secptune tune --resume`` (or ``--retries``) starts a new cluster and continues from the last
checkpoint. Trust model: semi-honest; see docs/threat-model.md.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import hashlib
import os
import signal
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..compute_party import state
from ..errors import UserError
from ..model_owner.models import ModelBundle, policy_execution
from ..programs import compile_session_program, param_names
from . import node, procs, tls, tlsgate
from .deployment import DATA_OWNER, Deployment, dump_deployment, load_deployment, local_deployment
from .cost import CallCost
from .rpc import NodeWatch, PartyError, PartyRefused, Peer, gather
from .rpc import ping as rpc_ping
from .session import Session


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


def _accepts(address: str) -> bool:
    """Whether something accepts TCP connections at host:port."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _tail(path: Path) -> str:
    return procs.log_tail(path, 15, "    ") or "    (no log)"


def check_ports_free(deployment) -> None:
    """UserError naming the first address or link of a launched node that something already
    listens on (before any node starts)."""
    for p in deployment.nodes:
        for what, a in (("address", p.node), ("link", p.link)):
            if not a:
                continue
            host, _, port = a.rpartition(":")
            s = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
            # as the servers bind: connections of a previous cluster in TIME_WAIT do not count,
            # a listener does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host.strip("[]"), int(port)))
            except OSError as e:
                raise UserError(f"port {port} ({p.name}'s {what} {a}) is not available: {e.strerror or e}; stop "
                                "what holds it or choose other ports in the deployment file") from None
            finally:
                s.close()


class LocalCluster:
    """Every node of a deployment (compute parties + model owner) as a child process of this one;
    given a policy, on free local ports (``deployment.local_deployment``).

    Each child runs ``python -m tuning.transports.node`` in its own process group, logs to
    ``log_dir/<party>.log`` and dies with this process (PR_SET_PDEATHSIG). ``close()`` (also at
    exit, on SIGTERM/SIGINT and leaving a ``with`` block) terminates, then kills, and reaps them.
    """

    def __init__(self, deployment, log_dir=None, startup_s: float = procs.STARTUP_S, model: str = "smollm2-135m"):
        if not isinstance(deployment, Deployment):
            deployment = local_deployment(deployment)
        check_ports_free(deployment.require("cluster"))
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="secptune-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # a throwaway local cluster gets throwaway keys (a new directory per launch, removed by close)
        self._key_dir = Path(tempfile.mkdtemp(prefix="keys-", dir=self.log_dir))
        self.deployment = dep = tls.with_local_keys(deployment, self._key_dir)
        self.policy = dep.policy
        self.ident = tls.identity(dep, DATA_OWNER)  # the launcher speaks as the data owner
        # the nodes read this policy object itself (a test's may differ from its file), named by the deployment
        self.deployment_path = dump_deployment(dep, self.log_dir / "deployment.yaml", self.log_dir / "policy.yaml")
        self.parties = dep.nodes
        self.procs: dict = {}
        self.closed = False
        _install_handlers()
        _LIVE.add(self)
        try:
            for p in self.parties:
                with open(self.log_dir / f"{p.name}.log", "ab") as log:
                    self.procs[p.name] = procs.launch(
                        "tuning.transports.node", ["--cluster", self.deployment_path, "--party", p.name, "--log-dir",
                                                   self.log_dir, *(["--model", model] if p.role == "model_owner" else [])],
                        stdout=log, stderr=subprocess.STDOUT)
            self.wait_ready(startup_s)
        except BaseException:
            self.close()
            raise

    def log_path(self, party: str) -> Path:
        return self.log_dir / f"{party}.log"

    def wait_ready(self, bound_s: float) -> None:
        """Return when every node answers a ping; PartyError (with the log tail) otherwise.

        A node is dialled only once its port accepts TCP connections, and then pinged with one
        call that keeps driving the TLS handshake (short pings on a channel that had dialled too
        early left gRPC's handshake stalled until its 20 s connect timeout, over and over)."""
        deadline = time.monotonic() + bound_s
        for p in self.parties:
            while True:
                code = self.procs[p.name].poll()
                if code is not None:
                    raise PartyError(f"party {p.name} ({p.node}) exited with code {code} during start-up; "
                                     f"log {self.log_path(p.name)}:\n{_tail(self.log_path(p.name))}")
                if _accepts(p.node):
                    break
                if time.monotonic() > deadline:
                    raise PartyError(f"party {p.name} ({p.node}) did not come up within {bound_s:g}s; "
                                     f"log {self.log_path(p.name)}:\n{_tail(self.log_path(p.name))}")
                time.sleep(0.2)
            peer = Peer(p.name, p.node, 2.0, self.ident)
            try:
                peer.call(rpc_ping, timeout=max(5.0, deadline - time.monotonic()))
            except PartyError as e:
                code = self.procs[p.name].poll()
                raise PartyError(f"{e} (during start-up{f', exit code {code}' if code is not None else ''}); "
                                 f"log {self.log_path(p.name)}:\n{_tail(self.log_path(p.name))}") from None
            finally:
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
        procs.kill_groups(list(self.procs.values()), grace_s)
        shutil.rmtree(self._key_dir, ignore_errors=True)
        tlsgate.remove_stale()  # the link sockets of nodes that were killed or crashed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_local_cluster(deployment, log_dir=None, model: str = "smollm2-135m") -> LocalCluster:
    """Launch a deployment's nodes (a policy's: on free ports) on this machine, the model owner's
    serving ``model``, and wait until they answer (``secptune cluster up``)."""
    return LocalCluster(deployment, log_dir, model=model)


# ------------------------------------------------------------------------------------ the backend
class ClusterBackend(Session):
    """The data owner's session on a cluster (see the module doc and ``session.Session``).

    ``bundle`` gives the config and tokenizer; the weights this session computes with are the
    model owner's, shared by its node, and the driver compiles from their shapes alone
    (``share_weights`` returns them). ``model`` is the name the model owner loads (default
    ``bundle.name``). ``deployment`` (a Deployment or a file): the nodes already running there
    (``secptune node --cluster FILE``, ``cluster up``), driven under ``policy``: a node whose
    deployment differs (its policy included) refuses in one line. Without one, every node is
    launched here on free ports; ``launch`` overrides either default.

    Only ``bundle.name`` and ``bundle.tokenizer`` are read: ``transports.open_backend`` gives
    a bundle without weights (``params=None``), and the data owner's process never loads them.
    What it learns of the weights comes from the model owner's node, per the policy:
    ``embedding_stats()`` (shape and std of the embedding table, for the subspace's scale) always,
    and ``embedding_table()`` only under ``embedding: data_owner``.
    """

    name = "cluster"
    allows_unsafe_open = False  # real party processes: only the policy's reveals leave them

    def __init__(self, bundle, policy, model: str | None = None, launch: bool | None = None, log_dir=None,
                 deployment=None):
        import spu.api as spu_api
        from spu import spu_pb2

        self.policy, self.bundle, self.model = policy, bundle, model or bundle.name
        self.costs: list = []
        self.shapes: dict = {}
        self._marks: dict = {}
        self._vis = spu_pb2.Visibility.VIS_SECRET
        self._rc = policy.runtime_config(profile=True)
        self.io = spu_api.Io(policy.world_size, self._rc)
        self._table = None
        self._broken = ""
        self.peers, self.owner, self.cluster = [], None, None
        try:
            if isinstance(deployment, (str, Path)):
                deployment = load_deployment(deployment)
            launch = deployment is None if launch is None else launch
            dep = (deployment or local_deployment(policy)).require("cluster").with_policy(policy)
            if launch:
                self.cluster = start_local_cluster(dep, log_dir, self.model)
                dep = self.cluster.deployment  # with the local cluster's keys
            self.deployment = dep
            t = policy.timeout_s
            ident = tls.identity(dep, DATA_OWNER)  # we are the data owner
            self.peers = [Peer(p.name, p.node, t, ident) for p in dep.compute]
            self.owner = Peer(dep.model_owner.name, dep.model_owner.node, t, ident)
            self._all = [*self.peers, self.owner]
            self._watch = NodeWatch(self._all, t)  # the model owner's presence is part of the session
            config, shapes = self._setup()
            # the session compiles from the model owner's public metadata (config, weight shapes),
            # run as the policy says, as in every back end
            Session.__init__(self, ModelBundle(self.model, config, shapes, bundle.tokenizer,
                                               policy_execution(config, policy)), policy)
        except BaseException:
            self.close()
            raise

    def _setup(self):
        self._watch.start()
        # every party drops the previous session's link before any builds a new one: a new link
        # could otherwise handshake with a peer's old link, still listening on the same port
        view = self.deployment.view()
        gather([(peer, node.reset, (view,)) for peer in self.peers], self._watch)
        rc = self._rc.SerializeToString()
        links = [p.link for p in self.deployment.compute]
        gather([(peer, node.init_runtime, (r, links, rc, self.policy.timeout_s, view))
                for r, peer in enumerate(self.peers)], self._watch)
        compute = [(p.name, p.node) for p in self.deployment.compute]
        (meta,) = gather([(self.owner, node.share_weights, (self.model, rc, compute, self.policy.timeout_s))],
                         self._watch)
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
            return gather(jobs, self._watch)
        except PartyRefused:
            raise  # a party's rule: nothing ran, the session goes on
        except PartyError as e:
            self._broken = str(e)
            self._tell_survivors(str(e))
            raise

    def _tell_survivors(self, reason: str) -> None:
        """Best effort, after a failure: every node that still answers logs ``reason`` (naming the
        lost party) and, if launched, exits."""
        def tell(peer):
            try:
                peer.call(node.shutdown, reason, timeout=2.0)
            except PartyError:
                pass

        with concurrent.futures.ThreadPoolExecutor(len(self._all)) as pool:
            list(pool.map(tell, self._all))

    def _put(self, name: str, value) -> None:
        """Secret-share ``value`` here (the data owner) and send share i to compute party i."""
        shares = self.io.make_shares(value, self._vis)
        self._gather([(peer, node.put, (name, share)) for peer, share in zip(self.peers, shares)])

    def _compile(self, program, arg_shapes, out_keys):
        """A program of the caller's own: compiled here, and sent as bytes that every party refuses
        (the model owner approved no such digest)."""
        return compile_session_program(program, self._params_shapes, arg_shapes, out_keys).SerializeToString()

    def _approve(self, request):
        """The model owner builds, checks and compiles the program and hands it to the compute
        parties; we get its approval, and run it by digest."""
        (approval,) = self._gather([(self.owner, node.approve, (self.model, request))])
        return approval.digest, approval

    # set-up shares on the parties' disks: each node keeps its own, under its own state directory
    keeps_state = True

    def _open_state(self, root) -> None:
        ns = state.namespace(root)
        self._gather([(peer, node.state_open, (ns,)) for peer in self.peers])
        self.state = ns

    def _program_digest(self, compiled) -> str:
        return compiled if isinstance(compiled, str) else hashlib.sha256(compiled).hexdigest()

    def _kept(self, keys):
        return all(self._gather([(peer, node.state_has, (list(keys),)) for peer in self.peers]))

    def _keep(self, outs, keys):
        self._gather([(peer, node.state_keep, (list(outs), list(keys))) for peer in self.peers])

    def _restore(self, compiled, ins, outs, keys):
        names = (param_names(self._params_shapes) + list(ins), list(outs))
        self._gather([(peer, node.state_restore, (compiled, *names, list(keys))) for peer in self.peers])

    def _execute(self, compiled, ins, outs):
        """Every party runs the executable (an approved digest) on its resident variables ``ins``
        and keeps the outputs as ``outs``."""
        names = (param_names(self._params_shapes) + list(ins), list(outs))
        t0 = time.perf_counter()
        outs = self._gather([(peer, node.run, (compiled, *names)) for peer in self.peers])
        parties = {peer.name: cost for peer, (cost, _) in zip(self.peers, outs)}
        return CallCost(time.perf_counter() - t0, parties, outs[0][1])

    def _reconstruct(self, name: str, what: str | None) -> np.ndarray:
        """Reconstruct ``name`` here, at the data owner: the only place anything is opened. Each
        node checks that ``name`` is an output its approval opens as ``what``, within the cap."""
        if name not in self.shapes:
            raise KeyError(f"no resident variable {name!r}")
        shares = self._gather([(peer, node.get_share, (name, what or "")) for peer in self.peers])
        return np.asarray(self.io.reconstruct(shares), np.float32)

    def drop(self, *names: str) -> None:
        """The parties delete ``names``. After a failure this is a no-op (the cluster is unusable
        and must be restarted, which discards every variable), so a ``finally: drop(...)`` does
        not hide the failure."""
        for n in names:
            self.shapes.pop(n, None)
        self._unmark(*names)
        if names and not self._broken and self.peers:
            self._gather([(peer, node.drop, (list(names),)) for peer in self.peers])

    def node_info(self, party: str) -> dict:
        """Counters of a node (calls of share_weights / set_share / put / run / open, variables
        dropped), its pid and whether a run is in progress (``busy``)."""
        peer = next(p for p in self._all if p.name == party)
        return peer.call(node.info)

    def close(self):
        if getattr(self, "_watch", None) is not None:
            self._watch.stop()  # before the nodes go: their end is not a failure
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
