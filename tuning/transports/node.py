"""A party's process in a SecP-Tuning cluster.

    python -m tuning.transports.node --cluster DEPLOYMENT --party p0 [--log-dir DIR]
    secptune node --cluster DEPLOYMENT --party p0        (the same, from the command line)

serves a gRPC node (SPU's ppd ``NodeService`` messages) at the party's ``cluster.address`` in the
deployment file, with mutual TLS: only clients holding the key of a party certificate pinned in
the deployment get through,
and each may call only the functions its role may call (``FUNCTIONS``: the data owner drives
sessions, the model owner sends weight shares, compute parties may only ping); a request names a
function of this module and carries plain data (``rpc.safe_loads``), never code. Two kinds of
node, by the party's role (its name in the deployment):

- a **compute party** holds one SPU runtime, linked to the other compute parties over brpc
  (``init_runtime``). The model owner puts its weight shares there once (``set_share``), and the
  executables it approved (``admit``). The data owner then drives a session of resident
  variables: it stores its shares of new values (``put``), runs approved programs over the
  resident variables, whose outputs stay resident too (``run``, which returns only this party's
  traffic), asks for this party's share of a result it opens (``get_share``; only the data owner
  reconstructs, only what the approval opens, within the policy's cap) and deletes variables
  (``drop``). Each is a call into its ``compute_party.ComputeParty``, whose gate checks it.
- the **model owner** loads its model itself and secret-shares it straight to the compute parties
  (``share_weights``); the data owner only ever learns shapes and the config. It builds and
  compiles every program the data owner names, and gives the compute parties the approved
  executable with what may be opened of it (``approve``). Under policy
  ``embedding: data_owner`` it also hands the data owner the token-embedding table
  (``embedding_table``): that table leaks to the data owner, which is exactly what that policy
  trades for speed (the embedding lookup then happens in the clear at the data owner).

The data owner is the driver process (``cluster.ClusterBackend``, the client half in ``rpc``); it
runs no node.

SPU's C++ log (profile lines with each run's traffic) goes to the process's stdout, which a node
points at ``LOGDIR/<party>.log``; ``run`` reads its own traffic back from the new part of that
file. With ``SECPTUNE_RECORD_DIR`` set, every request payload a node receives is appended raw to
``<dir>/<party>.bin`` (the privacy tests search those bytes for secrets).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import os
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..cache import secptune_home
from ..compute_party.party import ComputeParty
from ..compute_party.traffic import LogTraffic, flush_c_stdout
from ..errors import Refused, UserError
from ..model_owner.owner import ModelOwner
from ..policy import view_differences
from . import procs, tlsgate
from .deployment import DeploymentError, load_deployment
from .tlsgate import TLSGate
from .rpc import Peer, ping



# ------------------------------------------------------------------------------------- servicer
def _log(msg: str) -> None:
    print(msg, flush=True)


def _make_servicer(deployment, party: str, address: str, role: str, rank: int, ident, log_path: Path, record_path):
    """The node service: authenticated callers only, and each only for the calls its role may make.

    gRPC has already checked (mutual TLS) that the client holds the key of one of the pinned party
    certificates; here the caller is that party (``tls.caller_of``), the request is a node
    function's name and plain-data arguments (``rpc.safe_loads``: no code travels), and
    ``FUNCTIONS`` says which role may call it on which kind of node. Everything else is refused
    with PERMISSION_DENIED and a log line."""
    import grpc
    from spu.utils import distributed_pb2, distributed_pb2_grpc
    from spu.utils.distributed_impl import split_message

    from . import tls
    from .rpc import dumps, safe_loads

    roles = {p.name: p.role for p in deployment.parties}

    class PartyServicer(distributed_pb2_grpc.NodeServiceServicer):
        def __init__(self):
            self.node_id, self.address, self.ident = party, address, ident
            self.deployment, self.policy = deployment, deployment.policy
            self.role, self.rank, self.log_path, self.record_path = role, rank, log_path, record_path
            self._record_lock = threading.Lock()
            self._locals = {"counters": {"share_weights": 0, "refused": 0}}

        def _refuse(self, ctx, caller, what: str, why: str = ""):
            self._locals["counters"]["refused"] += 1
            why = f" ({why})" if why else ""
            _log(f"node {party}: refused {what} from {caller or 'an unknown client'}{why}")
            ctx.abort(grpc.StatusCode.PERMISSION_DENIED, f"{party} refuses {what} from {caller or 'you'}{why}")

        def RunReturn(self, req_itr, ctx):
            caller = tls.caller_of(ctx, self.ident)
            if caller is None:  # require_client_auth makes this unreachable; kept as a second lock
                self._refuse(ctx, None, "a call")
            payload = b"".join(r.data for r in req_itr)
            if self.record_path:
                with self._record_lock, open(self.record_path, "ab") as f:
                    f.write(payload)
            try:
                fname, args = safe_loads(payload)
                if not isinstance(fname, str) or not isinstance(args, tuple):
                    raise ValueError("not a (function, args) request")
            except Exception as e:  # noqa: BLE001
                self._refuse(ctx, caller, "a request that is not plain data", f"{type(e).__name__}: {e}")
            entry = FUNCTIONS.get(fname)
            if entry is None:
                self._refuse(ctx, caller, f"unknown call {fname[:40]!r}")
            fn, node_role, callers = entry
            if node_role not in ("any", self.role):
                self._refuse(ctx, caller, fname, f"this is a {self.role} node")
            if roles.get(caller) not in callers:
                self._refuse(ctx, caller, fname, f"only the {' or '.join(callers)} may call it")
            try:
                reply = ("ok", fn(self, *args))
            except (Refused, PermissionError) as e:  # a rule of this node: nothing ran, nothing left
                self._locals["counters"]["refused"] += 1
                _log(f"node {party}: refused {fname} from {caller}: {e}")
                reply = ("refused", f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001  (the caller gets the error line, the log the traceback)
                import traceback

                _log(f"node {party}: {fname} from {caller} failed:\n{traceback.format_exc()}")
                reply = ("error", f"{type(e).__name__}: {e}")
            for chunk in split_message(dumps(reply)):
                yield distributed_pb2.RunResponse(data=chunk)

        def Run(self, req_itr, ctx):  # ppd's object-reference variant: not offered
            self._refuse(ctx, tls.caller_of(ctx, self.ident), "Run")
            yield from ()

    return PartyServicer()


def _find_party(deployment, name: str):
    p = deployment.party(name)
    if p.role == "data_owner":
        raise DeploymentError(f"{deployment.source}: party {name!r} is the data owner, the driver: it runs no node "
                              f"(nodes: {', '.join(q.name for q in deployment.nodes)})")
    return p, p.role, p.rank


def cluster_view(deployment) -> dict:
    """What every node and the driver must agree on (``Deployment.view``)."""
    return deployment.view()


def check_view(server, view: dict) -> None:
    """Refuse a driver whose deployment differs from this node's (one line naming the key)."""
    mine = cluster_view(server.deployment)
    for k in view_differences(mine, view)[:1]:
        raise UserError(f"{server.node_id}'s deployment differs from the driver's at {k}: "
                        f"{mine.get(k)!r} here, {view.get(k)!r} at the driver")


