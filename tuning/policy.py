"""MPC policies: declarative YAML in ``policies/`` naming the protocol, the fixed-point settings,
the approximations, the attention kind, and what is revealed to whom (to a role). A policy names
no party, address or key: where the parties run is a deployment's
(``tuning.transports.deployment``).

``load_policy("aby3")`` reads ``policies/aby3.yaml``; a path works too. Every problem is rejected
with a one-line :class:`PolicyError` naming the key.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from spu_models.approx import Approx
from spu_models.config import Execution
from spu_models.rfa import RFAConfig

from .errors import UserError

POLICY_DIR = Path(__file__).absolute().parent.parent / "policies"
PROTOCOL_PARTIES = {"ABY3": 3, "SEMI2K": 2, "CHEETAH": 2}
FIELDS = ("FM64", "FM128")
EMBEDDING = ("data_owner", "secret")
ATTENTION = ("softmax", "rfa")
RFA_FIELDS = ("features", "sincos", "bound", "chunk", "seed", "eps", "stabilizer")  # RFAConfig's, by name
RFA_KEYS = {"kind", "feature_map", "softmax_layers", *RFA_FIELDS}
TOP_KEYS = {"name", "description", "protocol", "field", "fxp_fraction_bits", "runtime", "approx",
            "attention", "embedding", "reveal", "timeout_s"}
REVEAL_TARGETS = {"data_owner"}
REVEALABLE = {"verbalizer_logits"}
CAP_KEYS = ("rows", "words")  # an opened [..., W] array: rows = the product of its leading dims, words = W


class PolicyError(UserError):
    """An invalid policy; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    protocol: str
    field: str
    fxp_fraction_bits: int
    runtime: dict
    execution: Execution  # approximations and attention: how the model runs (spu_models.config)
    embedding: str
    reveal: dict  # output kind -> the role it is opened to
    timeout_s: float
    source: str = ""
    caps: dict = dataclasses.field(default_factory=dict)  # output kind -> {rows, words}: the most one reveal opens

    COMPUTES = ("protocol", "field", "fxp_fraction_bits", "runtime", "execution", "embedding", "reveal", "caps")

    @property
    def world_size(self) -> int:
        """How many compute parties the protocol runs on."""
        return PROTOCOL_PARTIES[self.protocol]

    def computes_as(self) -> tuple:
        """What decides what this policy computes and opens (not where the parties are or their keys)."""
        return tuple((k, getattr(self, k)) for k in self.COMPUTES)

    def view(self) -> dict:
        """What it computes and opens, as text: the part of what processes must agree on that the
        policy decides (a deployment's ``view`` adds who runs where)."""
        return {k: repr(v) for k, v in self.computes_as()}

    def runtime_config(self, profile: bool = True):
        """The ``spu_pb2.RuntimeConfig`` this policy asks for."""
        from spu import spu_pb2

        rc = spu_pb2.RuntimeConfig(protocol=getattr(spu_pb2.ProtocolKind, self.protocol),
                                   field=getattr(spu_pb2.FieldType, self.field),
                                   fxp_fraction_bits=self.fxp_fraction_bits)
        for key, value in self.runtime.items():
            _set_runtime_field(rc, key, value, self.source)
        rc.enable_pphlo_profile = profile
        return rc


