"""SPU simulator back end: every party's runtime in this process, linked in memory.

Unlike ``spu.utils.simulation.Simulator`` (new runtimes and fresh shares on every call), the
runtimes live as long as the back end: the model owner's weights are secret-shared **once** and
stay resident as shares in each party's runtime; each call shares only the data owner's batch.
Traffic is read from SPU's profile log of party 0 (the simulator's parties share one stdout, so
their lines cannot be told apart: only party 0 profiles here; the cluster measures every party).
"""
from __future__ import annotations

import threading
import time

import jax
import numpy as np

from ..cost import CallCost, capture_fd_stdout, parse_profile
from .spu_common import batch_names, compile_forward, param_names


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


class SimBackend:
    name = "sim"

    def __init__(self, bundle, policy):
        import spu.api as spu_api
        from spu import libspu, spu_pb2

        self.config, self.policy = bundle.config, policy
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
        self._params_shape = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.float32), bundle.params)
        self._shapes_only = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32),
                                                   bundle.params)
        for name, leaf in zip(param_names(bundle.params), jax.tree_util.tree_leaves(bundle.params)):
            shares = self.io.make_shares(np.asarray(leaf, np.float32), self._vis)
            for rt, share in zip(self.runtimes, shares):
                rt.set_var(name, share)
        self._exes: dict = {}
        self.costs: list = []

    def _executable(self, batch):
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in self._exes:
            self._exes[key] = compile_forward(self.config, self.policy.embedding, self._shapes_only, batch)
        return self._exes[key]

    def forward(self, batch: dict) -> np.ndarray:
        exe = self._executable(batch)
        t0 = time.perf_counter()
        names = batch_names(batch)
        for name, key in zip(names, sorted(batch)):  # data owner: share this call's batch
            for rt, share in zip(self.runtimes, self.io.make_shares(np.asarray(batch[key], np.float32), self._vis)):
                rt.set_var(name, share)

        def run(rt):
            def go():
                rt.run(exe)
                out = rt.get_var("logits")
                rt.del_var("logits")
                for name in names:
                    rt.del_var(name)
                return out
            return go

        with capture_fd_stdout() as log:
            outs = _run_parallel([run(rt) for rt in self.runtimes])
        logits = self.io.reconstruct(outs)  # opened to the data owner only
        links, ops = parse_profile(log[0])
        parties = {self.policy.compute[0].name: links[-1]} if links else {}
        self.costs.append(CallCost(time.perf_counter() - t0, parties, ops))
        return np.asarray(logits, np.float32)

    def close(self):
        self.runtimes = []