def serve(deployment, party_name: str, log_path: Path, record_path=None, model: str | None = None, state_dir=None):
    """Start ``party_name``'s node server (mutual TLS) and return it (and its servicer).
    ``model``: the one model a model owner's node serves (fixed here, never taken from a request)."""
    import grpc
    from spu.utils import distributed_impl as ppd
    from spu.utils import distributed_pb2_grpc

    from . import tls

    party, role, rank = _find_party(deployment, party_name)
    ident = tls.identity(deployment, party.name)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8), options=ppd.RPC.OPTIONS)
    servicer = _make_servicer(deployment, party.name, party.node, role, rank, ident, log_path, record_path)
    if role == "model_owner":
        servicer._locals["owner"] = ModelOwner(deployment.policy, model)
    servicer._locals["state_root"] = Path(state_dir) if state_dir else secptune_home() / "state" / party.name
    distributed_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)
    # any party's pinned certificate passes the handshake; FUNCTIONS then decides per call
    creds = ident.server_credentials([p.name for p in deployment.parties])
    try:
        bound = server.add_secure_port(party.node, creds)
    except RuntimeError:
        bound = 0
    if not bound:
        raise UserError(f"node {party.name}: cannot listen on {party.node} (in use, or not an address of "
                        "this machine)")
    server.start()
    return server, servicer


