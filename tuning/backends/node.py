"""A party's process in a SecP-Tuning cluster.

    python -m tuning.backends.node --policy aby3 --party p0 [--log-dir DIR]

serves a gRPC node (SPU's ppd ``NodeService`` messages) at the party's ``address``, with mutual
TLS: only clients holding the key of a party certificate pinned in the cluster file get through,
and each may call only the functions its role may call (``FUNCTIONS``: the data owner drives
sessions, the model owner sends weight shares, compute parties may only ping); a request names a
function of this module and carries plain data (``rpc.safe_loads``), never code. Two kinds of
node, by the party's role in the policy:

- a **compute party** holds one SPU runtime, linked to the other compute parties over brpc
  (``init_runtime``). The model owner puts its weight shares there once (``set_share``), and the
  executables it approved (``admit``). The data owner then drives a session of resident
  variables: it stores its shares of new values (``put``), runs approved programs over the
  resident variables, whose outputs stay resident too (``run``, which returns only this party's
  traffic), asks for this party's share of a result it opens (``get_share``; only the data owner
  reconstructs, only what the approval opens, within the policy's cap) and deletes variables
  (``drop``). Each check is ``approval.Gate``'s.
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
import ctypes
import hashlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..assets.cache import secptune_home
from ..assets.models import EmbeddingStats, load_model, policy_execution
from ..errors import Refused, UserError
from ..policy import load_policy
from . import approval as approvals
from . import procs, state
from .cost import PartyCost, parse_profile
from .rpc import Peer, ping
from .spu_common import WEIGHT, param_names, shapes_of
from .state import PartyStore

ENV_RECORD = "SECPTUNE_RECORD_DIR"  # record every request payload (tests)


# ------------------------------------------------------------------------------------- servicer
def _flush_c_stdout():
    """Flush C stdio buffers (SPU's log lines) so the log file is complete."""
    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _make_servicer(policy, party: str, address: str, role: str, rank: int, ident, log_path: Path, record_path):
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

    roles = {p.name: "compute" for p in policy.compute}
    roles.update({policy.data_owner.name: "data_owner", policy.model_owner.name: "model_owner"})

    class PartyServicer(distributed_pb2_grpc.NodeServiceServicer):
        def __init__(self):
            self.node_id, self.address, self.policy, self.ident = party, address, policy, ident
            self.role, self.rank, self.log_path, self.record_path = role, rank, log_path, record_path
            self.run_lock, self._record_lock = threading.Lock(), threading.Lock()
            self._locals = {"counters": {"share_weights": 0, "set_share": 0, "put": 0, "run": 0, "open": 0,
                                         "drop": 0, "refused": 0, "approved": 0}}

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


def _find_party(policy, name: str):
    for rank, p in enumerate(policy.compute):
        if p.name == name:
            return p, "compute", rank
    if policy.model_owner.name == name:
        return policy.model_owner, "model_owner", -1
    known = [p.name for p in policy.compute] + [policy.model_owner.name]
    raise UserError(f"party {name!r} runs no node in policy {policy.name!r} (nodes: {', '.join(known)}; "
                     f"the data owner {policy.data_owner.name!r} is the driver)")


def cluster_view(policy) -> dict:
    """What every node and the driver must agree on: the parties, their addresses and links, and
    the settings that shape the protocol and what leaves it. (Certificates are checked by TLS.)"""
    return {"protocol": policy.protocol, "field": policy.field, "fxp_fraction_bits": policy.fxp_fraction_bits,
            "embedding": policy.embedding,
            "reveal": {k: {"to": to, **policy.caps.get(k, {})} for k, to in policy.reveal.items()},
            **{f"parties.compute[{i}]": f"{p.name} {p.address} link {p.link}" for i, p in enumerate(policy.compute)},
            "parties.data_owner": policy.data_owner.name,
            "parties.model_owner": f"{policy.model_owner.name} {policy.model_owner.address}"}


def check_view(server, view: dict) -> None:
    """Refuse a driver whose cluster file differs from this node's (one line naming the key)."""
    mine = cluster_view(server.policy)
    for k in sorted(set(mine) | set(view)):
        if mine.get(k) != view.get(k):
            raise UserError(f"{server.node_id}'s cluster file differs from the driver's at {k}: "
                            f"{mine.get(k)!r} here, {view.get(k)!r} at the driver")


def serve(policy, party_name: str, log_path: Path, record_path=None, model: str | None = None, state_dir=None):
    """Start ``party_name``'s node server (mutual TLS) and return it (and its servicer).
    ``model``: the one model a model owner's node serves (fixed here, never taken from a request)."""
    import grpc
    from spu.utils import distributed_impl as ppd
    from spu.utils import distributed_pb2_grpc

    from . import tls

    party, role, rank = _find_party(policy, party_name)
    ident = tls.identity(policy, party.name)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8), options=ppd.RPC.OPTIONS)
    servicer = _make_servicer(policy, party.name, party.address, role, rank, ident, log_path, record_path)
    servicer._locals["model"] = model
    servicer._locals["state_root"] = Path(state_dir) if state_dir else secptune_home() / "state" / party.name
    distributed_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)
    # any party's pinned certificate passes the handshake; FUNCTIONS then decides per call
    creds = ident.server_credentials([p.name for p in tls.all_parties(policy)])
    try:
        bound = server.add_secure_port(party.address, creds)
    except RuntimeError:
        bound = 0
    if not bound:
        raise UserError(f"node {party.name}: cannot listen on {party.address} (in use, or not an address of "
                        "this machine)")
    server.start()
    return server, servicer


