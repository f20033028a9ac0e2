"""The client half of a party link: calls from one process into a party's node (``node.py``).

``Peer`` runs a *named* node function on a node over gRPC (SPU's ppd ``NodeService`` messages)
with mutual TLS (``tls.Identity``: this process's party and the pinned certificates), a deadline,
cancellation and errors that name the party; ``gather`` runs calls on several nodes at once under
a :class:`NodeWatch` (``liveness.Watch`` with a ``ping`` per beat), so that a dead or hung party
fails the whole call with a :class:`PartyError` naming it. Used by the data owner's driver
(``cluster.ClusterBackend``) and by the model owner's node when it sends weight shares.

Wire format (both directions): a pickle read back by :func:`safe_loads`, which admits only plain
data (numbers, strings, bytes, lists, tuples, dicts, numpy arrays, SPU shares) and the few
project classes listed in ``SAFE_CLASSES``; a request is ``(function name, args)``, and a node
runs only its own functions of that name (never code it is sent), a reply is ``("ok", value)``,
``("refused", message)`` (a rule of the node: nothing ran, the session goes on) or
``("error", message)``.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
import pickle
import re
import threading

import grpc
from spu.utils import distributed_pb2, distributed_pb2_grpc
from spu.utils.distributed_impl import RPC, split_message

from ..errors import Refused, UserError
from .liveness import Beat, Lost, Stalled, Watch

# ppd's channel options, plus a short reconnect back-off (gRPC's default grows to minutes, which
# would make a node that is still starting look dead for a long time). Not "min_reconnect_backoff":
# gRPC takes it as the deadline of one connection attempt, and with TLS a channel that had dialled
# a node before it listened never completed a handshake once that was short
CHANNEL_OPTIONS = [*RPC.OPTIONS, ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]

# (module, name) a pickle on a party link may name: numpy's array and scalar reconstruction, SPU's
# share, and the project's plain data types (dataclasses of numbers, strings and tuples)
SAFE_CLASSES = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy", "float32"), ("numpy", "float64"), ("numpy", "int64"),
    ("numpy", "int32"), ("numpy", "bool_"),
    ("spu.libspu", "Share"),
    ("tuning.compute_party.traffic", "PartyCost"), ("tuning.model_owner.models", "EmbeddingStats"),
    ("tuning.model_owner.approval", "ProgramRef"), ("tuning.model_owner.approval", "Request"),
    ("tuning.model_owner.approval", "Approval"),
    ("spu_models.llama", "LlamaConfig"), ("spu_models.bert", "BertConfig"),
    ("jax._src.api", "ShapeDtypeStruct"), ("builtins", "slice"), ("builtins", "frozenset"), ("builtins", "set"),
    ("builtins", "complex"), ("collections", "OrderedDict"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE_CLASSES:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed on a party link")
        return super().find_class(module, name)


def safe_loads(data: bytes):
    """Unpickle ``data`` admitting only ``SAFE_CLASSES`` (pickle.UnpicklingError otherwise)."""
    return _SafeUnpickler(io.BytesIO(data)).load()


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=4)


def ping(server, payload=None) -> dict:
    """Run on a node: liveness check (``payload`` is ignored: the tests use it to send control bytes)."""
    return {"party": server.node_id, "role": server.role, "pid": os.getpid()}


class PartyError(UserError, RuntimeError):
    """A party died, is unreachable, stopped answering, or failed; the message names it."""


class PartyTimeout(PartyError):
    """A party did not answer within a call's deadline."""


class PartyRefused(PartyError, Refused):
    """A party refused a call by its rules (nothing ran, nothing left it); the session stays usable."""


