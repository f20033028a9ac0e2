"""Compilation of the forward function to SPU IR, shared by the simulator and the cluster."""
from __future__ import annotations

import re
from collections import Counter

import jax
import numpy as np

from spu_models.forward import make_forward

# op-census groups: pphlo op names (without the dialect prefix) per reported category
CENSUS = {
    "dot": ("dot", "dot_general", "convolution"),
    "exp": ("exponential", "exponential_minus_one"),
    "divide/reciprocal": ("divide", "reciprocal"),
    "rsqrt": ("rsqrt", "sqrt"),
    "comparisons": ("less", "greater", "less_equal", "greater_equal", "equal", "not_equal", "max", "min",
                    "maximum", "minimum", "sign", "abs", "select"),
    "sin/cos": ("sine", "cosine"),
    "tanh/logistic": ("tanh", "logistic"),
    "log": ("log", "log_plus_one"),
}


WEIGHT = re.compile(r"w[0-9]+")  # the model owner's variables (its weights); every other one is the data owner's


def weight_names(n: int) -> list[str]:
    """The runtime variables of the model owner's ``n`` weights, in the order programs read them."""
    return [f"w{i}" for i in range(n)]


def param_names(params) -> list[str]:
    return weight_names(len(jax.tree_util.tree_leaves(params)))


def shapes_of(params):
    """The weights' tree of shapes (float32): all that compiling a program needs of them."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), params)


def compile_forward(config, execution, embedding: str, params, batch: dict, copts=None):
    """SPU executable of the verbalizer-logits ``forward(params, batch)``: inputs w0.. (weights) and
    x_<key> (batch), output ``logits``. Shapes only are used."""
    fwd = make_forward(config, execution, embedding)
    inputs = {f"x_{k}": batch[k] for k in sorted(batch)}
    return compile_program(lambda p, **x: {"logits": fwd(p, {k[2:]: v for k, v in x.items()})}, params, inputs,
                           ["logits"], copts)


def compile_program(fn, params_shapes, inputs: dict, outputs: list, copts=None):
    """SPU executable of ``fn(params, **inputs) -> dict`` reading runtime vars w0.. (weights) and
    the names in ``inputs`` (name -> array or shape), writing the vars named in ``outputs``
    (the keys of fn's result, in that order). Everything is secret."""
    import spu.utils.frontend as fe
    from spu import spu_pb2

    leaves, tree = jax.tree_util.tree_flatten(params_shapes)
    names = list(inputs)

    def flat_fn(*args):
        p = jax.tree_util.tree_unflatten(tree, args[: len(leaves)])
        res = fn(p, **dict(zip(names, args[len(leaves):])))
        return [res[o] for o in outputs]

    mock = [np.zeros(np.shape(x), np.float32) for x in leaves] + [np.zeros(np.shape(inputs[n]), np.float32) for n in names]
    in_names = param_names(params_shapes) + names
    exe, _ = fe.compile(fe.Kind.JAX, flat_fn, tuple(mock), {}, in_names,
                        [spu_pb2.Visibility.VIS_SECRET] * len(in_names), lambda out: list(outputs),
                        copts=copts or spu_pb2.CompilerOptions())
    return exe


def compile_session_program(program, params_shapes, arg_shapes: dict, out_keys: list):
    """A session program (``session.Session.run``) compiled for SPU: inputs the weights, then the
    arguments in ``arg_shapes`` order, outputs ``out_keys``; :func:`bind` names a call's vars."""
    return compile_program(program, params_shapes, {a: np.zeros(shape, np.float32) for a, shape in arg_shapes.items()},
                           out_keys)


def bind(exe, params_shapes, ins: list, outs: list):
    """The executable ``exe`` (from :func:`compile_session_program`) reading vars ``ins`` and writing ``outs``."""
    from spu import spu_pb2

    return spu_pb2.ExecutableProto(name=exe.name, code=exe.code, output_names=list(outs),
                                   input_names=param_names(params_shapes) + list(ins))


def op_census(pphlo_text: str) -> dict:
    counts = Counter(re.findall(r"pphlo\.(\w+)", pphlo_text))
    out = {group: sum(counts.get(op, 0) for op in ops) for group, ops in CENSUS.items()}
    out["total_ops"] = sum(v for k, v in counts.items() if k not in ("free", "constant"))
    return out