def run_node(policy, party_name: str, log_dir=None, model: str | None = None, state_dir=None) -> None:
    """Serve ``party_name``'s node until killed. SPU's log (fd 1) and stderr go to LOGDIR/<party>.log.
    The model owner's node serves ``model`` and no other; a compute party keeps set-up shares
    under ``state_dir`` (default ``$SECPTUNE_HOME/state/<party>``)."""
    from spu.utils import distributed_impl as ppd

    from . import tls

    if isinstance(policy, (str, Path)):
        policy = load_policy(str(policy))
    party, role, rank = _find_party(policy, party_name)
    if role == "model_owner" and not model:
        raise UserError(f"node {party.name} is the model owner: give --model NAME, the one model it serves")
    tls.identity(policy, party.name)  # refuse to start without keys, before anything else
    procs.die_with_launcher(signal.SIGTERM)  # no orphans
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="secptune-node-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{party.name}.log"
    record = os.environ.get(ENV_RECORD)
    record_path = Path(record) / f"{party.name}.bin" if record else None
    if record_path:
        record_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"node {party.name} ({role}) at {party.address}; log {log_path}", flush=True)
    procs.log_fds_to(log_path)
    import logging

    # ppd's logger formats a field that only its own RPC.serve fills in
    ppd.logger = logging.LoggerAdapter(logging.getLogger(ppd.__name__), {"processNameCorrected": party.name})

    def _stop(signum, frame):  # a launcher's SIGTERM: one line, then out (no teardown that could hang)
        _log(f"node {party.name}: stopped by signal {signal.Signals(signum).name}")
        _flush_c_stdout()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, _stop)
    server, _ = serve(policy, party.name, log_path, record_path, model if role == "model_owner" else None, state_dir)
    print(f"node {party.name} ({role}, pid {os.getpid()}) serving at {party.address} (mutual TLS)", flush=True)
    server.wait_for_termination()


# --------------------------------------------------------------- functions run on the nodes
def _require(server, role: str):
    if server.role != role:
        raise PermissionError(f"{server.node_id} is a {server.role} node, not a {role} node")


def info(server) -> dict:
    """Identity, call counters, and whether a run is in progress (``busy``)."""
    return {**ping(server), **server._locals["counters"], "busy": server.run_lock.locked()}


