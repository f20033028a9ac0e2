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
        self._owner_params = bundle.params  # in-process back ends hold the model owner's weights
        self.shapes: dict = {}  # resident var name -> shape
        self._programs: dict = {}
        self.costs: list = []

    # ---- what the data owner may learn of the weights (the cluster back end asks the model owner)
    def embedding_table(self) -> np.ndarray:
        """The token-embedding table, under policy ``embedding: data_owner`` only (which hands the
        table to the data owner, so that it embeds its own tokens)."""
        if self.policy.embedding != "data_owner":
            raise PermissionError(f"policy {self.policy.name!r} keeps the embedding table secret "
                                  f"(embedding: {self.policy.embedding}); the data owner does not get it")
        from spu_models.forward import embedding_table

        return np.asarray(embedding_table(self.config, self._owner_params), np.float32)

    def embedding_stats(self):
        """Public statistics of the embedding table (shape, std of its entries): the scale of the
        search subspace, under every policy."""
        from spu_models.forward import embedding_table

        from ..subspace import EmbeddingStats

        return EmbeddingStats.of(np.asarray(embedding_table(self.config, self._owner_params)))

    # ---- back ends implement: put, open, drop, _execute(compiled, outputs) -> CallCost, close
    def run(self, program, inputs: dict, outputs, key: str | None = None):
        """Run ``program`` on resident vars. ``inputs`` maps argument name -> var name; ``outputs``
        lists the result keys to keep, or maps result key -> var name. Returns the CallCost."""
        outmap = dict(outputs) if isinstance(outputs, dict) else {o: o for o in outputs}
        sig = (key or getattr(program, "__name__", "program"), tuple(sorted(inputs.items())),
               tuple((v, self.shapes[v]) for v in inputs.values()), tuple(outmap.items()))
        if sig not in self._programs:
            self._programs[sig] = (self._compile(program, dict(inputs), outmap),
                                   self._output_shapes(program, inputs, outmap))
        compiled, out_shapes = self._programs[sig]
        cost = self._execute(compiled, list(outmap.values()))
        self.costs.append(cost)
        self.shapes.update(out_shapes)  # public: shapes follow from the program and input shapes
        return cost

    def _output_shapes(self, program, inputs, outmap) -> dict:
        import jax

        args = {arg: jax.ShapeDtypeStruct(self.shapes[var], np.float32) for arg, var in inputs.items()}
        res = jax.eval_shape(lambda p, a: program(p, **a), self._params_shapes, args)
        return {var: tuple(res[key].shape) for key, var in outmap.items()}

    def _compile(self, program, inputs, outmap):
        def by_var(params, **vars_):
            res = program(params, **{arg: vars_[var] for arg, var in inputs.items()})
            return {var: res[key] for key, var in outmap.items()}

        return compile_program(by_var, self._params_shapes,
                               {var: np.zeros(self.shapes[var], np.float32) for var in inputs.values()},
                               list(outmap.values()))

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
