"""SPU simulator back end: every party's runtime in this process, linked in memory.

Unlike ``spu.utils.simulation.Simulator`` (new runtimes and fresh shares on every call), the
runtimes live as long as the back end: the model owner's weights are secret-shared **once** and
stay resident as shares in each party's runtime, and so does anything a program leaves behind
(for example a prefix cache). Each call shares only the data owner's new inputs.
As in the cluster, the model owner (a ``ModelOwner`` in this process) builds and compiles every
known program the data owner names, and each simulated party (a ``ComputeParty``, as on a node)
runs only approved digests and opens only what their approvals mark, within the policy's caps. A
function of the caller's own still runs here (benchmarks; one process holds the weights anyway),
but its outputs never open: ``unsafe_open`` only.
Traffic is read from SPU's profile log of party 0 (the simulator's parties share one stdout, so
their lines cannot be told apart: only party 0 profiles here; the cluster measures every party).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from ..compute_party.party import ComputeParty
from ..compute_party.state import digest as state_digest
from ..compute_party.traffic import capture_fd_stdout, echo_log, parse_profile
from ..model_owner.owner import ModelOwner
from ..programs import bind, compile_session_program, param_names
from .cost import CallCost
from .deployment import compute_names
from .session import Session


def _run_parallel(fns):
    """Run one callable per party concurrently; re-raise the first failure."""
    results, errors = [None] * len(fns), []

    def wrap(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class SimBackend(Session):
    name = "sim"

    def __init__(self, bundle, policy):
        import spu.api as spu_api
        from spu import libspu, spu_pb2

        super().__init__(bundle, policy)
        self.n = policy.world_size
        self.rc = policy.runtime_config(profile=True)
        boot = [""]
        try:  # SPU's start-up notices: only what is not benign reaches the user, even if start-up fails
            with capture_fd_stdout() as boot:
                self._start(spu_api, libspu, spu_pb2)
        finally:
            echo_log(boot[0])

    def _start(self, spu_api, libspu, spu_pb2) -> None:
        """The parties' runtimes, linked in memory, and the model owner's weights shared into them."""
        self.io = spu_api.Io(self.n, self.rc)
        self._vis = spu_pb2.Visibility.VIS_SECRET
        desc = libspu.link.Desc()
        for r in range(self.n):
            desc.add_party(f"p{r}", f"thread_{r}")

        def make_rt(rank):
            def mk():
                c = spu_pb2.RuntimeConfig()
                c.CopyFrom(self.rc)
                c.enable_pphlo_profile = rank == 0
                return spu_api.Runtime(libspu.link.create_mem(desc, rank), c)
            return mk

        runtimes = _run_parallel([make_rt(r) for r in range(self.n)])
        self.parties = [ComputeParty(name, self.policy, rt) for name, rt in zip(compute_names(self.policy), runtimes)]
        self.owner = ModelOwner(self.policy, self._bundle, self.execution)
        for name, value in self.owner.weights():  # shared once; resident in every party's runtime
            for party, share in zip(self.parties, self.io.make_shares(value, self._vis)):
                party.set_weight(name, share)

    def _put(self, name: str, value) -> None:
        for party, share in zip(self.parties, self.io.make_shares(value, self._vis)):
            party.put(name, share)

    def _compile(self, program, arg_shapes, out_keys):
        return compile_session_program(program, self._params_shapes, arg_shapes, out_keys)

    def _approve(self, request):
        """The model owner approves and compiles; the parties admit it. Compiled: the digest."""
        approval, exe = self.owner.approve(request)
        for party in self.parties:
            party.admit(approval, exe)
        return approval.digest, approval

    # set-up shares on disk: one store per simulated party (the cluster's nodes keep their own)
    keeps_state = True

    def _open_state(self, root) -> None:
        for party in self.parties:
            party.state_root = Path(root) / party.name
            party.open_state()
        self.state = root

    def _program_digest(self, compiled) -> str:
        return compiled if isinstance(compiled, str) else state_digest(compiled.code)

    def _kept(self, keys):
        return all(party.has(keys) for party in self.parties)

    def _keep(self, outs, keys):
        for party in self.parties:
            party.keep(outs, keys)

    def _restore(self, compiled, ins, outs, keys):
        digest = compiled if isinstance(compiled, str) else None  # None: a program of the caller's own
        for party in self.parties:
            party.restore(digest, param_names(self._params_shapes) + list(ins), outs, keys)

    def _execute(self, compiled, ins, outs):
        names = param_names(self._params_shapes) + list(ins)
        if isinstance(compiled, str):  # an approved digest
            calls = [(lambda p=p: p.run(compiled, names, outs)) for p in self.parties]
        else:  # a program of the caller's own: runs, never opens
            exe = bind(compiled, self._params_shapes, ins, outs)
            calls = [(lambda p=p: p.run_unapproved(exe)) for p in self.parties]
        t0 = time.perf_counter()
        with capture_fd_stdout() as log:  # the parties share this process's stdout: party 0 profiles
            _run_parallel(calls)
        links, ops = parse_profile(log[0])
        parties = {self.parties[0].name: links[-1]} if links else {}
        return CallCost(time.perf_counter() - t0, parties, ops)

    def _reconstruct(self, name: str, what: str | None) -> np.ndarray:
        if what is None:  # unsafe_open: this back end's benchmark escape
            shares = [party.unsafe_share(name) for party in self.parties]
        else:  # a reveal: every party's own check
            shares = [party.share_of(name, what) for party in self.parties]
        return np.asarray(self.io.reconstruct(shares), np.float32)

    def drop(self, *names: str) -> None:
        for party in self.parties:
            party.drop(list(names))
        for name in names:
            self.shapes.pop(name, None)
        self._unmark(*names)

    def close(self):
        self.parties = []