def reset(server, view: dict | None = None) -> None:
    """Drop this compute party's runtime, link and executables (the weight shares go with them).
    ``view``: the driver's :func:`cluster_view`, refused (before anything is dropped) if it differs."""
    _require(server, "compute")
    if view is not None:
        check_view(server, view)
    with server.run_lock:
        for key in ("rt", "link", "gate"):
            server._locals.pop(key, None)


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
    if rank != server.rank or list(links) != [p.link for p in server.policy.compute]:
        raise ValueError(f"{server.node_id} is rank {server.rank} with links {[p.link for p in server.policy.compute]}, "
                         f"the driver thinks rank {rank} with {links}")
    reset(server)
    with server.run_lock:
        server._locals["gate"] = approvals.Gate(server.policy, server.node_id)  # approvals come with the session
        desc = libspu.link.Desc()
        desc.recv_timeout_ms = int(timeout_s * 1000)
        desc.http_timeout_ms = int(timeout_s * 1000)
        desc.connect_retry_interval_ms = 200
        desc.connect_retry_times = max(1, int(timeout_s * 5))
        desc.http_max_payload_size = 32 * 1024 * 1024
        for r, addr in enumerate(links):
            desc.add_party(f"r{r}", addr)
        tls.link_ssl(desc, server.policy, server.node_id, server.log_path.parent)
        link = libspu.link.create_brpc(desc, rank)
        rc = spu_pb2.RuntimeConfig()
        rc.ParseFromString(runtime_config)
        rc.enable_pphlo_profile = True  # every party logs its own traffic
        server._locals["link"] = link
        server._locals["rt"] = spu_api.Runtime(link, rc)


def _runtime(server):
    _require(server, "compute")
    if "rt" not in server._locals:
        raise RuntimeError(f"{server.node_id}: no runtime; the driver must call init_runtime first")
    return server._locals["rt"]


def _owner_writes(server, name: str, weights: bool) -> None:
    """Each input is written by the role that owns it: the model owner its weights only, the
    data owner (and a program's outputs) anything but a weight."""
    if bool(WEIGHT.fullmatch(str(name))) != weights:
        raise PermissionError(f"{server.node_id}: {str(name)[:40]!r} is " + ("not a weight; the model owner writes "
                              "weights only" if weights else "a weight; only the model owner writes it"))


def set_share(server, name: str, share) -> None:
    """Model owner -> compute party: store one weight share as runtime variable ``name`` (resident)."""
    _owner_writes(server, name, weights=True)
    rt = _runtime(server)
    with server.run_lock:
        rt.set_var(name, share)
    server._locals["counters"]["set_share"] += 1


def admit(server, approval, exe: bytes) -> None:
    """Model owner -> compute party: an executable it approved, with what of it may be opened
    (``approval.Gate.admit`` checks the digest and this node's own policy's caps)."""
    _runtime(server)
    with server.run_lock:
        server._locals["gate"].admit(approval, exe)
    server._locals["counters"]["approved"] += 1


def put(server, name: str, share) -> None:
    """Data owner -> compute party: store its share of a value as runtime variable ``name``.

    The variable stays resident until the data owner drops it (or the runtime is reset)."""
    _owner_writes(server, name, weights=False)
    rt = _runtime(server)
    with server.run_lock:
        rt.set_var(name, share)
        server._locals["gate"].forget(name)
    server._locals["counters"]["put"] += 1


def run(server, executable, input_names: list, output_names: list):
    """Run one approved program on this party's resident variables; return (its PartyCost, per-op table).

    ``executable`` is the sha256 hex digest of an executable the model owner approved (``admit``);
    bytes of one are taken by their digest. Anything else is refused, naming the digest, before
    anything runs. ``input_names`` / ``output_names`` bind it to this call's variables: it reads
    the weights (w0.., in order) and the data owner's variables, and writes its outputs as new
    resident variables, marked as its approval says (``get_share`` opens nothing else).
    """
    rt = _runtime(server)
    digest = hashlib.sha256(executable).hexdigest() if isinstance(executable, bytes) else str(executable)
    with server.run_lock:
        gate = server._locals["gate"]
        exe = gate.bind(digest, input_names, output_names)
        _flush_c_stdout()
        start = server.log_path.stat().st_size
        gate.forget(*exe.output_names)
        rt.run(exe)
        gate.ran(digest, exe.output_names)
        _flush_c_stdout()
        with open(server.log_path, "rb") as f:
            f.seek(start)
            links, ops = parse_profile(f.read().decode("utf-8", errors="replace"))
        server._locals["counters"]["run"] += 1
        return (links[-1] if links else PartyCost()), ops


