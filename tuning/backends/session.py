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

from .spu_common import compile_program, param_names


class Session:
    name = "session"
    chunk: int | None = 16  # examples per secure call that bounds the parties' memory (None: any)
    pad_multiple = 16  # cached texts are padded to a multiple of this (coarser: fewer compilations)

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

    # ---- back ends implement: put, open, drop, _compile, _execute(compiled, ins, outs) -> CallCost, close
    def run(self, program, inputs: dict, outputs, key: str):
        """Run ``program`` on resident vars. ``inputs`` maps argument name -> var name; ``outputs``
        lists the result keys to keep, or maps result key -> var name. Returns the CallCost.

        A program is compiled once per ``key`` (its explicit name) and argument shapes, then bound
        to whatever vars a call names: the same program over another example chunk of the same
        shape reuses the compilation."""
        if not key:
            raise ValueError("a program needs an explicit key (its name in the session's program cache)")
        outmap = dict(outputs) if isinstance(outputs, dict) else {o: o for o in outputs}
        args = sorted(inputs)
        arg_shapes = {a: tuple(self.shapes[inputs[a]]) for a in args}
        sig = (key, tuple(arg_shapes.items()), tuple(outmap))
        if sig not in self._programs:
            self._programs[sig] = (self._compile(program, arg_shapes, list(outmap)),
                                   self._output_shapes(program, arg_shapes, list(outmap)))
        compiled, out_shapes = self._programs[sig]
        cost = self._execute(compiled, [inputs[a] for a in args], [outmap[k] for k in outmap])
        self.costs.append(cost)
        self.shapes.update({outmap[k]: shape for k, shape in out_shapes.items()})  # public: from the program
        return cost

    def _output_shapes(self, program, arg_shapes: dict, out_keys: list) -> dict:
        import jax

        args = {a: jax.ShapeDtypeStruct(shape, np.float32) for a, shape in arg_shapes.items()}
        res = jax.eval_shape(lambda p, a: program(p, **a), self._params_shapes, args)
        return {k: tuple(res[k].shape) for k in out_keys}

    def _compile(self, program, arg_shapes: dict, out_keys: list):
        """SPU back ends: an executable whose inputs are the weights, then the arguments in sorted
        order, and whose outputs are ``out_keys``; :func:`bind` names a call's vars."""
        return compile_program(program, self._params_shapes,
                               {a: np.zeros(shape, np.float32) for a, shape in arg_shapes.items()}, out_keys)

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


def bind(exe, params_shapes, ins: list, outs: list):
    """The executable ``exe`` (from ``Session._compile``) reading vars ``ins`` and writing ``outs``."""
    from spu import spu_pb2

    return spu_pb2.ExecutableProto(name=exe.name, code=exe.code, output_names=list(outs),
                                   input_names=param_names(params_shapes) + list(ins))


def _shapes(params):
    import jax

    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), params)