# ------------------------------------------------------------------------------------ the client
class Peer:
    """A link to one party's node: mutual TLS as ``ident``, a deadline on every call,
    cancellation, and errors naming the party."""

    def __init__(self, name: str, address: str, timeout_s: float, ident):
        self.node_id, self.name, self.addr, self.timeout_s = name, name, address, timeout_s
        # the party's name is the TLS name checked against its pinned certificate
        opts = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)]
        self._channel = grpc.secure_channel(address, ident.channel_credentials(name), options=opts)
        self._stub = distributed_pb2_grpc.NodeServiceStub(self._channel)
        self._inflight: set = set()
        self._lock = threading.Lock()

    def __repr__(self):
        return f"party {self.name} ({self.addr})"

    def call(self, fn, *args, timeout: float | None = -1.0, cancellable: bool = True):
        """Run node function ``fn`` (by its name) there with ``args``; ``timeout`` None = no
        deadline, -1 = timeout_s. ``cancellable=False``: :meth:`cancel` leaves it alone (the
        watch's heartbeats, which must outlive a cancelled job)."""
        timeout = self.timeout_s if timeout == -1.0 else timeout
        fname = fn if isinstance(fn, str) else fn.__name__
        reqs = (distributed_pb2.RunRequest(data=chunk) for chunk in split_message(dumps((fname, args))))
        rpc = self._stub.RunReturn(reqs, timeout=timeout)
        with self._lock:
            if cancellable:
                self._inflight.add(rpc)
        try:
            data = b"".join(r.data for r in rpc)
        except grpc.RpcError as e:
            raise self._error(e, timeout) from None
        finally:
            with self._lock:
                self._inflight.discard(rpc)
        try:
            status, result = safe_loads(data)
        except Exception as e:  # noqa: BLE001  (a reply that is not ours)
            raise PartyError(f"{self} sent a reply that is not a result ({type(e).__name__}: {e})") from None
        if status == "refused":
            raise PartyRefused(f"{self} refused {fname}: {_summary(str(result))}")
        if status != "ok":
            raise PartyError(f"{self} failed in {fname}: {_summary(str(result))}")
        return result

    def _error(self, e: grpc.RpcError, timeout) -> PartyError:
        code, details = e.code(), " ".join(str(e.details() or "").split())
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return PartyTimeout(f"{self} did not answer within {timeout:g}s")
        if code == grpc.StatusCode.UNAVAILABLE:
            if "ssl" in details.lower() or "handshake" in details.lower() or "certificate" in details.lower():
                return PartyError(f"{self} failed the TLS handshake (not the pinned certificate of {self.name}, "
                                  f"or it refused ours): {details}")
            return PartyError(f"{self} is unreachable or died: {details}")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return PartyError(f"{self} refused the call: {details}")
        if code == grpc.StatusCode.CANCELLED:
            return PartyError(f"call to {self} was cancelled: {details}")
        return PartyError(f"{self} failed: {code.name} {details}")

    def cancel(self):
        with self._lock:
            for rpc in list(self._inflight):
                rpc.cancel()

    def close(self):
        self.cancel()
        self._channel.close()


def _summary(traceback_text: str) -> str:
    """The exception line of a remote traceback (SPU's C++ messages included), as one line."""
    lines = [s.strip() for s in traceback_text.split("stacktrace:")[0].splitlines() if s.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"[\w.]+(Error|Exception|Exit)\b", lines[i]):
            return " ".join(lines[i:])
    return lines[-1] if lines else traceback_text


class PingBeat(Beat):
    """A node's heartbeat for :class:`liveness.Watch`: its ``ping`` call, within the stall bound."""

    def __init__(self, peer: Peer):
        self.peer = peer

    def beat(self, stall_s: float) -> str:
        try:
            self.peer.call(ping, timeout=stall_s, cancellable=False)
        except PartyTimeout as e:
            raise Stalled(str(e)) from None
        except PartyError as e:
            raise Lost(str(e)) from None
        return "ok"


class NodeWatch:
    """The driver's watch over the nodes of its session (``liveness.Watch``, a ``ping`` per beat):
    the first node lost or stalled becomes :attr:`error` and cancels every call in flight, which
    :func:`gather` then fails with it."""

    def __init__(self, peers: list, timeout_s: float):
        self.peers, self.error = list(peers), None
        self._watch = Watch(self.peers, timeout_s, self._fatal, dial=PingBeat, startup_s=0, label=repr)

    def start(self) -> "NodeWatch":
        self.check()
        self._watch.start()
        return self

    def stop(self) -> None:
        self._watch.stop()

    def _fatal(self, kind: str, name: str, message: str) -> None:
        self.error = PartyError(message)
        for p in self.peers:
            p.cancel()

    def check(self) -> None:
        """One beat of every node, now; raise the first failure (in the nodes' order)."""
        if self.error is not None:
            raise self.error
        stall_s = self._watch.stall_s
        with concurrent.futures.ThreadPoolExecutor(len(self.peers)) as pool:
            futs = [pool.submit(p.call, ping, timeout=stall_s, cancellable=False) for p in self.peers]
            for f in futs:
                if f.exception() is not None:
                    raise f.exception()


def gather(jobs: list, watch: NodeWatch) -> list:
    """Run ``jobs`` = [(peer, fn, args)] concurrently (no deadline) and return their results.

    ``watch`` beats every node meanwhile, so a dead or hung party fails the whole call with a
    PartyError naming it. On any failure the other calls are cancelled.
    """
    pool = concurrent.futures.ThreadPoolExecutor(len(jobs))
    futs = [pool.submit(peer.call, fn, *args, timeout=None) for peer, fn, args in jobs]
    try:
        if watch.error is not None:
            raise watch.error
        pending = set(futs)
        while pending:
            done, pending = concurrent.futures.wait(pending, 0.1, concurrent.futures.FIRST_EXCEPTION)
            if watch.error is not None:
                raise watch.error
            failed = [f for f in done if f.exception() is not None]
            if failed:
                watch.check()  # a peer that died is the better culprit than its victims
                raise failed[0].exception()
        return [f.result() for f in futs]
    except BaseException:
        for peer, _, _ in jobs:
            peer.cancel()
        raise
    finally:
        pool.shutdown(wait=False)
