"""A party's process in a SecP-Tuning cluster.

    python -m tuning.backends.node --policy aby3 --party p0 [--log-dir DIR]

serves a gRPC node (SPU's ppd ``NodeServicer``: it runs cloudpickled ``fn(server, *args)``) at
the party's ``address``. Two kinds of node, by the party's role in the policy:

- a **compute party** holds one SPU runtime, linked to the other compute parties over brpc
  (``init_runtime``). The model owner puts its weight shares there once (``set_share``). The
  data owner then drives a session of resident variables: it stores its shares of new values
  (``put``), runs programs over the resident variables, whose outputs stay resident too (``run``,
  which returns only this party's traffic), asks for this party's share of a result it opens
  (``get_share``; only the data owner reconstructs) and deletes variables (``drop``).
- the **model owner** loads its model itself and secret-shares it straight to the compute parties
  (``share_weights``); the data owner only ever learns shapes and the config. Under policy
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
import ctypes
import hashlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..assets.models import EmbeddingStats, load_model
from ..errors import UserError
from ..policy import load_policy
from .cost import PartyCost, parse_profile
from .rpc import Peer, ping
from .spu_common import param_names

ENV_PARENT = "SECPTUNE_LAUNCHER_PID"  # set by a launcher: die with it
ENV_RECORD = "SECPTUNE_RECORD_DIR"  # record every request payload (tests)
PR_SET_PDEATHSIG = 1


# ------------------------------------------------------------------------------------- servicer
def _flush_c_stdout():
    """Flush C stdio buffers (SPU's log lines) so the log file is complete."""
    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)


def _make_servicer(party: str, address: str, role: str, rank: int, log_path: Path, record_path):
    from spu.utils import distributed_pb2
    from spu.utils.distributed_impl import NodeServicer

    class PartyServicer(NodeServicer):
        """ppd's servicer plus this party's identity, a run lock and optional payload recording."""

        def __init__(self):
            super().__init__(party, {party: address})
            self.role, self.rank, self.log_path, self.record_path = role, rank, log_path, record_path
            self.run_lock, self._record_lock = threading.Lock(), threading.Lock()
            self._locals["counters"] = {"share_weights": 0, "set_share": 0, "put": 0, "run": 0, "open": 0,
                                        "drop": 0}

        def _recorded(self, req_itr):
            payload = b"".join(r.data for r in req_itr)
            if self.record_path:
                with self._record_lock, open(self.record_path, "ab") as f:
                    f.write(payload)
            return iter([distributed_pb2.RunRequest(data=payload)])

        def Run(self, req_itr, ctx):
            return super().Run(self._recorded(req_itr), ctx)

        def RunReturn(self, req_itr, ctx):
            return super().RunReturn(self._recorded(req_itr), ctx)

    return PartyServicer()


def _die_with_launcher():
    """When started by a launcher, get SIGTERM when it dies (no orphans)."""
    parent = os.environ.get(ENV_PARENT)
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the launcher died before prctl
        os._exit(1)


def _find_party(policy, name: str):
    for rank, p in enumerate(policy.compute):
        if p.name == name:
            return p, "compute", rank
    if policy.model_owner.name == name:
        return policy.model_owner, "model_owner", -1
    known = [p.name for p in policy.compute] + [policy.model_owner.name]
    raise UserError(f"party {name!r} runs no node in policy {policy.name!r} (nodes: {', '.join(known)}; "
                     f"the data owner {policy.data_owner.name!r} is the driver)")


