"""SecretFlow back end: the tuning job as a SecretFlow application, one OS process per party.

    secptune sf-job local --policy aby3 -- --task mr --model tiny-llama ...        # all parties here
    secptune sf-job --cluster deployments/aby3.yaml --party p0 -- <same>         # one party, any host

Devices (SecretFlow 1.11 production mode, ``brpc_link``, no Ray): a PYU for the data owner
(its data, labels, search and losses), a PYU for the model owner (its weights), and an SPU device
over the policy's compute parties, with the policy's runtime config. Each party is a process
(``tuning.sfjob``) that calls :class:`SFJob`; the deployment file's ``secretflow`` section
(``deployment``) says where each listens.

**The SPMD constraint.** SecretFlow matches messages by sequence number, so every party must
make the same sequence of ``sf`` calls. Here the data owner's process drives the job: it runs
``tuning.data_owner.trainer.tune`` unchanged over :class:`SecretFlowBackend` (a ``Session``), and every
session operation is *announced* first: the data owner's PYU broadcasts a public descriptor (the
operation, variable names, shapes, an executable's digest), and then every party makes that
operation's ``sf`` calls (:meth:`SFJob.lead` at the data owner, :meth:`SFJob.follow` everywhere
else, both through one dispatcher, so the sequences cannot drift). The other parties never run
``tune``: they do not know the data, so they cannot know the next shape, the number of chunks
or when the search stops; they learn it from the descriptors, as the cluster back end's nodes
learn it from the driver's calls.

**Who computes and sees what**

- data owner (``alice`` in the shipped files): reads the task, tokenizes, chooses examples,
  draws the subspace A, runs CMA-ES / SPSA, computes the losses and the dev selection, in
  plaintext, in its own process only. It names each program it needs (an ``approval.Request``:
  a known program, public shapes); it never sends code. It puts its values
  (embeddings, masks, one-hot rows, ``A z``) on the SPU as shares (``PYU -> SPU``: shares are
  made in its process; compute party i gets share i only). It alone receives plaintext: the
  verbalizer logits it reveals (``SPU -> data owner PYU``: only its process gets the shares of a
  revealed value; never ``sf.reveal``, which would send them to every party), the embedding
  table under ``embedding: data_owner``, and each compute party's traffic counters.
- model owner (``bob``): loads the one model of its own command line (``ModelOwner``),
  publishes the public metadata (architecture config, weight shapes, the embedding table's shape
  and std: everybody receives these), and puts each weight on the SPU once (shares made in its
  process). The weights stay resident on the SPU for the whole job. It builds, checks against
  its own policy's caps and compiles every program the data owner requests, and the SPU nodes
  run its executable, never one of the data owner's.
- compute parties (``p0``..): run SPU's runtime on shares: the weights, the data owner's
  inputs, the resident prefix caches, every intermediate. Each keeps a ``Gate`` under its own
  cluster file's policy: it takes part in a run only of an executable the model owner approved
  (the weights bound in order, required inputs from the right programs), and sends its share of
  a value to the data owner only if that value's approval opens it, within the policy's cap. A
  refusal ends the job (an honest data owner checks the same before it announces anything).
- every party receives the descriptors (operation kinds, variable names such as
  ``train0_text``, shapes, executable digests, kept shares' digests) and SecretFlow's own public
  counts (share chunk counts); none but the data owner ever holds a label, a loss, z, A, a text
  or a plaintext prompt.

Kept set-up shares (``Session.keep_state``, as on a cluster node): each compute party files its
shares of the run's persisted set-up outputs under its own state root (default
``$SECPTUNE_HOME/state/<party>``), in the run's namespace, in ``PartyStore``'s format with each
share's origin. A function at that party (its PYU) moves a share between its SPU runtime
(``outfeed_share``/``infeed_share``) and its own files, so no share crosses the network; a restore
passes the same gate checks as a run, and each file must have been kept as that program's output.
The data owner learns only whether every party holds a digest (and its public chunk counts).

Costs: each compute party reads its own traffic from SPU's profile log after each run and sends
it to the data owner (``CallCost`` per run, every party measured, as in the cluster back end).

Failure: a party whose process ends or stops answering makes every other end within the
policy's ``timeout_s`` (``sfcluster.Watchdog``), each writing a status record that names it;
a failed operation at a party (an exception in its SecretFlow task) reaches the data owner as
SecretFlow's ``FedRemoteError`` and is reported naming that party. The job is then over: the
parties must be restarted, and ``--resume`` continues from the data owner's last checkpoint
(restoring the set-up from the shares the compute parties kept, not prefilling again).
"""
from __future__ import annotations

import builtins
import functools
import io
import os
import pickle
import time
from pathlib import Path

import numpy as np