def view_differences(mine: dict, theirs: dict) -> list:
    """The keys at which two :meth:`Policy.view` s differ, sorted."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def _set_runtime_field(rc, key: str, value: Any, source: str) -> None:
    fd = rc.DESCRIPTOR.fields_by_name.get(key)
    if fd is None or key in ("protocol", "field", "fxp_fraction_bits"):
        raise PolicyError(f"{source}: runtime.{key} is not an SPU RuntimeConfig knob"
                          + (" (set it at the top level)" if fd is not None else ""))
    try:
        if fd.enum_type is not None and isinstance(value, str):
            value = fd.enum_type.values_by_name[value].number
        setattr(rc, key, value)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        allowed = [v.name for v in fd.enum_type.values] if fd.enum_type is not None else fd.type
        raise PolicyError(f"{source}: runtime.{key}={value!r} is invalid (allowed: {allowed}): {e}") from None


def _require(d: dict, key: str, source: str, where: str = ""):
    if key not in d:
        raise PolicyError(f"{source}: missing key {where}{key}")
    return d[key]


def parse_policy(d: Any, source: str = "<policy>") -> Policy:
    if not isinstance(d, dict):
        raise PolicyError(f"{source}: a policy must be a YAML mapping")
    if "parties" in d:
        raise PolicyError(f"{source}: unknown key 'parties': a policy names no party; addresses, ports and keys "
                          "are a deployment's (deployments/*.yaml)")
    extra = set(d) - TOP_KEYS
    if extra:
        raise PolicyError(f"{source}: unknown key {sorted(extra, key=str)[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    protocol = str(_require(d, "protocol", source)).upper()
    if protocol not in PROTOCOL_PARTIES:
        raise PolicyError(f"{source}: protocol {protocol!r} is unknown (known: {', '.join(PROTOCOL_PARTIES)})")
    field = str(d.get("field", "FM64")).upper()
    if field not in FIELDS:
        raise PolicyError(f"{source}: field {field!r} is unknown (known: {', '.join(FIELDS)})")
    fxp = d.get("fxp_fraction_bits", 18)
    limit = 30 if field == "FM64" else 60
    if not isinstance(fxp, int) or isinstance(fxp, bool) or not 8 <= fxp <= limit:
        raise PolicyError(f"{source}: fxp_fraction_bits must be an integer in [8, {limit}] for {field}")
    runtime = d.get("runtime") or {}
    if not isinstance(runtime, dict):
        raise PolicyError(f"{source}: runtime must be a mapping of SPU RuntimeConfig knobs")
    approx_d = d.get("approx") or {}
    if not isinstance(approx_d, dict):
        raise PolicyError(f"{source}: approx must be a mapping")
    try:
        approx = Approx(**approx_d)
    except TypeError:
        bad = sorted(set(approx_d) - {f.name for f in dataclasses.fields(Approx)})[0]
        raise PolicyError(f"{source}: unknown key approx.{bad}") from None
    except ValueError as e:
        raise PolicyError(f"{source}: {e}") from None
    attention, rfa, softmax_layers = _attention(d.get("attention", "softmax"), source)
    embedding = d.get("embedding", "data_owner")
    if embedding not in EMBEDDING:
        raise PolicyError(f"{source}: embedding {embedding!r} is unknown (known: {', '.join(EMBEDDING)})")
    reveal, caps = _reveal(d.get("reveal"), source)
    timeout = d.get("timeout_s", 60)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < 86400:
        raise PolicyError(f"{source}: timeout_s must be a number of seconds in (0, 86400)")
    execution = Execution(approx, attention, rfa, softmax_layers)
    _check_fixed_point(execution, field, fxp, source)
    pol = Policy(str(d.get("name", Path(source).stem)), protocol, field, fxp, dict(runtime), execution,
                 embedding, reveal, float(timeout), source, caps)
    pol.runtime_config()  # validates the runtime knobs now, not at first use
    return pol


def _reveal(r: Any, source: str) -> tuple:
    """``reveal: {KIND: {to: ROLE, rows: N, words: W}}`` -> ({kind: role}, {kind: {rows, words}}).
    Every kind that may be opened has a cap: the compute parties open at most rows x words of it
    per reveal (``model_owner.approval.check_cap``)."""
    if not isinstance(r, dict) or not r:
        raise PolicyError(f"{source}: reveal must be a mapping KIND -> {{to: data_owner, rows: N, words: W}}")
    roles, caps = {}, {}
    for k, v in r.items():
        if k not in REVEALABLE:
            raise PolicyError(f"{source}: unknown key reveal.{k} (only {sorted(REVEALABLE)} may be opened)")
        to = v.get("to") if isinstance(v, dict) else v
        if to not in REVEAL_TARGETS:
            raise PolicyError(f"{source}: reveal.{k} to {to!r}: outputs are opened only to the data_owner")
        if not isinstance(v, dict) or set(v) != {"to", *CAP_KEYS}:
            raise PolicyError(f"{source}: reveal.{k} needs its cap: {{to: data_owner, rows: N, words: W}} (the most "
                              "one reveal opens)")
        bad = [c for c in CAP_KEYS if not isinstance(v[c], int) or isinstance(v[c], bool) or v[c] < 1]
        if bad:
            raise PolicyError(f"{source}: reveal.{k}.{bad[0]} must be a positive integer")
        roles[k], caps[k] = to, {c: v[c] for c in CAP_KEYS}
    return roles, caps


def _check_fixed_point(execution, field: str, fxp: int, source: str) -> None:
    """Refuse, at load (before anything is shared), a configuration that would leave an
    approximation's valid input range or the field (``approx.fixed_point_problems``)."""
    from spu_models.approx import fixed_point_problems
    from spu_models.rfa import CLIP

    # softmax subtracts the row max and sigmoid takes -|x|: their exp arguments are <= 0; linear
    # attention's "mean" stabilizer caps them at CLIP instead, "max" keeps them <= 0
    rfa_mean = execution.attention == "rfa" and execution.rfa.stabilizer == "mean"
    problems = fixed_point_problems(execution.approx, field, fxp, max_exp_arg=CLIP if rfa_mean else 0.0)
    if problems:
        raise PolicyError(f"{source}: {problems[0]}")