def get_share(server, name: str, what: str):
    """This party's share of variable ``name``, for the data owner to reconstruct (``reveal``).

    Only the data owner may call it (``FUNCTIONS``), and only for an output its approved program
    opens as kind ``what``, of a kind this node's own policy reveals to the data owner, within
    that policy's cap (checked on the share's own shape). Weight shares, the data owner's own
    inputs, caches and every other output are refused."""
    rt = _runtime(server)
    with server.run_lock:
        share = rt.get_var(name) if name in server._locals["gate"].marks else None
        server._locals["gate"].check_open(name, what, approvals.share_shape(share) if share else ())
    server._locals["counters"]["open"] += 1
    return share


def drop(server, names: list) -> None:
    """Delete variables (absent ones are ignored)."""
    rt = _runtime(server)
    with server.run_lock:
        for name in names:
            server._locals["gate"].forget(name)
            try:
                rt.del_var(name)
            except Exception:  # noqa: BLE001  (absent, e.g. the output of a failed run)
                pass
    server._locals["counters"]["drop"] += len(names)


def _bundle(server, model_name: str):
    """The model this node serves, if the caller names it: a request never makes it load another
    (nor learn which paths exist on this host)."""
    served = server._locals.get("model")
    if model_name != served:
        raise PermissionError(f"{server.node_id} serves model {served!r}, not {str(model_name)[:80]!r}")
    if "bundle" not in server._locals:
        server._locals["bundle"] = load_model(served)
    return server._locals["bundle"]


@contextlib.contextmanager
def _compute_peers(server, timeout_s: float):
    """Model owner: links to every compute party of its own cluster file, and ``each(calls)``,
    which makes ``calls(i)`` = (node function, *args) on compute party i, on all at once."""
    peers = [Peer(p.name, p.address, timeout_s, server.ident) for p in server.policy.compute]
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
    """Model owner: load ``model_name``, send share i of every weight to compute party i.

    ``compute`` lists (name, address) of the compute nodes in rank order. Returns only public
    metadata: the config and the parameter tree of shapes (what compilation needs), never values.
    """
    import jax
    import spu.api as spu_api
    from spu import spu_pb2

    _require(server, "model_owner")
    bundle = _bundle(server, model_name)
    rc = spu_pb2.RuntimeConfig()
    rc.ParseFromString(runtime_config)
    io = spu_api.Io(len(compute), rc)
    if [(p.name, p.address) for p in server.policy.compute] != [tuple(c) for c in compute]:
        raise ValueError(f"{server.node_id}: the driver's compute parties {compute} are not this cluster file's")
    with _compute_peers(server, timeout_s) as each:
        for name, leaf in zip(param_names(bundle.params), jax.tree_util.tree_leaves(bundle.params)):
            shares = io.make_shares(np.asarray(leaf, np.float32), spu_pb2.Visibility.VIS_SECRET)
            each(lambda i: (set_share, name, shares[i]))  # noqa: B023  (called before the next leaf)
    server._locals["counters"]["share_weights"] += 1
    return {"config": bundle.config, "shapes": shapes_of(bundle.params)}


def approve(server, model_name: str, request) -> "approvals.Approval":
    """Model owner: build the program ``request`` names from its own registry, check it against
    this node's policy (its caps), compile it, and give every compute party the executable with
    its approval (``admit``). Returns the approval (public: the digest the data owner runs it
    by, what may be opened, shapes); the data owner never sends code. Compiled once per request."""
    _require(server, "model_owner")
    if not isinstance(request, approvals.Request):
        raise ValueError(f"{server.node_id}: not a program request")
    bundle = _bundle(server, model_name)
    cache = server._locals.setdefault("approved", {})
    if request not in cache:
        execution = policy_execution(bundle.config, server.policy)
        cache[request] = approvals.approve(bundle.config, execution, server.policy, shapes_of(bundle.params), request)
    approval, exe = cache[request]
    with _compute_peers(server, server.policy.timeout_s) as each:
        each(lambda i: (admit, approval, exe))
    return approval