from ..cache import secptune_home
from ..compute_party import state
from ..compute_party.gate import Gate, append_audit
from ..compute_party.traffic import LogTraffic
from ..errors import Refused, UserError
from ..model_owner.models import ModelBundle, policy_execution
from ..model_owner.owner import ModelOwner
from ..policy import view_differences
from ..programs import weight_names
from . import procs, tls
from .cost import CallCost
from .session import Session
from .deployment import Deployment
from .sfcluster import STARTUP_S, JobError, LinkCheck, Watchdog
from .tlsgate import TLSGate

PROTOCOL = 3  # version of the descriptors: a follower refuses a data owner that speaks another
BACKSTOP_S = 3600.0  # SecretFlow's own receive timeout: liveness is the watchdog's, not this

_JOB = None  # this process's party, when it runs one (tuning.sfjob sets it)


def current_job():
    return _JOB


def set_current_job(job) -> None:
    global _JOB
    _JOB = job


def _ident(x):
    return x


def _collect(*xs):
    return list(xs)


def _done(*_after):
    """True once ``_after`` (objects of this party) are ready: an acknowledgement to collect."""
    return True


# ------------------------------------------------------------- what runs inside one party's process
# (module-level: SecretFlow runs a PYU's function in that party's process, found by its name)
_OWNER: ModelOwner | None = None  # the model owner's process: the one model it serves
_TRAFFIC: LogTraffic | None = None  # a compute party's process: its own traffic


def serve_model(model: str, policy) -> None:
    """Model owner's process: the one model it serves, from its own command line, under its own
    cluster file's policy (which alone decides whether the embedding table leaves)."""
    global _OWNER
    _OWNER = ModelOwner(policy, model)


def _owner_meta(model: str) -> dict:
    """Model owner: what every party may know of the model the data owner names (public)."""
    _OWNER.bundle(model)  # refuses a model it does not serve
    return _OWNER.meta()


def _owner_leaf(i: int) -> np.ndarray:
    """Model owner: weight ``i`` (the executables' w<i>), to be shared."""
    return _OWNER.weights()[i][1]


def _owner_approve(request):
    """Model owner: (Approval, executable) of the known program ``request`` names (public)."""
    return _OWNER.approve(request)


def _exe_of(pair):
    """The approved executable itself, as SPU's nodes run it."""
    from spu import spu_pb2

    return spu_pb2.ExecutableProto.FromString(pair[1])


def _owner_table() -> np.ndarray:
    """Model owner -> data owner, under its policy ``embedding: data_owner`` only."""
    return _OWNER.embedding_table()


def _read_profile(_after):
    """Compute party, after a run (``_after``: one of its outputs, so this waits for it): its
    traffic and per-op table from the new part of its SPU log."""
    return _TRAFFIC.read()


# a compute party's kept set-up shares: its own files, read and written only in its own process
_STATE_ROOT: Path | None = None  # where it keeps them: <root>/<namespace of the run>
_STORE: state.PartyStore | None = None  # the run's, once the data owner opened it


def _state_open(namespace: str) -> bool:
    """Compute party: keep this run's set-up shares under STATE_ROOT/``namespace`` (0700)."""
    global _STORE
    _STORE = state.PartyStore(_STATE_ROOT / state.checked_key(namespace))
    return True


def _state_store() -> state.PartyStore:
    if _STORE is None:
        raise RuntimeError("no state opened; the data owner must open it first")
    return _STORE


def _state_has(keys: list):
    """Compute party: how many chunks its share under each of ``keys`` has (a public count, as
    SecretFlow's own), or None unless it holds every one."""
    store = _state_store()
    return [store.count(k) for k in keys] if all(store.has(k) for k in keys) else None


def _state_file(outfed, key: str, origin: bytes) -> bool:
    """Compute party: file its share (``SPURuntime.outfeed_share``'s (io info, *chunks), made
    here) under ``key``, with the origin its gate recorded."""
    info, *chunks = outfed
    _state_store().save(key, info.meta, chunks, origin)
    return True


def _state_load(key: str, origin: bytes, conf, n_chunks: int) -> tuple:
    """Compute party: (SPUValueMeta, SPUIOInfo, *chunks) of its share kept under ``key``, only if
    it was kept as ``origin``; the meta as ``SPURuntime.run`` makes it for an output."""
    from secretflow.device.device.spu import SPUIOInfo, SPUValueMeta
    from spu import spu_pb2
    from spu.utils.distributed import dtype_spu_to_np, shape_spu_to_np

    meta, chunks = _state_store().load_as(key, origin)
    if len(chunks) != n_chunks:
        raise Refused(f"kept share {key[:12]} has {len(chunks)} chunks, not the {n_chunks} announced")
    m = spu_pb2.ValueMetaProto.FromString(meta)
    value = SPUValueMeta(shape_spu_to_np(m.shape), dtype_spu_to_np(m.data_type), m.visibility, conf.protocol,
                         conf.field, conf.fxp_fraction_bits)
    return (value, SPUIOInfo(0, len(chunks), meta), *chunks)


