"""The reference: exactly the programs SPU runs, under jax.jit, in the clear."""
from __future__ import annotations

import time

import jax
import numpy as np

from .cost import CallCost
from .session import Session


class PlaintextBackend(Session):
    name = "plaintext"
    chunk = None  # whole example sets per call, padded coarsely: few shapes to compile, cached across runs
    pad_multiple = 32
    scan_layers = True  # one layer body per program: a 30-layer program compiles in seconds, not minutes

    def __init__(self, bundle, policy):
        super().__init__(bundle, policy)
        self.params = bundle.params
        self.vars: dict = {}

    def lookup(self, ids) -> np.ndarray:
        """Token embeddings of ``ids`` (any shape): what the ``embed`` program computes from one-hot
        tokens under ``embedding: secret``, read from the table this back end holds in the clear."""
        from spu_models.forward import embedding_table

        return np.asarray(embedding_table(self.config, self.params), np.float32)[np.asarray(ids)]

    def _put(self, name, value):
        self.vars[name] = value

    def _compile(self, program, arg_shapes, out_keys):
        names = list(arg_shapes)

        def fn(params, arrays):
            res = program(params, **dict(zip(names, arrays)))
            return [res[k] for k in out_keys]

        return jax.jit(fn)

    def _execute(self, fn, ins, outs):
        t = time.perf_counter()
        res = fn(self.params, [self.vars[v] for v in ins])
        self.vars.update({o: np.asarray(r) for o, r in zip(outs, res)})
        return CallCost(time.perf_counter() - t, {})

    def _reconstruct(self, name, what=None):
        return np.asarray(self.vars[name], np.float32)

    def drop(self, *names):
        for n in names:
            self.vars.pop(n, None)
            self.shapes.pop(n, None)
        self._unmark(*names)

    def close(self):
        self.vars = {}