def embedding_table(server, model_name: str) -> np.ndarray:
    """Model owner -> data owner, policy ``embedding: data_owner`` only: the token-embedding table.

    This reveals the table (a part of the weights) to the data owner; it is what that policy
    means. Under ``embedding: secret`` the driver never asks for it.
    """
    from spu_models.forward import embedding_table as table

    _require(server, "model_owner")
    if server.policy.embedding != "data_owner":  # this node's own policy decides, not the caller
        raise PermissionError(f"{server.node_id}: policy {server.policy.name!r} keeps the embedding table secret "
                              f"(embedding: {server.policy.embedding})")
    bundle = _bundle(server, model_name)
    return np.asarray(table(bundle.config, bundle.params), np.float32)


def embedding_stats(server, model_name: str):
    """Model owner -> data owner, every policy: the embedding table's shape and the std of its
    entries (three public numbers; the search subspace's scale). Not the table."""
    from spu_models.forward import embedding_table as table

    _require(server, "model_owner")
    bundle = _bundle(server, model_name)
    return EmbeddingStats.of(np.asarray(table(bundle.config, bundle.params), np.float32))


def shutdown(server, reason: str) -> None:
    """Data owner -> any node, after a party failed: log ``reason`` in one line and, under a
    launcher (``secptune tune/forward --backend cluster``, ``cluster up``), exit; a node started
    by hand drops its runtime and waits for the next session instead."""
    reason = " ".join(str(reason).split())[:300]
    if procs.under_launcher():
        _log(f"node {server.node_id}: error: {reason}; exiting")
        _flush_c_stdout()
        threading.Timer(0.2, os._exit, (3,)).start()  # after the reply has gone out
        return
    _log(f"node {server.node_id}: error: {reason}; dropping this session")
    if server.role == "compute" and server.run_lock.acquire(timeout=1.0):
        try:
            for key in ("rt", "link", "gate"):
                server._locals.pop(key, None)
        finally:
            server.run_lock.release()


# ------------------------------------------------------------- set-up shares on this party's disk
def state_open(server, namespace: str) -> None:
    """Keep this job's set-up shares under STATE_DIR/``namespace`` (a digest naming the run)."""
    _runtime(server)
    server._locals["store"] = PartyStore(server._locals["state_root"] / state.checked_key(namespace))


def _store(server) -> PartyStore:
    if "store" not in server._locals:
        raise RuntimeError(f"{server.node_id}: no state opened; the driver must call state_open first")
    return server._locals["store"]


def state_has(server, keys: list) -> bool:
    """Does this party hold a kept share under every one of ``keys``."""
    store = _store(server)
    return all(store.has(k) for k in keys)


def state_keep(server, names: list, keys: list) -> None:
    """File this party's shares of ``names`` (outputs of a run just made) under ``keys``."""
    rt, store = _runtime(server), _store(server)
    with server.run_lock:
        store.keep(rt, names, keys)


def state_restore(server, digest: str, input_names: list, output_names: list, keys: list) -> None:
    """As if the approved program ``digest`` ran on ``input_names``: its input checks, then its
    outputs' shares from this party's own disk, with the origins and marks its approval gives."""
    rt, store = _runtime(server), _store(server)
    with server.run_lock:
        gate = server._locals["gate"]
        exe = gate.bind(digest, input_names, output_names)
        gate.forget(*exe.output_names)
        store.restore(rt, exe.output_names, keys)
        gate.ran(digest, exe.output_names)


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
    ap = argparse.ArgumentParser(prog="python -m tuning.backends.node", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="policy name or YAML path (its parties give the addresses)")
    ap.add_argument("--party", required=True, help="a compute party or the model owner")
    ap.add_argument("--log-dir", default=None, help="SPU's log goes to LOGDIR/<party>.log")
    ap.add_argument("--model", default=None, help="the model owner's node: the one model it serves")
    ap.add_argument("--state-dir", default=None, help="a compute party's kept set-up shares "
                                                      "(default: $SECPTUNE_HOME/state/<party>)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        run_node(args.policy, args.party, args.log_dir, args.model, args.state_dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None


if __name__ == "__main__":
    # run from the importable module, so functions cloudpickled as ``tuning.backends.node.<fn>`` find the
    # same module state as this process's main
    from tuning.backends.node import main as _main

    _main()