def run_node(policy, party_name: str, log_dir=None) -> None:
    """Serve ``party_name``'s node until killed. SPU's log (fd 1) and stderr go to LOGDIR/<party>.log."""
    import grpc
    from spu.utils import distributed_impl as ppd
    from spu.utils import distributed_pb2_grpc

    if isinstance(policy, (str, Path)):
        policy = load_policy(str(policy))
    party, role, rank = _find_party(policy, party_name)
    _die_with_launcher()
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="secptune-node-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{party.name}.log"
    record = os.environ.get(ENV_RECORD)
    record_path = Path(record) / f"{party.name}.bin" if record else None
    if record_path:
        record_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"node {party.name} ({role}) at {party.address}; log {log_path}", flush=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    import logging

    # ppd's logger formats a field that only its own RPC.serve fills in
    ppd.logger = logging.LoggerAdapter(logging.getLogger(ppd.__name__), {"processNameCorrected": party.name})

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8), options=ppd.RPC.OPTIONS)
    servicer = _make_servicer(party.name, party.address, role, rank, log_path, record_path)
    distributed_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(party.address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise SystemExit(f"node {party.name}: cannot listen on {party.address}")
    server.start()
    print(f"node {party.name} ({role}, pid {os.getpid()}) serving at {party.address}", flush=True)
    server.wait_for_termination()


# --------------------------------------------------------------- functions run on the nodes
def _require(server, role: str):
    if server.role != role:
        raise PermissionError(f"{server.node_id} is a {server.role} node, not a {role} node")


def info(server) -> dict:
    """Identity, call counters, and whether a run is in progress (``busy``)."""
    return {**ping(server), **server._locals["counters"], "busy": server.run_lock.locked()}


def reset(server) -> None:
    """Drop this compute party's runtime, link and executables (the weight shares go with them)."""
    _require(server, "compute")
    with server.run_lock:
        for key in ("rt", "link", "exes"):
            server._locals.pop(key, None)


def init_runtime(server, rank: int, links: list, runtime_config: bytes, timeout_s: float) -> None:
    """Build this compute party's brpc-linked SPU runtime (a fresh link per driver session).

    Blocks until every compute party's link is up, so the driver calls all parties at once (after
    ``reset`` on all of them).
    A peer that stops answering makes ``run`` fail after ``timeout_s`` (brpc recv timeout).
    """
    import spu.api as spu_api
    from spu import libspu, spu_pb2

    _require(server, "compute")
    if rank != server.rank:
        raise ValueError(f"{server.node_id} is rank {server.rank}, the driver thinks {rank}")
    reset(server)
    with server.run_lock:
        server._locals["exes"] = {}
        desc = libspu.link.Desc()
        desc.recv_timeout_ms = int(timeout_s * 1000)
        desc.http_timeout_ms = int(timeout_s * 1000)
        desc.connect_retry_interval_ms = 200
        desc.connect_retry_times = max(1, int(timeout_s * 5))
        desc.http_max_payload_size = 32 * 1024 * 1024
        for r, addr in enumerate(links):
            desc.add_party(f"r{r}", addr)
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


def set_share(server, name: str, share) -> None:
    """Model owner -> compute party: store one weight share as runtime variable ``name`` (resident)."""
    rt = _runtime(server)
    with server.run_lock:
        rt.set_var(name, share)
    server._locals["counters"]["set_share"] += 1


def put(server, name: str, share) -> None:
    """Data owner -> compute party: store its share of a value as runtime variable ``name``.

    The variable stays resident until the data owner drops it (or the runtime is reset)."""
    rt = _runtime(server)
    with server.run_lock:
        rt.set_var(name, share)
    server._locals["counters"]["put"] += 1


def run(server, executable, input_names=None, output_names=None):
    """Run one program on this party's resident variables; return (its PartyCost, per-op table).

    ``executable`` is the serialized ExecutableProto, or the sha256 hex digest of one sent before;
    ``input_names`` / ``output_names`` bind it to this call's variables (default: its own names).
    It reads the weights (w0..) and the data owner's variables, and writes its outputs as new
    resident variables: nothing is deleted and no share is returned (``get_share`` does that, for
    the data owner's ``open``).
    """
    from spu import spu_pb2

    rt = _runtime(server)
    with server.run_lock:
        exes = server._locals["exes"]
        if isinstance(executable, bytes):
            key = hashlib.sha256(executable).hexdigest()
            exes[key] = spu_pb2.ExecutableProto.FromString(executable)
            executable = key
        if executable not in exes:
            raise KeyError(f"{server.node_id}: unknown executable {executable[:12]}; send its bytes first")
        exe = exes[executable]
        if input_names is not None:
            exe = spu_pb2.ExecutableProto(name=exe.name, code=exe.code, input_names=list(input_names),
                                          output_names=list(output_names))
        _flush_c_stdout()
        start = server.log_path.stat().st_size
        rt.run(exe)
        _flush_c_stdout()
        with open(server.log_path, "rb") as f:
            f.seek(start)
            links, ops = parse_profile(f.read().decode("utf-8", errors="replace"))
        server._locals["counters"]["run"] += 1
        return (links[-1] if links else PartyCost()), ops


def get_share(server, name: str):
    """This party's share of variable ``name``, for the data owner to reconstruct (``open``)."""
    rt = _runtime(server)
    with server.run_lock:
        share = rt.get_var(name)
    server._locals["counters"]["open"] += 1
    return share


def drop(server, names: list) -> None:
    """Delete variables (absent ones are ignored)."""
    rt = _runtime(server)
    with server.run_lock:
        for name in names:
            try:
                rt.del_var(name)
            except Exception:  # noqa: BLE001  (absent, e.g. the output of a failed run)
                pass
    server._locals["counters"]["drop"] += len(names)


def _bundle(server, model_name: str):
    cache = server._locals.setdefault("bundles", {})
    if model_name not in cache:
        cache.clear()
        cache[model_name] = load_model(model_name)
    return cache[model_name]


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
    peers = [Peer(name, addr, timeout_s) for name, addr in compute]
    leaves = jax.tree_util.tree_leaves(bundle.params)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(peers)) as pool:
            for name, leaf in zip(param_names(bundle.params), leaves):
                shares = io.make_shares(np.asarray(leaf, np.float32), spu_pb2.Visibility.VIS_SECRET)
                futs = [pool.submit(p.call, set_share, name, s) for p, s in zip(peers, shares)]
                for f in futs:
                    f.result()
    finally:
        for p in peers:
            p.close()
    server._locals["counters"]["share_weights"] += 1
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), bundle.params)
    return {"config": bundle.config, "shapes": shapes}


def embedding_table(server, model_name: str) -> np.ndarray:
    """Model owner -> data owner, policy ``embedding: data_owner`` only: the token-embedding table.

    This reveals the table (a part of the weights) to the data owner; it is what that policy
    means. Under ``embedding: secret`` the driver never asks for it.
    """
    from spu_models.forward import embedding_table as table

    _require(server, "model_owner")
    bundle = _bundle(server, model_name)
    return np.asarray(table(bundle.config, bundle.params), np.float32)


def embedding_stats(server, model_name: str):
    """Model owner -> data owner, every policy: the embedding table's shape and the std of its
    entries (three public numbers; the search subspace's scale). Not the table."""
    from spu_models.forward import embedding_table as table

    _require(server, "model_owner")
    bundle = _bundle(server, model_name)
    return EmbeddingStats.of(np.asarray(table(bundle.config, bundle.params), np.float32))


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tuning.backends.node", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="policy name or YAML path (its parties give the addresses)")
    ap.add_argument("--party", required=True, help="a compute party or the model owner")
    ap.add_argument("--log-dir", default=None, help="SPU's log goes to LOGDIR/<party>.log")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        run_node(args.policy, args.party, args.log_dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    # run from the importable module, so functions cloudpickled as ``tuning.backends.node.<fn>`` find the
    # same module state as this process's main
    from tuning.backends.node import main as _main

    _main()