def run_node(deployment, party_name: str, log_dir=None, model: str | None = None, state_dir=None) -> None:
    """Serve ``party_name``'s node until killed. SPU's log (fd 1) and stderr go to LOGDIR/<party>.log.
    The model owner's node serves ``model`` and no other; a compute party keeps set-up shares
    under ``state_dir`` (default ``$SECPTUNE_HOME/state/<party>``)."""
    from spu.utils import distributed_impl as ppd

    from . import tls

    if isinstance(deployment, (str, Path)):
        deployment = load_deployment(deployment)
    party, role, rank = _find_party(deployment.require("cluster"), party_name)
    if role == "model_owner" and not model:
        raise UserError(f"node {party.name} is the model owner: give --model NAME, the one model it serves")
    tls.identity(deployment, party.name)  # refuse to start without keys, before anything else
    procs.die_with_launcher(signal.SIGTERM)  # no orphans
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="secptune-node-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{party.name}.log"
    record_path = procs.record_path(party.name)
    print(f"node {party.name} ({role}) at {party.node}; log {log_path}", flush=True)
    procs.log_fds_to(log_path)
    import logging

    # ppd's logger formats a field that only its own RPC.serve fills in
    ppd.logger = logging.LoggerAdapter(logging.getLogger(ppd.__name__), {"processNameCorrected": party.name})

    def _stop(signum, frame):  # a launcher's SIGTERM: one line, then out (no teardown that could hang)
        _log(f"node {party.name}: stopped by signal {signal.Signals(signum).name}")
        flush_c_stdout()
        tlsgate.stop_all()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
    server, _ = serve(deployment, party.name, log_path, record_path, model if role == "model_owner" else None,
                      state_dir)
    print(f"node {party.name} ({role}, pid {os.getpid()}) serving at {party.node} (mutual TLS)", flush=True)
    server.wait_for_termination()


# --------------------------------------------------------------- functions run on the nodes
# Each is a thin call into this node's role: ``compute_party.ComputeParty`` on a compute node,
# ``model_owner.ModelOwner`` on the model owner's. FUNCTIONS says who may call which.
def _require(server, role: str):
    if server.role != role:
        raise PermissionError(f"{server.node_id} is a {server.role} node, not a {role} node")


def info(server) -> dict:
    """Identity, call counters, and whether a run is in progress (``busy``)."""
    party = server._locals.get("party")
    counters = {**server._locals["counters"], **(party.counters if party else {})}
    return {**ping(server), **counters, "busy": bool(party and party.lock.locked())}


def reset(server, view: dict | None = None) -> None:
    """Drop this compute party's runtime, link and executables (the weight shares go with them).
    ``view``: the driver's :func:`cluster_view`, refused (before anything is dropped) if it differs."""
    _require(server, "compute")
    if view is not None:
        check_view(server, view)
    _drop_session(server)


def _drop_session(server) -> None:
    party = server._locals.pop("party", None)
    if party is not None:
        with party.lock:
            server._locals.pop("link", None)
    _close_link_gate(server)


def _close_link_gate(server) -> None:
    gate = server._locals.pop("link_gate", None)
    if gate is not None:
        gate.stop()


def init_runtime(server, rank: int, links: list, runtime_config: bytes, timeout_s: float, view: dict) -> None:
    """Build this compute party's brpc-linked SPU runtime (a fresh link per driver session).

    ``view`` is the driver's :func:`cluster_view`; a driver whose cluster file differs from this
    node's is refused. The link uses TLS between the compute parties (``tls.link_ssl``).
    Blocks until every compute party's link is up, so the driver calls all parties at once (after
    ``reset`` on all of them).
    A peer that stops answering makes ``run`` fail after ``timeout_s`` (brpc recv timeout).
    """
    import spu.api as spu_api
    from spu import libspu, spu_pb2

    from . import tls

    _require(server, "compute")
    check_view(server, view)
    mine = [p.link for p in server.deployment.compute]
    if rank != server.rank or list(links) != mine:
        raise ValueError(f"{server.node_id} is rank {server.rank} with links {mine}, "
                         f"the driver thinks rank {rank} with {links}")
    reset(server)
    desc = libspu.link.Desc()
    desc.recv_timeout_ms = int(timeout_s * 1000)
    # a short per-message timeout, after which yacl sends the message again: see tls.BRPC_MESSAGE_TIMEOUT_S
    desc.http_timeout_ms = int(min(tls.BRPC_MESSAGE_TIMEOUT_S, timeout_s) * 1000)
    desc.connect_retry_interval_ms = 200
    desc.connect_retry_times = max(1, int(timeout_s * 5))
    desc.http_max_payload_size = tls.BRPC_PIECE_BYTES
    # brpc answers plaintext on a TLS port: this process listens on the link's address and passes
    # only TLS on to brpc, which listens on a private Unix socket (its own entry; peers dial ours)
    gate = server._locals["link_gate"] = TLSGate(links[rank], f"party {server.node_id}'s SPU link").start()
    for r, addr in enumerate(links):
        desc.add_party(f"r{r}", gate.backend if r == rank else addr)
    tls.link_ssl(desc, server.deployment, server.node_id, server.log_path.parent)
    try:
        link = libspu.link.create_brpc(desc, rank)
    except BaseException:
        _close_link_gate(server)
        raise
    rc = spu_pb2.RuntimeConfig()
    rc.ParseFromString(runtime_config)
    rc.enable_pphlo_profile = True  # every party logs its own traffic
    server._locals["link"] = link
    server._locals["party"] = ComputeParty(server.node_id, server.policy, spu_api.Runtime(link, rc),
                                           LogTraffic(server.log_path), server._locals["state_root"])


