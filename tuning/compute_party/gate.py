"""A compute party's gate: it runs only executables the model owner approved, and hands out a
share only of an output whose approval opens it, within its own policy's cap.

    gate.admit(approval, exe)                                # the model owner's approved program
    bound = gate.bind(digest, input_names, output_names)     # before a run
    gate.ran(digest, output_names)                           # after it
    gate.check_open(name, what, shape)                       # before a share leaves
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..errors import Refused
from ..model_owner.approval import Approval, check_cap, check_request
from ..programs import WEIGHT, weight_names

class Gate:
    """A compute party's record of what it may run and open: the model owner's approvals by
    digest, and each resident variable's origin (the approved program and output that wrote it)
    and reveal mark. Every refusal is :class:`Refused`, in one line, raised before anything runs
    or leaves."""

    def __init__(self, policy, party: str):
        self.policy, self.party = policy, party
        self.approved: dict = {}  # digest -> (Approval, ExecutableProto)
        self.origin: dict = {}  # var -> (program name, output key)
        self.marks: dict = {}  # var -> the reveal kind its approval lets it open as
        self.source: dict = {}  # var -> the digest of the approved program that wrote it

    def admit(self, approval: Approval, exe: bytes) -> None:
        """Keep the model owner's approved executable, re-checked against this party's own policy."""
        from spu import spu_pb2

        if hashlib.sha256(exe).hexdigest() != approval.digest:
            raise Refused(f"{self.party}: the executable's digest is not its approval's {approval.digest}")
        check_request(self.policy, approval)
        self.approved[approval.digest] = (approval, spu_pb2.ExecutableProto.FromString(exe))

    def bind(self, digest: str, input_names: list, output_names: list):
        """The approved executable ``digest`` reading ``input_names`` (the weights w0.. in order,
        then one variable per argument, none a weight, each holding what its approval needs) and
        writing ``output_names`` (no weight)."""
        from spu import spu_pb2

        if digest not in self.approved:
            raise Refused(f"{self.party} refuses executable {digest}: the model owner has not approved it; "
                                  "nothing ran")
        approval, exe = self.approved[digest]
        ins, outs, name = list(input_names), list(output_names), approval.request.program.name
        n, arg_names = approval.n_params, [a for a, _ in approval.request.args]
        if ins[:n] != weight_names(n) or len(ins) != n + len(arg_names) or len(outs) != len(approval.request.outs):
            raise Refused(f"{self.party} refuses {name} ({digest[:12]}): it must read the weights in order, "
                                  f"then {len(arg_names)} arguments, and write {len(approval.request.outs)} outputs")
        for var in ins[n:] + outs:
            if WEIGHT.fullmatch(var):
                raise Refused(f"{self.party} refuses {name} ({digest[:12]}): a weight ({var}) is bound to an "
                                      "argument or an output")
        for arg, var in zip(arg_names, ins[n:]):
            need = approval.needs.get(arg)
            if need and self.origin.get(var) != tuple(need):
                raise Refused(f"{self.party} refuses {name} ({digest[:12]}): its {arg!r} must be the {need[1]!r} "
                                      f"output of an approved {need[0]!r} program, and {var!r} is not")
        return spu_pb2.ExecutableProto(name=exe.name, code=exe.code, input_names=ins, output_names=outs)

    def ran(self, digest: str, output_names: list) -> None:
        """After an approved run: its outputs' origins and reveal marks."""
        approval = self.approved[digest][0]
        self.forget(*output_names)
        for key, var in zip(approval.request.outs, output_names):
            self.origin[var] = (approval.request.program.name, key)
            self.source[var] = digest
            if key in approval.opens:
                self.marks[var] = approval.opens[key]

    def kept_origins(self, names: list) -> list[bytes]:
        """What each of ``names`` is, for a copy kept on this party's disk (``origin_tag``): the
        approved program and output that wrote it. Never a weight: a copy could come back as
        something else."""
        weights = [n for n in names if WEIGHT.fullmatch(str(n))]
        if weights:
            raise Refused(f"{self.party} refuses to keep {weights[0]!r}: weights are not set-up shares")
        return [origin_tag(self.source.get(n), self.origin.get(n)) for n in names]

    def restored_origins(self, digest: str | None, n_outputs: int) -> list[bytes]:
        """What each output of the approved program ``digest`` must have been kept as to be
        restored as that output (None: a program of the data owner's own, which never opens)."""
        if digest is None:
            return [origin_tag(None, None)] * n_outputs
        request = self.approved[digest][0].request
        return [origin_tag(digest, (request.program.name, k)) for k in request.outs]

    def forget(self, *names: str) -> None:
        """``names`` were overwritten (by the data owner, or a program of no approval) or dropped."""
        for n in names:
            self.origin.pop(n, None)
            self.marks.pop(n, None)
            self.source.pop(n, None)

    def check_open(self, name: str, what: str, shape) -> None:
        """May a share of ``name`` leave, to the data owner, as ``what``: an output its approval
        marks as that kind, within this party's policy's cap for it."""
        if self.marks.get(name) != what:
            raise Refused(f"{self.party}: {name!r} is not an output its approved program opens as {what!r}; "
                                  "its share stays here")
        check_cap(self.policy, what, shape, f"{name!r}")


    def record(self, name: str, what: str, shape, job: str | None = None) -> dict:
        """The audit record of a share of ``name`` handed to the data owner as ``what``."""
        program, output = self.origin.get(name, (None, None))
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "party": self.party, "job": job, "var": name,
                "what": what, "shape": list(shape), "to": "data_owner", "program": program, "output": output,
                "digest": self.source.get(name)}


def origin_tag(digest: str | None, origin) -> bytes:
    """What a kept share was: the approved program's digest and its (program, output) (None, None
    for a program of the data owner's own, which never opens)."""
    return f"{digest}|{'/'.join(origin) if origin else None}".encode()


def append_audit(path, record: dict) -> None:
    """Append ``record`` to a party's own audit log (JSONL, its directory 0700, the file 0600)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(record) + "\n")


def share_shape(share) -> tuple:
    """The shape of an SPU share, from its own metadata (not from anyone's claim)."""
    from spu import spu_pb2

    meta = spu_pb2.ValueMetaProto()
    meta.ParseFromString(share.meta)
    return tuple(meta.shape.dims)
