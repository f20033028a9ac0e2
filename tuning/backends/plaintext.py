"""The reference: exactly the programs SPU runs, under jax.jit, in the clear."""
from __future__ import annotations

import time

import jax
import numpy as np

from ..cost import CallCost
from .session import Session


class PlaintextBackend(Session):
    name = "plaintext"

    def __init__(self, bundle, policy):
        super().__init__(bundle, policy)
        self.params = bundle.params
        self.vars: dict = {}

    def put(self, name, value):
        self.vars[name] = np.asarray(value, np.float32)
        self.shapes[name] = self.vars[name].shape

    def _compile(self, program, inputs, outmap):
        def fn(params, vars_):
            res = program(params, **{arg: vars_[var] for arg, var in inputs.items()})
            return [res[key] for key in outmap]

        return jax.jit(fn), list(inputs.values())

    def _execute(self, compiled, outputs):
        fn, var_names = compiled
        t = time.perf_counter()
        res = fn(self.params, {v: self.vars[v] for v in var_names})
        self.vars.update({o: np.asarray(r) for o, r in zip(outputs, res)})
        return CallCost(time.perf_counter() - t, {})

    def open(self, name):
        return np.asarray(self.vars[name], np.float32)

    def drop(self, *names):
        for n in names:
            self.vars.pop(n, None)
            self.shapes.pop(n, None)

    def close(self):
        self.vars = {}
