"""What every back end offers the data owner: named values held as secret shares by the compute
parties, programs run over them, and opening a result to the data owner.

    s.put("x", array)                       # data owner secret-shares an input
    s.run(program, {"x": "x"}, ["y"])       # y = program(weights, x), stays on the parties
    s.open("y")                             # reconstructed for the data owner only
    s.drop("x", "y")

``program(params, **inputs) -> dict`` is a pure JAX function; the model owner's weights are
always its first argument and were shared once when the back end was made. ``forward(batch)``
is the one-shot special case used by ``secptune forward``.
"""
from __future__ import annotations

import numpy as np

from spu_models.forward import make_forward

from .spu_common import compile_program


class Session:
    name = "session"

    def __init__(self, bundle, policy):
        self.config, self.policy = bundle.config, policy
        self._params_shapes = _shapes(bundle.params)
        self.shapes: dict = {}  # resident var name -> shape
        self._programs: dict = {}
        self.costs: list = []

    # ---- back ends implement: put, open, drop, _execute(compiled, outputs) -> CallCost, close
    def run(self, program, inputs: dict, outputs: list, key: str | None = None):
        """Run ``program`` on resident vars: ``inputs`` maps argument name -> var name."""
        names = {arg: var for arg, var in inputs.items()}
        sig = (key or getattr(program, "__name__", "program"), tuple(sorted(names.items())),
               tuple((v, self.shapes[v]) for v in names.values()), tuple(outputs))
        if sig not in self._programs:
            self._programs[sig] = self._compile(program, names, outputs)
        cost = self._execute(self._programs[sig], outputs)
        self.costs.append(cost)
        for o in outputs:
            self.shapes[o] = None  # shape known to the parties; not needed by the data owner
        return cost

    def _compile(self, program, names, outputs):
        def by_var(params, **vars_):
            return program(params, **{arg: vars_[var] for arg, var in names.items()})

        return compile_program(by_var, self._params_shapes,
                               {var: np.zeros(self.shapes[var], np.float32) for var in names.values()}, outputs)

    def forward(self, batch: dict) -> np.ndarray:
        """Share ``batch``, run the verbalizer-logits forward, open the logits, drop everything."""
        fwd = make_forward(self.config, self.policy.embedding)
        for k, v in batch.items():
            self.put(f"x_{k}", v)
        self.run(lambda params, **b: {"logits": fwd(params, b)}, {k: f"x_{k}" for k in batch}, ["logits"],
                 key="forward")
        try:
            return self.open("logits")
        finally:
            self.drop("logits", *[f"x_{k}" for k in batch])


def _shapes(params):
    import jax

    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), params)
