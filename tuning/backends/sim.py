"""SPU simulator back end: every party's runtime in this process, linked in memory.

Unlike ``spu.utils.simulation.Simulator`` (new runtimes and fresh shares on every call), the
runtimes live as long as the back end: the model owner's weights are secret-shared **once** and
stay resident as shares in each party's runtime, and so does anything a program leaves behind
(for example a prefix cache). Each call shares only the data owner's new inputs.
Traffic is read from SPU's profile log of party 0 (the simulator's parties share one stdout, so
their lines cannot be told apart: only party 0 profiles here; the cluster measures every party).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import jax
import numpy as np

from .cost import CallCost, capture_fd_stdout, parse_profile
from .session import Session
from .state import PartyStore, digest, to_share
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
        # model owner: share the weights once; they stay resident in every runtime
        for name, leaf in zip(param_names(bundle.params), jax.tree_util.tree_leaves(bundle.params)):
            self._set(name, np.asarray(leaf, np.float32))

    def _set(self, name, value):
        for rt, share in zip(self.runtimes, self.io.make_shares(value, self._vis)):
            rt.set_var(name, share)

    def _put(self, name: str, value) -> None:
        self._set(name, value)

    def _compile(self, program, arg_shapes, out_keys):
        return compile_session_program(program, self._params_shapes, arg_shapes, out_keys)

    # set-up shares on disk: one store per simulated party (the cluster's nodes keep their own)
    def keep_state(self, root) -> None:
        self.state = [PartyStore(Path(root) / p.name) for p in self.policy.compute]

    def _program_digest(self, exe) -> str:
        return digest(exe.code)

    def _kept(self, keys):
        return all(st.has(k) for st in self.state for k in keys)

    def _keep(self, outs, keys):
        for st, rt in zip(self.state, self.runtimes):
            for name, key in zip(outs, keys):
                share = rt.get_var(name)
                st.save(key, share.meta, share.share_chunks)

    def _restore(self, outs, keys):
        for st, rt in zip(self.state, self.runtimes):
            for name, key in zip(outs, keys):
                rt.set_var(name, to_share(*st.load(key)))

    def _execute(self, exe, ins, outs):
        exe = bind(exe, self._params_shapes, ins, outs)
        t0 = time.perf_counter()
        with capture_fd_stdout() as log:
            _run_parallel([(lambda rt=rt: rt.run(exe)) for rt in self.runtimes])
        links, ops = parse_profile(log[0])
        parties = {self.policy.compute[0].name: links[-1]} if links else {}
        return CallCost(time.perf_counter() - t0, parties, ops)

    def _reconstruct(self, name: str) -> np.ndarray:
        return np.asarray(self.io.reconstruct([rt.get_var(name) for rt in self.runtimes]), np.float32)

    def drop(self, *names: str) -> None:
        for name in names:
            for rt in self.runtimes:
                rt.del_var(name)
            self.shapes.pop(name, None)
        self._unmark(*names)

    def close(self):
        self.runtimes = []
