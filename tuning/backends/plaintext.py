"""The reference: exactly the function SPU runs, under jax.jit, in the clear."""
from __future__ import annotations

import time

import jax
import numpy as np

from spu_models.forward import make_forward

from ..cost import CallCost


class PlaintextBackend:
    name = "plaintext"

    def __init__(self, bundle, policy):
        self.params = bundle.params
        self._fn = jax.jit(make_forward(bundle.config, policy.embedding))
        self.costs: list = []

    def forward(self, batch: dict) -> np.ndarray:
        t = time.perf_counter()
        out = np.asarray(self._fn(self.params, batch))
        self.costs.append(CallCost(time.perf_counter() - t, {}))
        return out

    def close(self):
        pass
