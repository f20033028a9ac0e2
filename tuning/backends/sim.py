"""SPU simulator back end: every party's runtime in this process, linked in memory.

Unlike ``spu.utils.simulation.Simulator`` (new runtimes and fresh shares on every call), the
runtimes live as long as the back end: the model owner's weights are secret-shared **once** and
stay resident as shares in each party's runtime, and so does anything a program leaves behind
(for example a prefix cache). Each call shares only the data owner's new inputs.
As in the cluster, the model owner (here: ``approval.approve`` in this process) builds and
compiles every known program the data owner names, and the parties' :class:`approval.Gate` runs
only approved digests and opens only what their approvals mark, within the policy's caps. A
function of the caller's own still runs here (benchmarks; one process holds the weights anyway),
but its outputs never open: ``unsafe_open`` only.
Traffic is read from SPU's profile log of party 0 (the simulator's parties share one stdout, so
their lines cannot be told apart: only party 0 profiles here; the cluster measures every party).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import jax
import numpy as np

from .approval import Gate, approve, share_shape
from .cost import CallCost, capture_fd_stdout, parse_profile
from .session import Session
from .state import PartyStore, digest
from .spu_common import bind, compile_session_program, param_names


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

        self.runtimes = _run_parallel([make_rt(r) for r in range(self.n)])
        self.gate = Gate(policy, "the simulated parties")  # one check: every party's is the same
        # model owner: share the weights once; they stay resident in every runtime
        for name, leaf in zip(param_names(bundle.params), jax.tree_util.tree_leaves(bundle.params)):
            self._set(name, np.asarray(leaf, np.float32))

    def _set(self, name, value):
        for rt, share in zip(self.runtimes, self.io.make_shares(value, self._vis)):
            rt.set_var(name, share)

    def _put(self, name: str, value) -> None:
        self._set(name, value)
        self.gate.forget(name)

    def _compile(self, program, arg_shapes, out_keys):
        return compile_session_program(program, self._params_shapes, arg_shapes, out_keys)

    def _approve(self, request):
        """The model owner approves and compiles; the parties admit it. Compiled: the digest."""
        approval, exe = approve(self.config, self.execution, self.policy, self._params_shapes, request)
        self.gate.admit(approval, exe)
        return approval.digest, approval

    # set-up shares on disk: one store per simulated party (the cluster's nodes keep their own)
    keeps_state = True

    def _open_state(self, root) -> None:
        self.state = [PartyStore(Path(root) / p.name) for p in self.policy.compute]

    def _program_digest(self, compiled) -> str:
        return compiled if isinstance(compiled, str) else digest(compiled.code)

    def _kept(self, keys):
        return all(st.has(k) for st in self.state for k in keys)

    def _keep(self, outs, keys):
        for st, rt in zip(self.state, self.runtimes):
            st.keep(rt, outs, keys)

    def _restore(self, compiled, ins, outs, keys):
        """As if the approved program ran: the same checks of its inputs, then its outputs' shares
        from each party's own disk, with the origins and marks its approval gives them."""
        if isinstance(compiled, str):
            self.gate.bind(compiled, param_names(self._params_shapes) + list(ins), outs)
        for st, rt in zip(self.state, self.runtimes):
            st.restore(rt, outs, keys)
        self.gate.forget(*outs)
        if isinstance(compiled, str):
            self.gate.ran(compiled, outs)

    def _execute(self, compiled, ins, outs):
        digest = compiled if isinstance(compiled, str) else None  # else a program of the caller's own
        if digest:
            exe = self.gate.bind(digest, param_names(self._params_shapes) + list(ins), outs)
        else:
            exe = bind(compiled, self._params_shapes, ins, outs)
        self.gate.forget(*outs)
        t0 = time.perf_counter()
        with capture_fd_stdout() as log:
            _run_parallel([(lambda rt=rt: rt.run(exe)) for rt in self.runtimes])
        if digest:
            self.gate.ran(digest, outs)
        links, ops = parse_profile(log[0])
        parties = {self.policy.compute[0].name: links[-1]} if links else {}
        return CallCost(time.perf_counter() - t0, parties, ops)

    def _reconstruct(self, name: str, what: str | None) -> np.ndarray:
        shares = [rt.get_var(name) for rt in self.runtimes]
        if what is not None:  # a reveal: the parties' check (unsafe_open is this back end's benchmark escape)
            self.gate.check_open(name, what, share_shape(shares[0]))
        return np.asarray(self.io.reconstruct(shares), np.float32)

    def drop(self, *names: str) -> None:
        for name in names:
            for rt in self.runtimes:
                rt.del_var(name)
            self.shapes.pop(name, None)
        self._unmark(*names)
        self.gate.forget(*names)

    def close(self):
        self.runtimes = []
