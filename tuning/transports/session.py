"""The session contract: what every back end offers the data owner.

A session holds named values as secret shares on the compute parties, runs programs over them,
and reveals results only as its policy allows:

    with make_backend("sim", bundle, policy) as s:   # the model owner shares its weights once
        s.put("x", array)                             # the data owner secret-shares an input
        s.run("forward", {"rows": "x", ...}, ["y"])   # the model owner approves and compiles the
                                                      # named program; y stays on the parties
        s.reveal("y", what="verbalizer_logits")       # to the data owner, if the approval and policy say so
        s.drop("x", "y")

The data owner names a known program (a name or ``approval.ProgramRef``, with the public shapes
of the variables it binds); it never sends code. The model owner builds and compiles it, and its
approval says which outputs may be opened as which kind (``approval``): the data owner's call
marks nothing. ``reveal`` is the only way a value leaves the parties: it checks the policy's
``reveal`` map (which output, to whom) and that the variable is an output the approval opens as
that kind (the compute parties check the same, and the policy's cap, before a share leaves),
refuses anything else in one line, and records every reveal (``reveals``: what, which variable,
shape, to whom, when). ``unsafe_open`` reconstructs any variable for benchmark checks, is recorded
as such, and is refused by back ends whose parties are real processes (``allows_unsafe_open``).

A program is ``program(params, **inputs) -> dict``, a pure JAX function; the model owner's
weights are always its first argument. Known programs are approved once per request (name,
options, argument shapes, outputs) and bound to each call's variables. In-process back ends
also run a function of the caller's own (a benchmark; compiled once per explicit ``key``),
whose outputs never open (``unsafe_open`` only); the cluster's parties refuse it.
``forward(batch)`` is the one-shot special case used by ``secptune forward``; ``make_batch``
builds its data owner's arrays on every back end.

A back end implements the abstract methods: ``_put``, ``_reconstruct``, ``drop``, ``close``,
``_compile(program, arg_shapes, out_keys)`` and ``_execute(compiled, ins, outs) -> CallCost``;
``_approve(request)`` where a model owner approves (default: the same registry, in process);
back ends whose parties can keep shares on disk (``keep_state``) also ``_open_state``,
``_program_digest``, ``_kept``, ``_keep`` and ``_restore``.
The shared parts (``run``, ``forward``, ``make_batch``, what the data owner may learn of the
weights, and the context manager) live here.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from ..compute_party import state
from ..errors import UserError
from ..model_owner import approval as approvals
from ..model_owner.models import EmbeddingStats
from ..model_owner.owner import ModelOwner
from ..programs import shapes_of
from .cost import CallCost
from .deployment import DATA_OWNER


class RevealError(UserError):
    """A value the policy does not allow to leave the parties (or not to that recipient)."""


class Ledger:
    """What each kept set-up output cost when it was computed (``keep_state``'s root/ledger.jsonl,
    the data owner's file, a line per call), so that a resumed run reports its whole set-up. A
    call kept before there was a ledger is priced from a recorded call of the same compiled
    program (the same shapes: its traffic varied by ~1% between runs here), marked estimated."""

    def __init__(self, path: Path):
        self.path = path
        self.by_key, self.by_program = {}, {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:  # a torn last line (killed mid-write)
                    continue
                self.by_key[e["key"]] = self.by_program[e["program"]] = e

    def add(self, key: str, program: str, cost: CallCost) -> None:
        e = {"key": key, "program": program, "seconds": round(cost.wall_s, 3), "bytes": int(cost.send_bytes),
             "rounds": int(cost.rounds)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(e) + "\n")
        self.by_key[key] = self.by_program[program] = e

    def cost(self, key: str, program: str) -> dict | None:
        """The recorded cost of the call that produced ``key`` (``estimated``: priced from the same
        program's), or None when neither was recorded."""
        if key in self.by_key:
            return {k: self.by_key[key][k] for k in ("seconds", "bytes", "rounds")} | {"estimated": False}
        if program in self.by_program:
            return {k: self.by_program[program][k] for k in ("seconds", "bytes", "rounds")} | {"estimated": True}
        return None


class Session(abc.ABC):
    name = "session"
    chunk: int | None = 16  # examples per secure call that bounds the parties' memory (None: any)
    pad_multiple = 16  # cached texts are padded to a multiple of this (coarser: fewer compilations)
    allows_unsafe_open = True  # in-process back ends; False where the parties are real processes
    scan_layers = False  # run softmax layer runs as one lax.scan (spu_models.config.Execution)
    keeps_state = False  # its parties can keep set-up shares on disk (keep_state)

    def __init__(self, bundle, policy):
        """``bundle``: the architecture, execution and tokenizer, and the model owner's weights
        (in-process back ends) or only their shapes (the cluster's driver)."""
        self.config, self.policy = bundle.config, policy
        # scanned layer runs compile in seconds under XLA; SPU compiles unrolled layers fast enough,
        # and stacking the weights' shares for a scan would copy them all (+6 GB for SmolLM2)
        self.execution = bundle.execution if bundle.execution is None else dataclasses.replace(
            bundle.execution, scan_layers=self.scan_layers)
        self.tokenizer = bundle.tokenizer
        self._params_shapes = shapes_of(bundle.params)
        self._bundle = bundle  # in-process back ends: the model owner's; else config and shapes only
        self.shapes: dict = {}  # resident var name -> shape
        self._programs: dict = {}
        self.costs: list = []
        self.reveals: list = []  # the audit: one entry per value that left the parties
        self.audit_path = None  # a file each reveal is also appended to (the run's reveals.jsonl)
        self.audit_command = None  # the command the reveals are recorded under there (tune, predict, eval)
        self._marks: dict = getattr(self, "_marks", {})  # output var -> the reveal kind it was computed as
        self._digests: dict = {}  # resident var -> digest of what produced it (state.digest)
        self.state = None  # where the parties keep set-up shares (keep_state), or None
        self._state_writes, self._salt = False, b""
        self._ledger = None  # the data owner's record of what each kept output cost to compute
        self.restored: list = []  # per restored call: (its first output's key, its program's digest)
        self._identity = state.digest(getattr(bundle, "name", ""), bundle.config, policy.computes_as())

    # ---- the back end's own parts
    @abc.abstractmethod
    def _put(self, name: str, value: np.ndarray) -> None:
        """Secret-share ``value`` (the data owner's, finite float32) as resident variable ``name``."""

    @abc.abstractmethod
    def _reconstruct(self, name: str, what: str | None) -> np.ndarray:
        """Reconstruct resident variable ``name`` here, at the data owner, as reveal kind ``what``
        (``reveal``) or ``None`` (``unsafe_open``)."""

    @abc.abstractmethod
    def drop(self, *names: str) -> None:
        """Delete resident variables (absent ones are ignored)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the parties (idempotent)."""

    @abc.abstractmethod
    def _compile(self, program, arg_shapes: dict, out_keys: list):
        """Compile ``program`` for these argument shapes; outputs in ``out_keys`` order."""

    @abc.abstractmethod
    def _execute(self, compiled, ins: list, outs: list):
        """Run a compiled program on resident vars ``ins``, keeping its outputs as ``outs``; a CallCost."""

    def put(self, name: str, value) -> None:
        """Secret-share ``value`` (the data owner's) as resident variable ``name``."""
        value = finite(name, value)
        self._put(name, value)
        self.shapes[name] = value.shape
        self._unmark(name)
        self._digests[name] = state.digest("put", value.shape, value.tobytes())

    # ---- set-up shares the parties keep on disk (a resumed run does not prefill again)
    def keep_state(self, root, write: bool = True, salt: bytes = b"") -> None:
        """From now on ``run(..., persist=True)`` outputs are kept by each party under ``root``
        (one directory per party) and restored instead of recomputed when their digest recurs;
        ``write=False``: restored only, nothing new kept. ``salt``: the data owner's secret,
        mixed into every digest (the parties see digests of its inputs, never the salt)."""
        self._state_writes, self._salt = write, salt
        self._open_state(root)
        self._ledger = Ledger(Path(root) / "ledger.jsonl")

    def restored_costs(self) -> list:
        """What each restored call cost when computed, from the ledger as it stands now (a call
        restored before its program's first computed run is priced once that run is recorded)."""
        return [self._ledger.cost(key, program) for key, program in self.restored]

    def _open_state(self, root) -> None:
        raise UserError(f"the {self.name} back end cannot keep set-up shares on disk")

    def _program_digest(self, compiled) -> str:
        raise NotImplementedError

    def _kept(self, keys: list) -> bool:
        """Every party holds every one of ``keys``."""
        raise NotImplementedError

    def _keep(self, outs: list, keys: list) -> None:
        """Each party files its share of var ``outs[i]`` under ``keys[i]``."""
        raise NotImplementedError

    def _restore(self, compiled, ins: list, outs: list, keys: list) -> None:
        """Each party loads its share filed under ``keys[i]`` as var ``outs[i]``, as if ``compiled``
        had run on ``ins`` (its checks and marks)."""
        raise NotImplementedError
    def _approve(self, request):
        """(compiled, Approval) of a known program. Here, in process (plaintext, SecretFlow): the
        registry's program and reveal marks, no party's check; back ends with parties override it."""
        fn = approvals.build(self.config, self.execution, self.policy.embedding, request.program)
        args, outs = dict(request.args), list(request.outs)
        shapes = approvals.output_shapes(fn, self._params_shapes, args, outs)
        return self._compile(fn, args, outs), approvals.describe(request, shapes, 0)

    # ---- the one reveal point
    def reveal(self, name: str, what: str = "verbalizer_logits", to: str = "data_owner") -> np.ndarray:
        """Reconstruct resident variable ``name`` for recipient role ``to``, if the policy's reveal
        map lets output kind ``what`` go there; record it. Raises RevealError otherwise."""
        allowed = self.policy.reveal.get(what)
        if allowed is None:
            raise RevealError(f"policy {self.policy.name!r} reveals no {what!r} (it reveals: "
                              f"{', '.join(f'{k} to the {v}' for k, v in self.policy.reveal.items()) or 'nothing'})")
        if to != allowed:
            raise RevealError(f"policy {self.policy.name!r} reveals {what!r} only to the {allowed}, not to the {to}")
        if to != "data_owner":  # the only recipient this process can hand a value to
            raise RevealError(f"this process is the data owner's; it cannot reveal to the {to}")
        if name in self.shapes and self._marks.get(name) != what:
            raise RevealError(f"{name!r} is not an output its approved program opens as {what!r}; it stays on "
                              "the parties")
        return self._audited(name, what, to, what)

    def unsafe_open(self, name: str, reason: str) -> np.ndarray:
        """Reconstruct any resident variable, bypassing the reveal policy: for benchmark checks
        (``reason`` says which), recorded in the audit as unsafe; refused where the parties are
        real processes."""
        if not self.allows_unsafe_open:
            raise RevealError(f"the {self.name} back end refuses unsafe_open ({reason}): only the policy's "
                              "reveals leave its parties")
        return self._audited(name, f"UNSAFE: {reason}", "data_owner", None)

    def _unmark(self, *names: str) -> None:
        """Back ends call this from ``put`` and ``drop``: the names no longer hold marked outputs."""
        for n in names:
            self._marks.pop(n, None)
            self._digests.pop(n, None)

    def _audited(self, name: str, what: str, to: str, kind: str | None) -> np.ndarray:
        if name not in self.shapes:
            raise UserError(f"no resident variable {name!r} to reveal")
        value = self._reconstruct(name, kind)
        record = {"what": what, "var": name, "shape": list(value.shape), "to": to,
                  "party": DATA_OWNER, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if self.audit_command is not None:
            record["command"] = self.audit_command
        self.reveals.append(record)
        if self.audit_path is not None:  # append-only, as it happens: a killed run keeps its reveals
            with open(self.audit_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return value

    def audit_to(self, path, command: str) -> None:
        """From here on, append every reveal to ``path`` (a run's reveals.jsonl), recorded as opened
        by ``command``: a run's audit holds every command's reveals, each counts its own."""
        self.audit_path, self.audit_command = path, command

    def reveal_summary(self) -> list:
        """This session's audit, grouped (:func:`group_reveals`)."""
        return group_reveals(self.reveals)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- what the data owner may learn of the weights (the cluster back end asks the model owner)
    def embedding_table(self) -> np.ndarray:
        """The token-embedding table, under policy ``embedding: data_owner`` only (which hands the
        table to the data owner, so that it embeds its own tokens)."""
        return self._model_owner().embedding_table()  # PermissionError under any other policy

    def embedding_stats(self) -> EmbeddingStats:
        """Public statistics of the embedding table (shape, std of its entries): the scale of the
        search subspace, under every policy."""
        return self._model_owner().embedding_stats()

    def _model_owner(self) -> ModelOwner:
        """In-process back ends hold the model owner (its weights) in this process."""
        if getattr(self, "owner", None) is None:
            self.owner = ModelOwner(self.policy, self._bundle, self.execution)
        return self.owner

    # ---- running programs
    def run(self, program, inputs: dict, outputs, key: str | None = None, persist: bool = False):
        """Run ``program`` on resident vars. ``inputs`` maps argument name -> var name; ``outputs``
        lists the result keys to keep, or maps result key -> var name. Returns the CallCost.

        ``program``: a known program's name or ``approval.ProgramRef``, which the model owner
        approves once per request (its public argument shapes and outputs) and whose approval says
        which outputs may be opened; or, on in-process back ends, a function of your own with an
        explicit ``key`` (benchmarks: compiled once per key and shapes, its outputs never open).
        ``persist``: a set-up output the parties keep on disk (``keep_state``); a later run with
        the same digests restores it, computing nothing."""
        outmap = dict(outputs) if isinstance(outputs, dict) else {o: o for o in outputs}
        arg_shapes = {a: tuple(self.shapes[inputs[a]]) for a in sorted(inputs)}
        compiled, out_shapes, opens = self._program(program, arg_shapes, list(outmap), key)
        for v in outmap.values():
            self._marks.pop(v, None)
        ins, outs = [inputs[a] for a in arg_shapes], list(outmap.values())
        keys = None  # only where every input's provenance is known: else a digest would not pin them
        if persist and self.state is not None and all(self._digests.get(v) for v in ins):
            program_id = self._program_digest(compiled)
            keys = [state.digest(self._identity, self._salt, program_id,
                                 [(a, self._digests[inputs[a]]) for a in arg_shapes], k)
                    for k in outmap]
        if keys and self._kept(keys):
            self._restore(compiled, ins, outs, keys)
            cost = CallCost(0.0, {})
            self.restored.append((keys[0], program_id))
        else:
            c0 = time.process_time()
            cost = self._execute(compiled, ins, outs)
            cost.cpu_s = time.process_time() - c0
            if keys and self._state_writes:
                self._keep(outs, keys)
                self._ledger.add(keys[0], program_id, cost)
        self._digests.update(zip(outs, keys or [None] * len(outs)))
        self._marks.update({outmap[k]: kind for k, kind in opens.items()})
        self.costs.append(cost)
        self.shapes.update({outmap[k]: shape for k, shape in out_shapes.items()})  # public: from the program
        return cost

    def _program(self, program, arg_shapes: dict, out_keys: list, key):
        """(compiled, output shapes, output key -> reveal kind) of ``program``, cached: a known
        program's approval per request, a function of the caller's own per key (opening nothing)."""
        if callable(program):
            if not key:
                raise ValueError("a program of your own needs an explicit key (its name in the program cache)")
            sig = (key, tuple(arg_shapes.items()), tuple(out_keys))
            if sig not in self._programs:
                shapes = approvals.output_shapes(program, self._params_shapes, arg_shapes, out_keys)
                self._programs[sig] = (self._compile(program, arg_shapes, out_keys), shapes, {})
            return self._programs[sig]
        request = approvals.Request.of(program, arg_shapes, out_keys)
        if request not in self._programs:
            compiled, approval = self._approve(request)
            self._programs[request] = (compiled, approval.out_shapes, approval.opens)
        return self._programs[request]

    def forward(self, batch: dict) -> np.ndarray:
        """Share ``batch``, run the verbalizer-logits forward, open the logits, drop everything."""
        for k, v in batch.items():
            self.put(f"x_{k}", v)
        self.run("forward", {k: f"x_{k}" for k in batch}, ["logits"])
        try:
            return self.reveal("logits", "verbalizer_logits")
        finally:
            self.drop("logits", *[f"x_{k}" for k in batch])


def group_reveals(records: list) -> list:
    """Reveal records grouped: one entry per (what, to, shape) with its count, first and last time."""
    out: dict = {}
    for r in records:
        key = (r["what"], r["to"], tuple(r["shape"]))
        e = out.setdefault(key, {"what": r["what"], "to": r["to"], "party": r["party"], "shape": r["shape"],
                                 "count": 0, "first": r["time"]})
        e["count"] += 1
        e["last"] = r["time"]
    return list(out.values())


def finite(name: str, value) -> np.ndarray:
    """``value`` as float32, refused (one line) if it holds NaN or Inf: fixed point has no such
    values, and SPU would share garbage in their place."""
    value = np.asarray(value, np.float32)
    if not np.isfinite(value).all():
        bad = int((~np.isfinite(value)).sum())
        raise UserError(f"refusing to share {name!r}: {bad} of its {value.size} values are NaN or Inf "
                        "(fixed point cannot hold them)")
    return value