def _attention(a, source: str):
    """``attention: softmax`` or ``attention: {kind: rfa, feature_map: positive|learned, features: 32,
    chunk, seed, eps, stabilizer: max|mean, softmax_layers: [..]}``.

    ``feature_map: trig`` is refused: its attention denominator is a signed Monte Carlo estimate,
    floored at ``eps``, which reaches zero once q, k exceed per-coordinate scale ~0.3 (at head dim
    64; mean error 775 at 0.6, bench/results/attention_*.md) and no policy setting bounds a
    model's q, k there (SmolLM2-135M's: RMS 1.2-2.8). It would return garbage without a sign."""
    if isinstance(a, str):
        a = {"kind": a}
    if not isinstance(a, dict):
        raise PolicyError(f"{source}: attention must be a kind name or a mapping")
    extra = set(a) - RFA_KEYS
    if extra:
        raise PolicyError(f"{source}: unknown key attention.{sorted(extra, key=str)[0]} (known: {', '.join(sorted(RFA_KEYS))})")
    kind = a.get("kind", "softmax")
    if kind not in ATTENTION:
        raise PolicyError(f"{source}: attention {kind!r} is unknown (known: {', '.join(ATTENTION)})")
    layers = a.get("softmax_layers", [])
    if not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0 for i in layers):
        raise PolicyError(f"{source}: attention.softmax_layers must be a list of layer indices")
    if a.get("feature_map") == "trig":
        raise PolicyError(f"{source}: attention.feature_map trig is refused: its denominator is a signed estimate "
                          "that reaches zero once q, k exceed scale ~0.3 (SmolLM2's are ~2), and the output "
                          "is then garbage; use positive or learned")
    kw = {k: a[k] for k in RFA_FIELDS if k in a}
    try:
        rfa = RFAConfig(kind=a.get("feature_map", "positive"), **kw)
    except (TypeError, ValueError) as e:
        raise PolicyError(f"{source}: attention: {e}") from None
    return kind, rfa, tuple(sorted(set(layers)))


def available_policies() -> list[str]:
    return sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))


def load_policy(name_or_path: str) -> Policy:
    p = Path(name_or_path)
    if not p.suffix:
        p = POLICY_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            raise PolicyError(f"unknown policy {name_or_path!r} (known: {', '.join(available_policies())}; "
                              "or give a path to a YAML file)")
    elif not p.exists():
        raise PolicyError(f"policy file {p} not found")
    return parse_policy(read_yaml(p, PolicyError), str(p))


def read_yaml(path: Path, error=PolicyError):
    """A YAML file's contents, or ``error`` in one line if it is unreadable, not UTF-8 or not YAML."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a UTF-8 text file (byte {e.start}); expected YAML") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None


# ------------------------------------------------------------------------------ policy <-> file
def policy_dict(policy) -> dict:
    """The YAML mapping that :func:`parse_policy` reads back as ``policy`` (a local deployment's
    party processes read it)."""
    ex = policy.execution
    attention = {"kind": ex.attention, "softmax_layers": list(ex.softmax_layers),
                 "feature_map": ex.rfa.kind, **{k: getattr(ex.rfa, k) for k in RFA_FIELDS}}
    return {"name": policy.name, "protocol": policy.protocol, "field": policy.field,
            "fxp_fraction_bits": policy.fxp_fraction_bits, "runtime": dict(policy.runtime),
            "approx": dataclasses.asdict(ex.approx), "attention": attention,
            "embedding": policy.embedding, "timeout_s": policy.timeout_s,
            "reveal": {k: {"to": to, **policy.caps[k]} for k, to in policy.reveal.items()}}


def dump_policy(policy, path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(policy_dict(policy), sort_keys=False))
    return path