def _party(server) -> ComputeParty:
    _require(server, "compute")
    if "party" not in server._locals:
        raise RuntimeError(f"{server.node_id}: no runtime; the driver must call init_runtime first")
    return server._locals["party"]


def set_share(server, name: str, share) -> None:
    """Model owner -> compute party: one weight share, resident."""
    _party(server).set_weight(name, share)


def admit(server, approval, exe: bytes) -> None:
    """Model owner -> compute party: an executable it approved, with what of it may be opened."""
    _party(server).admit(approval, exe)


def put(server, name: str, share) -> None:
    """Data owner -> compute party: its share of a value, resident until dropped."""
    _party(server).put(name, share)


def run(server, executable, input_names: list, output_names: list):
    """Run one approved program (by its sha256 digest; bytes of one are taken by their digest) on
    this party's resident variables; return (its PartyCost, per-op table)."""
    digest = hashlib.sha256(executable).hexdigest() if isinstance(executable, bytes) else str(executable)
    return _party(server).run(digest, input_names, output_names)


def get_share(server, name: str, what: str):
    """This party's share of an output its approval opens as ``what``, for the data owner."""
    return _party(server).share_of(name, what)


def drop(server, names: list) -> None:
    """Delete variables (absent ones are ignored)."""
    _party(server).drop(names)


def _owner(server, model_name: str) -> ModelOwner:
    _require(server, "model_owner")
    server._locals["owner"].bundle(model_name)  # refuses a model it does not serve
    return server._locals["owner"]


@contextlib.contextmanager
def _compute_peers(server, timeout_s: float):
    """Model owner: links to every compute party of its own deployment, and ``each(calls)``,
    which makes ``calls(i)`` = (node function, *args) on compute party i, on all at once."""
    peers = [Peer(p.name, p.node, timeout_s, server.ident) for p in server.deployment.compute]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(peers)) as pool:
            def each(calls):
                for f in [pool.submit(p.call, *calls(i)) for i, p in enumerate(peers)]:
                    f.result()
            yield each
    finally:
        for p in peers:
            p.close()


def share_weights(server, model_name: str, runtime_config: bytes, compute: list, timeout_s: float) -> dict:
    """Model owner: send share i of every weight to compute party i. ``compute`` lists (name,
    address) of the compute nodes in rank order. Returns only the config and the weights' shapes."""
    import spu.api as spu_api
    from spu import spu_pb2

    owner = _owner(server, model_name)
    rc = spu_pb2.RuntimeConfig()
    rc.ParseFromString(runtime_config)
    io = spu_api.Io(len(compute), rc)
    if [(p.name, p.node) for p in server.deployment.compute] != [tuple(c) for c in compute]:
        raise ValueError(f"{server.node_id}: the driver's compute parties {compute} are not this deployment's")
    with _compute_peers(server, timeout_s) as each:
        for name, value in owner.weights():
            shares = io.make_shares(value, spu_pb2.Visibility.VIS_SECRET)
            each(lambda i: (set_share, name, shares[i]))  # noqa: B023  (called before the next leaf)
    server._locals["counters"]["share_weights"] += 1
    meta = owner.meta()
    return {"config": meta["config"], "shapes": meta["shapes"]}


