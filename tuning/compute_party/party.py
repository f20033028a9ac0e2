"""One compute party: its SPU runtime and the shares resident in it, what it may run and open
(its :class:`gate.Gate`), its kept set-up shares (its :class:`state.PartyStore`) and its traffic.

Every transport carries calls to these methods and adds nothing to what they check: a gRPC node
holds one (``transports.node``), the simulator one per simulated party in a single process
(``transports.sim``). Nothing here opens a value: a party hands out only its own share.

    party = ComputeParty("p0", policy, runtime, LogTraffic(log))
    party.set_weight("w0", share)                   # the model owner, once
    party.admit(approval, exe)                      # the model owner's approved program
    party.put("x", share)                           # the data owner's input
    cost, ops = party.run(digest, ["w0", ..., "x"], ["y"])
    share = party.share_of("y", "verbalizer_logits")  # only what the approval opens
"""
from __future__ import annotations

import threading
from pathlib import Path

from ..programs import WEIGHT
from .gate import Gate, append_audit, share_shape
from .state import PartyStore, checked_key

COUNTERS = ("set_share", "put", "run", "open", "drop", "approved")
AUDIT = "audit.jsonl"  # in its state directory: every share it handed out, one JSON line each


class ComputeParty:
    """``runtime``: an ``spu.api.Runtime`` linked to the other compute parties. ``traffic``: a
    reader of this party's own traffic per run (``traffic.LogTraffic``), or None where the
    transport measures it. ``state_root``: where its kept set-up shares go, one directory per job, and its audit log
    (``AUDIT``: every share it hands out, appended before the share leaves)."""

    def __init__(self, name: str, policy, runtime, traffic=None, state_root=None):
        self.name, self.policy, self.rt, self.traffic = name, policy, runtime, traffic
        self.gate = Gate(policy, name)
        self.state_root = Path(state_root) if state_root else None
        self.store: PartyStore | None = None
        self.job: str | None = None  # the namespace of the job whose set-up shares it keeps
        self.lock = threading.Lock()  # one call at a time on the runtime
        self.counters = dict.fromkeys(COUNTERS, 0)

    # ---- writes, each by the role that owns the value
    def _owner_writes(self, name: str, weights: bool) -> None:
        """The model owner writes its weights only; the data owner (and programs) anything else."""
        if bool(WEIGHT.fullmatch(str(name))) != weights:
            raise PermissionError(f"{self.name}: {str(name)[:40]!r} is " + (
                "not a weight; the model owner writes weights only" if weights else
                "a weight; only the model owner writes it"))

    def set_weight(self, name: str, share) -> None:
        """Model owner: one weight share, resident for the session."""
        self._owner_writes(name, weights=True)
        with self.lock:
            self.rt.set_var(name, share)
        self.counters["set_share"] += 1

    def admit(self, approval, exe: bytes) -> None:
        """Model owner: an executable it approved, with what of it may be opened."""
        with self.lock:
            self.gate.admit(approval, exe)
        self.counters["approved"] += 1

    def put(self, name: str, share) -> None:
        """Data owner: its share of a value, resident as ``name`` until dropped."""
        self._owner_writes(name, weights=False)
        with self.lock:
            self.rt.set_var(name, share)
            self.gate.forget(name)
        self.counters["put"] += 1

    # ---- programs
    def run(self, digest: str, input_names: list, output_names: list) -> tuple:
        """Run the approved executable ``digest`` on resident ``input_names`` (the weights in
        order, then the arguments), keeping its outputs as ``output_names``, marked as its
        approval says. Returns (this party's PartyCost, per-op table); None where unmeasured."""
        with self.lock:
            exe = self.gate.bind(digest, input_names, output_names)
            self.gate.forget(*exe.output_names)
            cost = self._run(exe)
            self.gate.ran(digest, exe.output_names)
        self.counters["run"] += 1
        return cost

    def run_unapproved(self, exe) -> None:
        """An executable of the data owner's own, in-process only (benchmarks, where one process
        holds every party anyway): it runs, and its outputs are never marked to open."""
        with self.lock:
            self.gate.forget(*exe.output_names)
            self._run(exe)

    def _run(self, exe):
        if self.traffic is not None:
            self.traffic.mark()
        self.rt.run(exe)
        return self.traffic.read() if self.traffic is not None else (None, {})

    # ---- reads
    def share_of(self, name: str, what: str):
        """This party's share of ``name`` for the data owner to reconstruct: only an output its
        approval opens as ``what``, within this party's policy's cap (checked on the share's own
        shape). Weights, the data owner's inputs, caches and every other output stay here."""
        with self.lock:
            share = self.rt.get_var(name) if name in self.gate.marks else None
            shape = share_shape(share) if share else ()
            self.gate.check_open(name, what, shape)
            if self.state_root is not None:  # its own record of what it handed out, before it leaves
                append_audit(self.state_root / AUDIT, self.gate.record(name, what, shape, self.job))
        self.counters["open"] += 1
        return share

    def unsafe_share(self, name: str):
        """In-process only (``Session.unsafe_open``): a share, unchecked."""
        with self.lock:
            return self.rt.get_var(name)

    def drop(self, names: list) -> None:
        """Delete variables (absent ones are ignored)."""
        with self.lock:
            for name in names:
                self.gate.forget(name)
                try:
                    self.rt.del_var(name)
                except Exception:  # noqa: BLE001  (absent, e.g. the output of a failed run)
                    pass
        self.counters["drop"] += len(names)

    # ---- set-up shares on this party's own disk
    def open_state(self, namespace: str | None = None) -> None:
        """Keep this job's set-up shares under STATE_ROOT/``namespace`` (a digest naming the run;
        None: STATE_ROOT itself, a directory of this job's own)."""
        if self.state_root is None:
            raise RuntimeError(f"{self.name}: no state directory")
        self.store = PartyStore(self.state_root / checked_key(namespace) if namespace else self.state_root)
        self.job = namespace

    def _store(self) -> PartyStore:
        if self.store is None:
            raise RuntimeError(f"{self.name}: no state opened; the driver must open it first")
        return self.store

    def has(self, keys: list) -> bool:
        """Does this party hold a kept share under every one of ``keys``."""
        store = self._store()
        return all(store.has(k) for k in keys)

    def keep(self, names: list, keys: list) -> None:
        """File this party's shares of ``names`` (outputs of a run just made) under ``keys``, each
        with the origin its gate recorded (the approved program and output that wrote it)."""
        store = self._store()
        origins = self.gate.kept_origins(names)
        with self.lock:
            store.keep(self.rt, names, keys, origins)

    def restore(self, digest: str | None, input_names: list, output_names: list, keys: list) -> None:
        """As if the approved program ``digest`` ran on ``input_names``: its input checks, then
        its outputs' shares from this party's own disk, with the origins and marks its approval
        gives. ``digest=None``: a program of the data owner's own (in-process), nothing marked."""
        store = self._store()
        with self.lock:
            if digest is not None:
                output_names = self.gate.bind(digest, input_names, output_names).output_names
            origins = self.gate.restored_origins(digest, len(output_names))
            store.restore(self.rt, list(output_names), keys, origins)  # refused unless each was kept as that
            self.gate.forget(*output_names)
            if digest is not None:
                self.gate.ran(digest, list(output_names))