def _first_line(e) -> str:
    text = str(e).strip() or type(e).__name__
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("stacktrace", "#")):
            return line[:400]
    return text.splitlines()[0][:400]


def job_error(e: BaseException):
    """An exception from SecretFlow's calls as a :class:`JobError` naming the party it came from
    (``peer``), or None when it is not one of SecretFlow's."""
    from secretflow.distributed.fed.exception import FedLocalError, FedRemoteError

    if isinstance(e, JobError):
        return e
    if isinstance(e, FedRemoteError):
        err = JobError(f"party {e._src_party} failed: {_first_line(e._cause)}")
        err.peer = e._src_party
        return err
    if isinstance(e, FedLocalError):
        return job_error(e.cause()) or JobError(_first_line(e.cause()))
    if isinstance(e, RuntimeError) and "timeout" in str(e).lower():
        return JobError(f"no message within SecretFlow's {BACKSTOP_S:g}s receive timeout: {_first_line(e)}")
    return None


class _RecordingLink:
    """SecretFlow's cross-silo link of this party, appending every message it receives to a file
    (``SECPTUNE_RECORD_DIR``: the privacy tests search those bytes for secrets)."""

    def __init__(self, link, path: Path):
        self._link, self._path = link, path
        path.parent.mkdir(parents=True, exist_ok=True)

    def recv(self, rank):
        data = self._link.recv(rank)
        with open(self._path, "ab") as f:
            f.write(bytes(data))
        return data

    def __getattr__(self, name):
        return getattr(self._link, name)


# ------------------------------------------------------------------ what a party decodes off the link
# SecretFlow decodes every message with a deny-list unpickler, and brpc accepts plaintext messages on
# a TLS port, so a stranger's forged pickle would reach it: each party decodes with this allow-list
# instead, (module, name) pairs seen on the link in real jobs (descriptors, metadata, shares,
# executables, costs, SecretFlow's own error wrapper) and nothing else
SF_ALLOWED = frozenset({
    ("secretflow.device.device.spu", "SPUIOInfo"), ("secretflow.device.device.spu", "SPUValueMeta"),
    ("secretflow.distributed.fed.exception", "FedRemoteError"), ("libspu.spu_pb2", "ExecutableProto"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "float32"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("jax._src.api", "ShapeDtypeStruct"), ("spu_models.llama", "LlamaConfig"), ("spu_models.bert", "BertConfig"),
    ("tuning.model_owner.approval", "Request"), ("tuning.model_owner.approval", "ProgramRef"),
    ("tuning.model_owner.approval", "Approval"), ("tuning.model_owner.models", "EmbeddingStats"),
    ("tuning.compute_party.traffic", "PartyCost"), ("tuning.errors", "UserError"), ("tuning.errors", "Refused"),
    ("tuning.transports.sfcluster", "JobError"),
})
ENV_PICKLE_TRACE = "SECPTUNE_PICKLE_TRACE"  # a file: admit anything the deny-list admits, log each class


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in SF_ALLOWED or (module == "builtins" and name in _EXCEPTIONS):
            return super().find_class(module, name)
        trace = os.environ.get(ENV_PICKLE_TRACE)
        if trace:
            with open(trace, "a") as f:
                f.write(f"{module} {name}\n")
            from secretflow.utils.secure_pickle import _PICKLE_BLACKLIST

            if name.lower() not in _PICKLE_BLACKLIST:  # SecretFlow's own deny-list still applies
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed on a SecretFlow link")


_EXCEPTIONS = frozenset(n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, Exception))


class _AllowListCodec:
    """Stands in for ``secretflow.utils.secure_pickle`` inside SecretFlow's brpc proxy."""

    def __init__(self, original):
        self.dumps = original.dumps
        self.FilterType = original.FilterType

    @staticmethod
    def loads(data, filter_type=None):
        return _AllowListUnpickler(io.BytesIO(data)).load()


def _decode_with_allow_list() -> None:
    from secretflow.distributed.fed.proxy.brpc_link import brpc_link

    if not isinstance(brpc_link.secure_pickle, _AllowListCodec):
        brpc_link.secure_pickle = _AllowListCodec(brpc_link.secure_pickle)