def approve(server, model_name: str, request):
    """Model owner: approve and compile the program ``request`` names and give every compute party
    the executable with its approval (``admit``). Returns the approval (public)."""
    approval, exe = _owner(server, model_name).approve(request)
    with _compute_peers(server, server.policy.timeout_s) as each:
        each(lambda i: (admit, approval, exe))
    return approval


def embedding_table(server, model_name: str) -> np.ndarray:
    """Model owner -> data owner, under this node's policy ``embedding: data_owner`` only."""
    return _owner(server, model_name).embedding_table()


def embedding_stats(server, model_name: str):
    """Model owner -> data owner: the embedding table's shape and std, not the table."""
    return _owner(server, model_name).embedding_stats()


def shutdown(server, reason: str) -> None:
    """Data owner -> any node, after a party failed: log ``reason`` in one line and, under a
    launcher (``secptune tune/forward --backend cluster``, ``cluster up``), exit; a node started
    by hand drops its runtime and waits for the next session instead."""
    reason = " ".join(str(reason).split())[:300]
    if procs.under_launcher():
        _log(f"node {server.node_id}: error: {reason}; exiting")
        flush_c_stdout()
        threading.Timer(0.2, lambda: (tlsgate.stop_all(), os._exit(3))).start()  # after the reply has gone out
        return
    _log(f"node {server.node_id}: error: {reason}; dropping this session")
    party = server._locals.get("party")
    if server.role == "compute" and party is not None and party.lock.acquire(timeout=1.0):
        try:
            server._locals.pop("party", None)
            server._locals.pop("link", None)
            _close_link_gate(server)
        finally:
            party.lock.release()


# ------------------------------------------------------------- set-up shares on this party's disk
def state_open(server, namespace: str) -> None:
    """Keep this job's set-up shares under STATE_DIR/``namespace`` (a digest naming the run)."""
    _party(server).open_state(namespace)


def state_has(server, keys: list) -> bool:
    return _party(server).has(keys)


def state_keep(server, names: list, keys: list) -> None:
    _party(server).keep(names, keys)


def state_restore(server, digest: str, input_names: list, output_names: list, keys: list) -> None:
    _party(server).restore(digest, input_names, output_names, keys)


# name -> (function, the kind of node it runs on, the roles that may call it). Nothing else runs.
ANYONE = ("data_owner", "model_owner", "compute")
FUNCTIONS = {
    "ping": (ping, "any", ANYONE),
    "info": (info, "any", ("data_owner",)),
    "shutdown": (shutdown, "any", ("data_owner",)),
    "reset": (reset, "compute", ("data_owner",)),
    "init_runtime": (init_runtime, "compute", ("data_owner",)),
    "put": (put, "compute", ("data_owner",)),
    "run": (run, "compute", ("data_owner",)),
    "get_share": (get_share, "compute", ("data_owner",)),
    "drop": (drop, "compute", ("data_owner",)),
    "state_open": (state_open, "compute", ("data_owner",)),
    "state_has": (state_has, "compute", ("data_owner",)),
    "state_keep": (state_keep, "compute", ("data_owner",)),
    "state_restore": (state_restore, "compute", ("data_owner",)),
    "set_share": (set_share, "compute", ("model_owner",)),
    "admit": (admit, "compute", ("model_owner",)),
    "share_weights": (share_weights, "model_owner", ("data_owner",)),
    "approve": (approve, "model_owner", ("data_owner",)),
    "embedding_table": (embedding_table, "model_owner", ("data_owner",)),
    "embedding_stats": (embedding_stats, "model_owner", ("data_owner",)),
}


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tuning.transports.node", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", required=True, help="deployment file (or a shipped name): the policy, every "
                                                     "party's addresses and certificates")
    ap.add_argument("--party", required=True, help="a compute party or the model owner")
    ap.add_argument("--log-dir", default=None, help="SPU's log goes to LOGDIR/<party>.log")
    ap.add_argument("--model", default=None, help="the model owner's node: the one model it serves")
    ap.add_argument("--state-dir", default=None, help="a compute party's kept set-up shares "
                                                      "(default: $SECPTUNE_HOME/state/<party>)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        run_node(args.cluster, args.party, args.log_dir, args.model, args.state_dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None


if __name__ == "__main__":
    # run from the importable module, so functions cloudpickled as ``tuning.transports.node.<fn>`` find the
    # same module state as this process's main
    from tuning.transports.node import main as _main

    _main()
