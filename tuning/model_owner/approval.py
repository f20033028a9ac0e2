"""What runs on the model owner's weights: only programs the model owner approved.

The data owner never sends code. It asks for a known program by name, public options and
argument shapes (a :class:`Request` of a :class:`ProgramRef`); the model owner builds that program
from its own registry (:func:`build`: the functions of ``spu_models.forward``), refuses it if an
output it lets open exceeds its policy's cap (:func:`check_request`), compiles it, and hands the
compute parties the executable with an :class:`Approval`: its digest, which outputs may be opened
and as which reveal kind, and which arguments must hold another approved program's output (the
``head`` that logits are scored against, whose word rows were checked one-hot inside MPC).

Every compute party keeps a ``compute_party.gate.Gate`` (on every transport): it runs
an executable only if its digest is approved, reading the weights in order and no weight as an
argument, and hands out a share only of an output its approval marks, within the cap:

    approval, exe = approve(config, execution, policy, params_shapes, request)   # the model owner
    gate.admit(approval, exe)                                                    # each compute party
    bound = gate.bind(digest, input_names, output_names)                         # before a run
    gate.ran(digest, output_names)                                               # after it
    gate.check_open(name, what, shape)                                           # before a share leaves
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from spu_models.forward import make_forward, make_tuning_programs

from ..errors import Refused
from ..programs import compile_session_program

TUNING = ("embed", "head", "prefill", "score_cached", "score_full", "prefill_deep", "deep_scale", "score_deep")
KNOWN = ("forward", *TUNING)
LOGITS = "verbalizer_logits"
# what each program's outputs may be opened as; every other output stays on the parties
OPENS = {"forward": {"logits": LOGITS}, "score_cached": {"logits": LOGITS}, "score_full": {"logits": LOGITS},
         "score_deep": {"logits": LOGITS}, "prefill_deep": {"zs_logits": LOGITS}}
# arguments that must hold an approved program's output: logits are scored against the head program's
# rows of the LM head, whose word rows it checked one-hot (a head of the data owner's own could be anything)
NEEDS = {name: {"head": ("head", "head")} for name in ("score_cached", "score_full", "score_deep", "prefill_deep")}
# the argument holding the word rows (one-hot [R, V]): R is the words of the logits opened from them
WORD_ROWS = {"head": "rows", "forward": "rows"}


@dataclasses.dataclass(frozen=True)
class ProgramRef:
    """A known program, by name and the public options that select it (the tuning programs: the
    soft prompt's depth and form). What the data owner names in place of code."""
    name: str
    depth: int | None = None
    form: str = "kv"


@dataclasses.dataclass(frozen=True)
class Request:
    """A program the data owner asks to run: its :class:`ProgramRef`, the shapes of its arguments
    ((name, shape) pairs, sorted by name) and the outputs it keeps, in order. Public."""
    program: ProgramRef
    args: tuple
    outs: tuple

    @classmethod
    def of(cls, program, arg_shapes: dict, outs) -> "Request":
        ref = program if isinstance(program, ProgramRef) else ProgramRef(str(program))
        args = tuple((a, tuple(int(d) for d in arg_shapes[a])) for a in sorted(arg_shapes))
        return cls(ref, args, tuple(outs))


@dataclasses.dataclass(frozen=True)
class Approval:
    """The model owner's word on one executable: its sha256 ``digest``, the request it answers,
    which outputs may be opened as which reveal kind (``opens``), every output's shape, and which
    arguments must hold which program's output (``needs``: argument -> (program, output))."""
    digest: str
    request: Request
    opens: dict
    out_shapes: dict
    needs: dict
    n_params: int


# ------------------------------------------------------------------------ the model owner's side
def build(config, execution, embedding: str, ref: ProgramRef):
    """The JAX function ``program(params, **inputs) -> dict`` known as ``ref`` (never the caller's code)."""
    if ref.name == "forward":
        fwd = make_forward(config, execution, embedding)
        return lambda params, **batch: {"logits": fwd(params, batch)}
    if ref.name not in TUNING:
        raise Refused(f"no program {ref.name!r} to approve (known: {', '.join(KNOWN)})")
    return make_tuning_programs(config, execution, ref.depth, ref.form)[ref.name]


def output_shapes(fn, params_shapes, arg_shapes: dict, out_keys: list) -> dict:
    """Output key -> shape of ``fn`` on these argument shapes (public: traced, nothing computed)."""
    import jax

    args = {a: jax.ShapeDtypeStruct(shape, np.float32) for a, shape in arg_shapes.items()}
    res = jax.eval_shape(lambda p, a: fn(p, **a), params_shapes, args)
    return {k: tuple(res[k].shape) for k in out_keys}


def describe(request: Request, out_shapes: dict, n_params: int, digest: str = "") -> Approval:
    """The approval of ``request``: the registry's reveal kinds and needs for the outputs it keeps."""
    name, outs, args = request.program.name, set(request.outs), dict(request.args)
    opens = {k: kind for k, kind in OPENS.get(name, {}).items() if k in outs}
    needs = {a: src for a, src in NEEDS.get(name, {}).items() if a in args}
    return Approval(digest, request, opens, dict(out_shapes), needs, n_params)


def check_cap(policy, kind: str, shape, what: str) -> None:
    """Refused (one line) unless ``policy`` opens ``kind`` to the data owner and an array
    of ``shape`` [..., W] is within its cap: rows (the leading dims' product) and words (W)."""
    if policy.reveal.get(kind) != "data_owner":
        raise Refused(f"policy {policy.name!r} does not reveal {kind!r} to the data owner")
    cap = policy.caps[kind]
    shape = tuple(shape) or (1,)
    rows, words = int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])
    if rows > cap["rows"] or words > cap["words"]:
        raise Refused(f"{what} would open {rows} rows x {words} words of {kind}, over policy "
                              f"{policy.name!r}'s cap of {cap['rows']} x {cap['words']} (the model owner's reveal.{kind})")


def check_request(policy, approval: Approval) -> None:
    """Refuse an approval whose opened outputs, or whose word rows, exceed ``policy``'s caps."""
    name = approval.request.program.name
    for key, kind in approval.opens.items():
        check_cap(policy, kind, approval.out_shapes[key], f"{name}'s {key}")
    rows = dict(approval.request.args).get(WORD_ROWS.get(name))
    cap = policy.caps.get(LOGITS)
    if rows and cap and rows[0] > cap["words"]:
        raise Refused(f"{name} would score {rows[0]} word rows, over policy {policy.name!r}'s cap of "
                              f"{cap['words']} words (the model owner's reveal.{LOGITS})")


def approve(config, execution, policy, params_shapes, request: Request) -> tuple:
    """The model owner: build ``request``'s program, check it against ``policy``, compile it.
    Returns (its :class:`Approval`, the serialized executable); Refused if refused."""
    import jax

    args, outs = dict(request.args), list(request.outs)
    execution = dataclasses.replace(execution, scan_layers=False)  # for SPU: a scan would copy every weight share
    try:
        fn = build(config, execution, policy.embedding, request.program)
        shapes = output_shapes(fn, params_shapes, args, outs)
    except Refused:
        raise
    except (TypeError, ValueError, KeyError) as e:  # options, arguments or outputs the program does not have
        raise Refused(f"no {request.program.name} program for this request ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:200]})") from None
    approval = describe(request, shapes, len(jax.tree_util.tree_leaves(params_shapes)))
    check_request(policy, approval)  # before compiling: a refused request costs nothing
    exe = compile_session_program(fn, params_shapes, args, outs).SerializeToString()
    return dataclasses.replace(approval, digest=hashlib.sha256(exe).hexdigest()), exe