def _link_with_tls() -> None:
    """SecretFlow 1.11's brpc link fills in ``tls_config``'s certificates but never turns TLS on
    (``Desc.enable_ssl``): its messages went in plaintext. Every party turns it on before ``sf.init``
    (and refuses a link without TLS); the party's TLS-only gate would refuse a plaintext peer anyway."""
    from secretflow.distributed.fed.proxy.brpc_link import brpc_link

    cls = brpc_link.BrpcLinkProxy
    if getattr(cls.__init__, "secptune_tls", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not self._tls_config:
            raise JobError("SecretFlow's link needs TLS (tls_config); refusing a plaintext link")
        self._desc.enable_ssl = True

    __init__.secptune_tls = True
    cls.__init__ = __init__


# ----------------------------------------------------------------------------------- the party
class SFJob:
    """This process's party in a SecretFlow job: the devices, the resident SPU values, and the
    operations every party performs in the same order (see the module doc).

    ``on_fatal(kind, peer, message)`` ends the process when the watchdog finds a peer missing,
    lost or stalled, or the link check (kind "error") finds that what answers at a peer's link
    port is not that party over TLS. The constructor starts the watchdog and the link check, then
    ``sf.init`` (which waits for the other parties) and the SPU device. ``state_root``: where a
    compute party keeps set-up shares (default ``$SECPTUNE_HOME/state/<party>``, as a cluster
    node's)."""

    def __init__(self, cluster: Deployment, party: str, log_dir, on_fatal, startup_s: float = STARTUP_S,
                 state_root=None):
        global _STATE_ROOT
        self.cluster, self.me, self.policy = cluster, cluster.party(party), cluster.policy
        if self.me.role == "compute":
            _STATE_ROOT = Path(state_root) if state_root else secptune_home() / "state" / party
        self.leader = self.me.role == "data_owner"
        self.log_dir = Path(log_dir)
        self.vars: dict = {}  # resident variable name -> SPUObject
        self.weights: list = []  # SPUObject per weight leaf, resident for the job
        self.exes: dict = {}  # approved executable digest -> the model owner's PYUObject holding it
        self.gate = Gate(self.policy, party)  # what may run and open (the compute parties enforce it)
        self.out_shapes: dict = {}  # resident output -> its shape, from its approval
        self.meta: dict = {}
        self.broken = ""  # set when an operation failed half-way: the parties are out of step
        self.ops = 0
        peers = [p for p in cluster.parties if p.name != party]
        self.watchdog = Watchdog(self.me, peers, cluster.timeout_s, on_fatal, startup_s,
                                 tls=tls.watch_tls(cluster, party)).start()
        # what answers at each peer's link ports, while sf.init waits (brpc would retry a wrong one)
        self.links = LinkCheck(self.me, peers, self.watchdog.tls, lambda peer, msg: on_fatal("error", peer, msg),
                               startup_s).start()
        self._init_sf(startup_s)

    def _init_sf(self, startup_s: float) -> None:
        import secretflow as sf
        import spu.libspu.logging as spu_logging
        from google.protobuf import json_format

        t_ms = int(self.cluster.timeout_s * 1000)
        # brpc answers plaintext on a TLS port: this process listens on the party's SecretFlow and
        # SPU ports itself and passes only TLS on to brpc, which listens on a private Unix socket
        me = f"party {self.me.name}'s"
        self.gates = {"sf": TLSGate(self.me.listen or self.me.address, f"{me} SecretFlow address").start()}
        if self.me.role == "compute":
            self.gates["spu"] = TLSGate(self.me.spu_listen or self.me.spu, f"{me} SPU address").start()
        parties = {p.name: {"address": p.address} for p in self.cluster.parties}
        parties[self.me.name]["listen_addr"] = self.gates["sf"].backend  # peers dial the address
        rpc_ms = int(min(tls.BRPC_MESSAGE_TIMEOUT_S * 1000, 2 * t_ms))  # a short one: see tls.BRPC_MESSAGE_TIMEOUT_S
        comm = {"recv_timeout_ms": int(BACKSTOP_S * 1000), "http_timeout_ms": rpc_ms,
                "http_max_payload_size": tls.BRPC_PIECE_BYTES,
                "connect_retry_times": int(startup_s), "connect_retry_interval_ms": 1000,
                "exit_on_sending_failure": True}
        tls_config, spu_tls = self._tls()
        _decode_with_allow_list()
        _link_with_tls()
        try:
            sf.init(address="local", ray_mode=False, cluster_config={"parties": parties, "self_party": self.me.name},
                    cross_silo_comm_backend="brpc_link", cross_silo_comm_options=comm, job_name=self.cluster.job_name,
                    logging_level="info", tls_config=tls_config)
        except RuntimeError as e:  # SecretFlow names its own listen address and a rank here
            if "connect to mesh failed" not in str(e):
                raise
            raise JobError(f"SecretFlow's link did not come up within {startup_s:g}s: "
                           f"{self.links.pending() or _first_line(e)}") from None
        self.links.linked("SecretFlow address")
        self.sf = sf
        record = procs.record_path(self.me.name)
        if record:
            from secretflow.distributed.fed.global_context import get_global_context

            proxy = get_global_context()._proxy
            proxy._linker = _RecordingLink(proxy._linker, record)
        self.alice = sf.PYU(self.cluster.data_owner.name)
        self.bob = sf.PYU(self.cluster.model_owner.name)
        self.pyus = {p.name: sf.PYU(p.name) for p in self.cluster.parties}
        log_opts = spu_logging.LogOptions()
        log_opts.enable_console_logger = True  # SPU's profile lines go to stdout: this party's log
        log_opts.system_log_path = str(self.log_dir / f"{self.me.name}.spu.log")
        nodes = [{"party": p.name, "address": p.spu, **({"listen_address": self.gates["spu"].backend,
                                                          "tls_opts": spu_tls} if p.name == self.me.name else {})}
                 for p in self.cluster.compute]
        rc = json_format.MessageToDict(self.policy.runtime_config(profile=True), preserving_proto_field_name=True)
        link = {"recv_timeout_ms": 2 * t_ms, "http_timeout_ms": rpc_ms, "http_max_payload_size": tls.BRPC_PIECE_BYTES,
                "connect_retry_interval_ms": 500,
                "connect_retry_times": int(startup_s * 2)}
        self.spu = sf.SPU({"nodes": nodes, "runtime_config": rc}, link_desc=link, log_options=log_opts)
        assert [p.name for p in self.cluster.compute] == list(self.spu.actors), "SPU node order"
        if self.me.role == "compute":
            global _TRAFFIC
            _TRAFFIC = LogTraffic(self.log_dir / f"{self.me.name}.log")

    def _tls(self) -> tuple:
        """This party's TLS for SecretFlow's link (``sf.init``'s ``tls_config``) and, on a compute
        party, for the SPU link (its node's ``tls_opts``): its own certificate and key, and the
        pinned certificates of the parties it talks to as the only trust roots (no authority).
        A deployment that names no keys is refused (KeyFileError, one line)."""
        tls.identity(self.cluster, self.me.name)  # its key readable here, every party's certificate pinned
        cert, key = str(Path(self.me.cert).absolute()), str(Path(self.me.key).absolute())
        peers = tls.pinned_bundle(self.cluster, [p.name for p in self.cluster.parties],
                                  self.log_dir / f"sf-peers-{self.me.name}.pem")
        tls_config = {"cert": cert, "key": key, "ca_cert": str(peers.absolute())}
        if self.me.role != "compute":
            return tls_config, None
        links = tls.pinned_bundle(self.cluster, [p.name for p in self.cluster.compute],
                                  self.log_dir / f"spu-peers-{self.me.name}.pem")
        opts = {"certificate_path": cert, "private_key_path": key, "ca_file_path": str(links.absolute()),
                "verify_depth": 1}
        return tls_config, {"server_ssl_opts": dict(opts), "client_ssl_opts": dict(opts)}

    # --------------------------------------------------------------------- the control plane
    def lead(self, desc: dict, **payload):
        """Data owner: announce ``desc`` to every party, then perform it (with ``payload``: the
        values only this process holds). A failure half-way leaves the parties out of step: the
        job refuses further operations (``broken``)."""
        if self.broken:
            raise JobError(f"the job is unusable after an earlier failure: {self.broken}")
        import secretflow.distributed as sfd

        try:
            sfd.get(self.alice(_ident)(desc).data)  # the data owner's PYU sends it to every party
            return self._dispatch(desc, payload)
        except BaseException as e:  # noqa: BLE001  (re-raised, as a JobError when it is SecretFlow's)
            err = job_error(e) if not isinstance(e, KeyboardInterrupt) else None
            self.broken = str(err or _first_line(e))
            if err is not None and err is not e:
                raise err from None
            raise

    def follow(self) -> dict:
        """Every party but the data owner: perform the announced operations until ``end``;
        returns the end descriptor (``ok``: whether the data owner finished without error)."""
        import secretflow.distributed as sfd

        while True:
            desc = sfd.get(self.alice(_ident)(None).data)
            try:
                self._dispatch(desc, {})
            except BaseException as e:  # noqa: BLE001
                err = job_error(e)
                if err is not None and err is not e:
                    raise err from None
                raise
            if desc["op"] == "end":
                return desc

    def _dispatch(self, desc: dict, payload: dict):
        op = desc.get("op")
        self.ops += 1
        if op == "setup":
            return self._setup(desc)
        if op == "put":
            return self._put(desc["name"], payload.get("value"))
        if op == "approve":
            return self._approve(desc)
        if op == "run":
            return self._run(desc)
        if op == "open":
            return self._open(desc["name"], desc.get("what", ""))
        if op == "drop":
            return self._drop(desc["names"])
        if op == "table":
            return self._table()
        if op in ("state_open", "state_has", "state_keep", "state_restore"):
            return getattr(self, f"_{op}")(desc)
        if op == "end":
            return self._end(desc)
        raise JobError(f"the data owner sent an unknown operation {op!r} (different versions of secptune?)")

    # -------------------------------------------------------------------------- operations
    def _setup(self, desc: dict) -> dict:
        """The model owner loads its model, publishes the public metadata to every party, and
        puts every weight on the SPU (once: resident for the job)."""
        import secretflow.distributed as sfd

        if desc.get("version") != PROTOCOL:
            raise JobError(f"the data owner speaks protocol {desc.get('version')}, this party {PROTOCOL} "
                           "(run the same secptune everywhere)")
        self.meta = sfd.get(self.bob(_owner_meta)(desc["model"]).data)
        self.weights = [self.bob(_owner_leaf)(i).to(self.spu) for i in range(self.meta["n_leaves"])]
        return self.meta

    def _delete(self, name: str) -> None:
        obj = self.vars.pop(name)
        for i, actor in enumerate(self.spu.actors.values()):
            actor.del_share.remote(obj.shares_name[i])
        del obj.shares_name  # deleted here; SPUObject.__del__ would delete it again

    def _put(self, name: str, value) -> None:
        """The data owner's value (None elsewhere) as shares on the SPU, resident as ``name``."""
        if name in self.vars:
            self._delete(name)
        self.gate.forget(name)
        self.vars[name] = self.alice(_ident)(value).to(self.spu)

    def _approve(self, desc: dict):
        """The model owner builds, checks and compiles the program the request names; every party
        learns the approval and the executable (public: shapes and code, no weight) and admits it
        into its gate under its own policy; the SPU nodes will run the model owner's copy."""
        import secretflow.distributed as sfd

        pair = self.bob(_owner_approve)(desc["request"])
        approval, exe = sfd.get(pair.data)
        self.gate.admit(approval, exe)
        if approval.digest not in self.exes:
            self.exes[approval.digest] = self.bob(_exe_of)(pair)
        return approval

    def check_run(self, digest: str, ins: list, outs: list) -> None:
        """Refused unless the model owner approved ``digest`` for these variables (every party
        checks the same before it takes part; the data owner before it announces the run)."""
        self.gate.bind(digest, weight_names(len(self.weights)) + list(ins), outs)

    def check_open(self, name: str, what: str) -> None:
        """Refused unless ``name`` is an output its approval opens as ``what``, within the cap."""
        self.gate.check_open(name, what, self.out_shapes.get(name, ()))

    def _run(self, desc: dict):
        """Every SPU node runs the approved executable on the weights and the named resident
        values; the outputs stay resident, marked as the approval says. The model owner's
        executable reaches each node once (SecretFlow sends an object to a party once); each node
        then reads its own traffic and sends it to the data owner."""
        from secretflow.device.device.spu import SPUCompilerNumReturnsPolicy, SPUObject

        t0 = time.perf_counter()
        digest, ins, outs = desc["exe"], desc["ins"], desc["outs"]
        if self.me.role != "model_owner":  # the compute parties refuse (the data owner checked before)
            self.check_run(digest, ins, outs)
        exe_obj = self.exes[digest]
        n = len(outs)
        results = []
        for i, actor in enumerate(self.spu.actors.values()):
            args = [w.shares_name[i] for w in self.weights] + [self.vars[v].shares_name[i] for v in ins]
            results.append(actor.run.options(num_returns=2 * n).remote(
                SPUCompilerNumReturnsPolicy.FROM_COMPILER, None, exe_obj.data, *args))
        self.gate.forget(*outs)
        approval = self.gate.approved[digest][0]
        for k, name in enumerate(outs):
            if name in self.vars:
                self._delete(name)
            self.vars[name] = SPUObject(self.spu, results[0][k], [r[n + k] for r in results])
            self.out_shapes[name] = tuple(approval.out_shapes[approval.request.outs[k]])
        self.gate.ran(digest, outs)
        costs = [self.pyus[p](_read_profile)(r[n]) for p, r in zip(self.spu.actors, results)]
        per_party = self._to_leader(costs)
        if not self.leader:
            return None
        parties = {p: cost for p, (cost, _) in zip(self.spu.actors, per_party)}
        return CallCost(time.perf_counter() - t0, parties, per_party[0][1])

    def _to_leader(self, objs: list):
        """One object per compute party (each at that party) to the data owner: their values there."""
        got = self.alice(_collect)(*[o.to(self.alice) for o in objs])
        return got.data.get_object() if self.leader else None

    def _open(self, name: str, what: str):
        """Shares of ``name`` go to the data owner's PYU only, and only if every compute party's
        gate lets ``name`` open as ``what``; only the data owner's process reconstructs."""
        if self.me.role != "model_owner":  # the compute parties refuse (the data owner checked before)
            self.check_open(name, what)
        if self.me.role == "compute":  # its own record of the share it hands out
            append_audit(self.log_dir / f"{self.me.name}.audit.jsonl",
                         self.gate.record(name, what, self.out_shapes.get(name, ())))
        obj = self.vars[name].to(self.alice)
        return np.asarray(obj.data.get_object(), np.float32) if self.leader else None

    def _drop(self, names: list) -> None:
        self.gate.forget(*names)
        for name in names:
            if name in self.vars:
                self._delete(name)

    def _table(self):
        """Model owner -> data owner only (``embedding: data_owner``)."""
        got = self.alice(_ident)(self.bob(_owner_table)().to(self.alice))
        return got.data.get_object() if self.leader else None

    # ------------------------------------------- set-up shares, each on its compute party's own disk
    # every party makes the same calls; the files are read and written by functions that run at
    # the compute party itself (its PYU), fed from and into its own SPU runtime: no share moves
    def _state_open(self, desc: dict) -> None:
        """Each compute party keeps this run's shares under its own STATE_ROOT/``namespace``."""
        self._to_leader([self.pyus[p](_state_open)(desc["namespace"]) for p in self.spu.actors])

    def _state_has(self, desc: dict):
        """To the data owner: each compute party's chunk counts of its shares under ``keys`` (None
        where it lacks one)."""
        got = self._to_leader([self.pyus[p](_state_has)(list(desc["keys"])) for p in self.spu.actors])
        return dict(zip(self.spu.actors, got)) if self.leader else None

    def _state_keep(self, desc: dict) -> None:
        """Each compute party files its share of each of ``outs`` under ``keys``, with the origin
        its own gate recorded (the approved program and output that wrote it); never a weight."""
        outs, keys = list(desc["outs"]), list(desc["keys"])
        origins = self.gate.kept_origins(outs)
        if len(outs) != len(keys):
            raise Refused(f"{self.me.name} refuses to keep {outs[0]!r}: one key per output")
        acks = []
        for i, (p, actor) in enumerate(self.spu.actors.items()):
            filed = [self.pyus[p](_state_file)(actor.outfeed_share.remote(self.vars[n].shares_name[i]), k, o)
                     for n, k, o in zip(outs, keys, origins)]
            acks.append(self.pyus[p](_done)(*filed))
        self._to_leader(acks)

    def _state_restore(self, desc: dict) -> None:
        """As ``_run`` of the approved ``exe`` on ``ins``, its outputs' shares loaded instead from
        each compute party's own disk: the same gate checks first, each file only if it was kept
        as that program's output, the outputs SPUObjects as ``_run`` makes them."""
        from secretflow.device.device.spu import SPUObject

        digest, ins, outs, keys = desc["exe"], desc["ins"], desc["outs"], desc["keys"]
        if self.me.role != "model_owner":  # the compute parties refuse (the data owner checked before)
            self.check_run(digest, ins, outs)
        if any(len(desc["chunks"][p]) != len(outs) for p in self.spu.actors) or len(keys) != len(outs):
            raise Refused(f"{self.me.name} refuses a restore without one key and chunk count per output")
        approval = self.gate.approved[digest][0]
        origins = self.gate.restored_origins(digest, len(outs))
        loaded = {}  # compute party -> per output (its SPUValueMeta, its share's name in that party's runtime)
        for p, actor in self.spu.actors.items():
            loaded[p] = []
            for key, origin, n in zip(keys, origins, desc["chunks"][p]):
                meta, info, *chunks = self.pyus[p](_state_load, num_returns=2 + n)(key, origin, self.spu.conf, n)
                loaded[p].append((meta.data, actor.infeed_share.remote(info.data, *[c.data for c in chunks])))
        if self.me.name in loaded:  # its own shares are in its runtime (or it refused) before it marks them
            for _, name in loaded[self.me.name]:
                name.get_object()
        self.gate.forget(*outs)
        rows = list(loaded.values())
        for k, name in enumerate(outs):
            if name in self.vars:
                self._delete(name)
            self.vars[name] = SPUObject(self.spu, rows[0][k][0], [row[k][1] for row in rows])
            self.out_shapes[name] = tuple(approval.out_shapes[approval.request.outs[k]])
        self.gate.ran(digest, outs)
        self._to_leader([self.pyus[p](_done)(*[n for _, n in loaded[p]]) for p in loaded])

    def _end(self, desc: dict) -> None:
        """The job's end: no SecretFlow call (its last messages could be dropped by a process that
        leaves right after sending them); the parties leave through the watchdog's goodbye."""

    def finish(self, ok: bool) -> list:
        """Data owner: end the job (``ok``: it finished without error) and wait until every other
        party has received the end (its goodbye); returns the parties that did not confirm."""
        if self.broken:
            return []
        self.lead({"op": "end", "ok": bool(ok)})
        others = [p.name for p in self.cluster.parties if p.name != self.me.name]
        return self.watchdog.wait_done(others, self.cluster.timeout_s)

    def leave(self) -> None:
        """Leave in order (the caller then ends the process with ``os._exit``: SecretFlow's links
        can hang at interpreter exit, and nothing is left to send)."""
        self.links.stop()
        self.watchdog.goodbye()


# -------------------------------------------------------------------------------- the session
class SecretFlowBackend(Session):
    """The data owner's session over a SecretFlow job (this process's :class:`SFJob`, set by
    ``tuning.sfjob``). ``bundle`` gives the model's name and tokenizer; the config and the
    weights' shapes come from the model owner, the weights stay on the SPU."""

    name = "secretflow"
    allows_unsafe_open = False  # real party processes: only the policy's reveals leave them

    def __init__(self, bundle, policy, job: SFJob | None = None):
        job = job or current_job()
        if job is None:
            raise UserError("the secretflow back end runs inside a SecretFlow job: start it with `secptune sf-job`")
        if not job.leader:
            raise UserError(f"party {job.me.name} is not the data owner; only the data owner's process drives a session")
        _check_same_policy(policy, job.policy)
        self.job, self.closed = job, False
        self.costs, self.shapes, self.reveals = [], {}, []
        self.policy = policy
        meta = job.lead({"op": "setup", "model": bundle.name, "version": PROTOCOL})
        Session.__init__(self, ModelBundle(bundle.name, meta["config"], meta["shapes"], bundle.tokenizer,
                                           policy_execution(meta["config"], policy)), policy)
        self._stats, self._table = meta["stats"], None

    def embedding_stats(self):
        return self._stats

    def embedding_table(self) -> np.ndarray:
        if self.policy.embedding != "data_owner":
            return Session.embedding_table(self)  # raises: the policy keeps the table secret
        if self._table is None:
            self._table = self.job.lead({"op": "table"})
        return self._table

    def _put(self, name: str, value) -> None:
        self.job.lead({"op": "put", "name": name, "shape": list(value.shape)}, value=value)

    def _compile(self, program, arg_shapes, out_keys):
        raise UserError("a SecretFlow job runs only the programs the model owner approves, not one of your own")

    def _approve(self, request):
        """The model owner approves and compiles; every party admits it. Compiled: the digest."""
        approval = self.job.lead({"op": "approve", "request": request})
        return approval.digest, approval

    def _execute(self, compiled, ins, outs):
        self.job.check_run(compiled, ins, outs)  # refused here, before anything is announced
        return self.job.lead({"op": "run", "exe": compiled, "ins": list(ins), "outs": list(outs)})

    # set-up shares on the compute parties' disks: each keeps its own, under its own state root
    keeps_state = True

    def _open_state(self, root) -> None:
        ns = state.namespace(root)
        self.job.lead({"op": "state_open", "namespace": ns})
        self.state, self._chunks = ns, {}

    def _program_digest(self, compiled) -> str:
        return compiled  # always an approved digest here

    def _kept(self, keys) -> bool:
        counts = self.job.lead({"op": "state_has", "keys": list(keys)})
        if any(c is None for c in counts.values()):
            return False
        self._chunks[tuple(keys)] = counts  # the restore announces them: every party makes as many calls
        return True

    def _keep(self, outs, keys) -> None:
        self.job.lead({"op": "state_keep", "outs": list(outs), "keys": list(keys)})

    def _restore(self, compiled, ins, outs, keys) -> None:
        self.job.check_run(compiled, ins, outs)  # refused here, before anything is announced
        self.job.lead({"op": "state_restore", "exe": compiled, "ins": list(ins), "outs": list(outs),
                       "keys": list(keys), "chunks": self._chunks.pop(tuple(keys))})

    def _reconstruct(self, name: str, what: str | None = None) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(f"no resident variable {name!r}")
        self.job.check_open(name, what or "")
        return self.job.lead({"op": "open", "name": name, "what": what or ""})

    def drop(self, *names: str) -> None:
        """The parties delete ``names``; a no-op once the job failed (its values are gone)."""
        for n in names:
            self.shapes.pop(n, None)
        if names and not self.job.broken and not self.closed:
            self.job.lead({"op": "drop", "names": list(names)})

    def close(self) -> None:
        """The session ends; the job's end (``SFJob.finish``) is the party process's."""
        self.closed = True


def _check_same_policy(policy, job_policy) -> None:
    """The session's policy (the run's) must compute as the job's (its cluster file's)."""
    diff = view_differences(policy.view(), job_policy.view())
    if diff:
        raise UserError(f"the run's policy {policy.name!r} differs from the job's {job_policy.name!r} in "
                        f"{', '.join(diff)}: resume a run under the policy it started with")

