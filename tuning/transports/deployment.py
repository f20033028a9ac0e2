"""Deployments: where the parties of a policy run, and with which keys. One file kind for both
multi-process back ends (the cluster back end's gRPC nodes and a SecretFlow job), parsed and
validated here once; every problem is one :class:`DeploymentError` line naming the file and key.

A **deployment file** (``deployments/*.yaml``, or any path) names the policy it runs and, per
party, its addresses and certificate::

    policy: aby3                     # a policy name, or a path relative to this file
    job_name: secptune-aby3          # SecretFlow matches messages by job name (optional)
    parties:
      p0:                            # compute party of rank 0
        cluster: {address: 10.0.0.1:61500, link: 10.0.0.1:61510}
        secretflow: {address: 10.0.0.1:63000, spu: 10.0.0.1:63010, watch: 10.0.0.1:63020,
                     listen: 0.0.0.0:63000}
        cert: keys/p0.pem            # pinned by every party; paths relative to this file
        key: keys/p0.key             # read only by p0's own process
      alice: {secretflow: {address: ..., watch: ...}, cert: ..., key: ...}   # the data owner
      bob: {cluster: {address: ...}, secretflow: {address: ..., watch: ...}} # the model owner

**Names follow from roles**: compute parties are ``p0``..``p{n-1}`` (their SPU rank; n from the
policy's protocol), the data owner is ``alice`` and the model owner ``bob``. Every one of them is
listed, and nothing else. A policy says what is computed and opened; it names no party.

- ``cluster`` (the cluster back end): ``address``, the party's gRPC node (compute parties and
  the model owner; the data owner is the driver and runs none), and ``link``, a compute party's
  SPU link (brpc).
- ``secretflow`` (``secptune sf-job``): ``address`` (SecretFlow's cross-silo link), ``watch``
  (liveness heartbeats), ``spu`` (compute parties: the SPU runtimes' link), and the bind
  addresses ``listen``, ``spu_listen``, ``watch_listen`` when the advertised ones are not local.
- ``cert`` / ``key`` (``secptune cluster keys``): every link between parties is TLS with pinned
  certificates (``tls``).

Either section may be left out; the back end that needs it says so in one line
(:meth:`Deployment.require`). Every address is its own port.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from ..errors import UserError
from ..policy import PROTOCOL_PARTIES, PolicyError, dump_policy, load_policy, read_yaml
from .procs import REPO, free_addresses

DEPLOYMENT_DIR = REPO / "deployments"
DATA_OWNER, MODEL_OWNER = "alice", "bob"
TOP_KEYS = {"policy", "job_name", "parties", "description"}
PARTY_KEYS = {"cluster", "secretflow", "cert", "key"}
SECTION_KEYS = {"cluster": ("address", "link"),  # in the order a written file lists them
                "secretflow": ("address", "spu", "watch", "listen", "spu_listen", "watch_listen")}
ROLE_TEXT = {"compute": "a compute party", "data_owner": "the data owner", "model_owner": "the model owner"}


class DeploymentError(UserError):
    """An invalid deployment file, or one without what a command needs; names the file and key."""


def party_roles(policy) -> dict:
    """Party name -> (role, rank) under ``policy``: the names follow from the roles."""
    out = {f"p{i}": ("compute", i) for i in range(PROTOCOL_PARTIES[policy.protocol])}
    out.update({DATA_OWNER: ("data_owner", -1), MODEL_OWNER: ("model_owner", -1)})
    return out


def compute_names(policy) -> list:
    return [f"p{i}" for i in range(PROTOCOL_PARTIES[policy.protocol])]


@dataclasses.dataclass(frozen=True)
class Party:
    name: str
    role: str  # compute | data_owner | model_owner
    rank: int = -1  # a compute party's SPU rank
    node: str = ""  # cluster: its gRPC node (the file's cluster.address)
    link: str = ""  # cluster: its SPU link (compute parties)
    address: str = ""  # secretflow: the cross-silo link, as the other parties reach it
    watch: str = ""  # secretflow: liveness heartbeats
    spu: str = ""  # secretflow: the SPU link (compute parties)
    listen: str = ""
    spu_listen: str = ""
    watch_listen: str = ""
    cert: str = ""  # its certificate (PEM), pinned by every party
    key: str = ""  # its private key: read only by this party's own process

    @property
    def ports(self) -> dict:
        """What this party's SecretFlow process listens on, by purpose (the bind addresses)."""
        out = {"secretflow": self.listen or self.address, "watch": self.watch_listen or self.watch}
        if self.spu:
            out["spu"] = self.spu_listen or self.spu
        return out


@dataclasses.dataclass(frozen=True)
class Deployment:
    policy: object  # tuning.policy.Policy
    policy_ref: str  # as the file names it (a name, or an absolute path)
    parties: tuple  # Party, sorted by name (SecretFlow's link ranks)
    job_name: str = "secptune"
    source: str = "<deployment>"

    def party(self, name: str) -> Party:
        for p in self.parties:
            if p.name == name:
                return p
        raise DeploymentError(f"{self.source}: no party {name!r} (parties: {', '.join(p.name for p in self.parties)})")

    @property
    def compute(self) -> list:
        """The compute parties in rank order (SPU's node order)."""
        return sorted((p for p in self.parties if p.role == "compute"), key=lambda p: p.rank)

    @property
    def data_owner(self) -> Party:
        return next(p for p in self.parties if p.role == "data_owner")

    @property
    def model_owner(self) -> Party:
        return next(p for p in self.parties if p.role == "model_owner")

    @property
    def nodes(self) -> list:
        """The parties that run a cluster node: the compute parties and the model owner."""
        return [*self.compute, self.model_owner]

    @property
    def timeout_s(self) -> float:
        return float(self.policy.timeout_s)

    def with_policy(self, policy) -> "Deployment":
        return dataclasses.replace(self, policy=policy)

    def view(self) -> dict:
        """What processes must agree on to work together, as text: what the policy computes and
        opens and who runs where (not their keys: TLS checks those)."""
        out = dict(self.policy.view())
        out.update({f"parties.compute[{p.rank}]": f"{p.name} {p.node} link {p.link}" for p in self.compute})
        out["parties.data_owner"] = self.data_owner.name
        out["parties.model_owner"] = f"{self.model_owner.name} {self.model_owner.node}"
        return out

    def require(self, section: str) -> "Deployment":
        """This deployment, if it has ``section``'s addresses (``cluster``, ``secretflow``)."""
        has = all(p.node for p in self.nodes) if section == "cluster" else all(p.address for p in self.parties)
        if not has:
            what = "the cluster back end's node addresses" if section == "cluster" else "SecretFlow's ports"
            raise DeploymentError(f"{self.source}: no {section} section: it gives {what} (parties.NAME.{section})")
        return self

    def key_of(self, me: str) -> str:
        """Party ``me``'s private key path, readable here (before any process or port starts)."""
        p = self.party(me)
        if p.key:
            try:
                with open(p.key, "rb"):
                    pass
            except OSError as e:
                raise DeploymentError(f"{self.source}: parties.{me}.key {p.key} cannot be read here "
                                      f"({e.strerror or e}); it is {me}'s private key") from None
        return p.key


# ------------------------------------------------------------------------------------- parsing
def _hostport(value, source: str, where: str) -> str:
    s = str(value)
    host, _, port = s.rpartition(":")
    if not isinstance(value, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentError(f"{source}: {where} {s!r} is not host:port (port 1-65535)")
    return s


def _section(spec: dict, section: str, name: str, role: str, source: str) -> dict:
    where = f"parties.{name}.{section}"
    d = spec[section]
    if not isinstance(d, dict):
        raise DeploymentError(f"{source}: {where} must be a mapping of addresses")
    bad = set(d) - set(SECTION_KEYS[section])
    if bad:
        raise DeploymentError(f"{source}: unknown key {where}.{sorted(bad, key=str)[0]}")
    if section == "cluster":
        if role == "data_owner":
            raise DeploymentError(f"{source}: {where}: {name} is the data owner, the driver, and runs no node")
        need, only = ("address", "link") if role == "compute" else ("address",), {"link"}
    else:
        need, only = ("address", "watch", "spu") if role == "compute" else ("address", "watch"), {"spu", "spu_listen"}
    for k in need:
        if k not in d:
            raise DeploymentError(f"{source}: missing key {where}.{k}")
    if role != "compute" and only & set(d):
        k = sorted(only & set(d))[0]
        raise DeploymentError(f"{source}: {where}.{k}: only compute parties run the SPU link ({name} is "
                              f"{ROLE_TEXT[role]})")
    out = {k: _hostport(v, source, f"{where}.{k}") for k, v in d.items()}
    if section == "cluster":
        out["node"] = out.pop("address")
    return out


def _check_ports(parties: list, source: str) -> None:
    """Every address (advertised or bound) is its own port: two listeners cannot share one."""
    seen: dict = {}
    for p in parties:
        uses = [("node", "cluster.address", p.node), ("link", "cluster.link", p.link),
                ("sf", "secretflow.address", p.address), ("sf", "secretflow.listen", p.listen),
                ("spu", "secretflow.spu", p.spu), ("spu", "secretflow.spu_listen", p.spu_listen),
                ("watch", "secretflow.watch", p.watch), ("watch", "secretflow.watch_listen", p.watch_listen)]
        for slot, where, a in uses:  # an advertised address and its bind address are one slot
            if not a:
                continue
            host, _, port = a.rpartition(":")
            key = (host.lower().replace("localhost", "127.0.0.1"), int(port))
            if key in seen and seen[key][0] != (p.name, slot):
                raise DeploymentError(f"{source}: parties.{p.name}.{where} {a} is also parties.{seen[key][1]}: "
                                      "every address needs its own port")
            seen.setdefault(key, ((p.name, slot), f"{p.name}.{where}"))


def parse_deployment(d, source: str = "<deployment>", base: Path | None = None, policy=None) -> Deployment:
    """A deployment file's mapping -> :class:`Deployment`. ``policy``: the policy object itself
    (a local deployment's), instead of loading the one ``d`` names."""
    if not isinstance(d, dict):
        raise DeploymentError(f"{source}: a deployment file must be a YAML mapping")
    extra = set(d) - TOP_KEYS
    if extra:
        raise DeploymentError(f"{source}: unknown key {sorted(extra, key=str)[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    if "policy" not in d:
        raise DeploymentError(f"{source}: missing key policy (a policy name, or a path relative to this file)")
    ref = str(d["policy"])
    if Path(ref).suffix and not Path(ref).is_absolute() and base is not None:
        ref = str((base / ref).resolve())
    if policy is None:
        try:
            policy = load_policy(ref)
        except PolicyError as e:
            raise DeploymentError(f"{source}: policy: {e}") from None
    job = d.get("job_name", "secptune")
    if not isinstance(job, str) or not job:
        raise DeploymentError(f"{source}: job_name must be a non-empty string")
    parties = d.get("parties")
    if not isinstance(parties, dict) or not parties:
        raise DeploymentError(f"{source}: parties must map each party's name to its addresses")
    roles = party_roles(policy)
    for name in parties:
        if name not in roles:
            raise DeploymentError(f"{source}: parties.{name}: unknown party {name!r}: policy {policy.name!r} "
                                  f"({policy.protocol}) has parties {', '.join(sorted(roles))}")
    missing = [n for n in sorted(roles) if n not in parties]
    if missing:
        raise DeploymentError(f"{source}: parties: {missing[0]} ({ROLE_TEXT[roles[missing[0]][0]]}) is not listed")
    folder = base if base is not None else Path(".")
    out = []
    for name in sorted(parties):
        spec, (role, rank) = parties[name], roles[name]
        if not isinstance(spec, dict):
            raise DeploymentError(f"{source}: parties.{name} must be a mapping (cluster, secretflow, cert, key)")
        bad = set(spec) - PARTY_KEYS
        if bad:
            raise DeploymentError(f"{source}: unknown key parties.{name}.{sorted(bad, key=str)[0]} "
                                  f"(known: {', '.join(sorted(PARTY_KEYS))})")
        kw = {}
        for section in SECTION_KEYS:
            if section in spec:
                kw.update(_section(spec, section, name, role, source))
        for k in ("cert", "key"):
            v = spec.get(k, "")
            if not isinstance(v, str):
                raise DeploymentError(f"{source}: parties.{name}.{k} must be a file path")
            # relative paths are the deployment file's own
            kw[k] = str((folder / v).absolute()) if v and not Path(v).is_absolute() else v
        if kw["key"] and not kw["cert"]:
            raise DeploymentError(f"{source}: parties.{name} names a key but no cert")
        if kw["cert"] and not os.path.isfile(kw["cert"]):
            raise DeploymentError(f"{source}: parties.{name}.cert {kw['cert']}: no such file (every party's "
                                  "certificate is pinned by every other)")
        out.append(Party(name, role, rank, **kw))
    dep = Deployment(policy, ref, tuple(out), job, source)
    for section, has in (("cluster", [bool(p.node) for p in dep.nodes]), ("secretflow", [bool(p.address) for p in out])):
        if any(has) and not all(has):
            lacking = [p.name for p, h in zip(dep.nodes if section == "cluster" else out, has) if not h][0]
            raise DeploymentError(f"{source}: missing key parties.{lacking}.{section} (other parties have theirs)")
    if not any(p.node or p.address for p in out):
        raise DeploymentError(f"{source}: no party has addresses (parties.NAME.cluster or .secretflow)")
    with_cert = [p.name for p in out if p.cert]
    if with_cert and len(with_cert) != len(out):
        raise DeploymentError(f"{source}: parties: {', '.join(p.name for p in out if not p.cert)} name no cert while "
                              "others do: every party needs its certificate (secptune cluster keys)")
    _check_ports(out, source)
    return dep


def deployment_path(ref) -> Path:
    """A deployment file's path: ``ref`` itself, or a shipped name (``deployments/NAME.yaml``)."""
    p = Path(ref)
    if not p.suffix and not p.exists():
        p = DEPLOYMENT_DIR / f"{ref}.yaml"
    if not p.is_file():
        shipped = ", ".join(sorted(q.stem for q in DEPLOYMENT_DIR.glob("*.yaml")))
        raise DeploymentError(f"deployment file {ref} not found (shipped: {shipped})")
    return p.absolute()


def load_deployment(ref) -> Deployment:
    p = deployment_path(ref)
    return parse_deployment(read_yaml(p, DeploymentError), str(p), p.parent)


def deployment_dict(dep: Deployment) -> dict:
    """The mapping :func:`parse_deployment` reads back as ``dep`` (paths absolute)."""
    parties = {}
    for p in dep.parties:
        d = {}
        if p.node:
            d["cluster"] = {"address": p.node, **({"link": p.link} if p.link else {})}
        if p.address:
            d["secretflow"] = {k: getattr(p, k) for k in SECTION_KEYS["secretflow"] if getattr(p, k)}
        d.update({k: getattr(p, k) for k in ("cert", "key") if getattr(p, k)})
        parties[p.name] = d
    return {"policy": dep.policy_ref, "job_name": dep.job_name, "parties": parties}


def dump_deployment(dep: Deployment, path, policy_file=None) -> Path:
    """Write ``dep`` to ``path``. ``policy_file``: write its policy object there too and name that
    file (a local deployment whose policy was changed in memory, e.g. a shorter timeout)."""
    path = Path(path)
    d = deployment_dict(dep)
    if policy_file is not None:
        d["policy"] = str(dump_policy(dep.policy, policy_file).absolute())
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def local_deployment(policy, host: str = "127.0.0.1", job_name: str | None = None) -> Deployment:
    """Every party of ``policy`` (a name, a path or a Policy) on this machine, on free ports, with
    both back ends' addresses (``--backend cluster`` and ``sf-job local`` without a file)."""
    if isinstance(policy, (str, Path)):
        ref = str(Path(policy).absolute()) if Path(policy).suffix else str(policy)
        pol = load_policy(ref)
    else:
        pol, ref = policy, policy.source or policy.name
    n = PROTOCOL_PARTIES[pol.protocol]
    addrs = iter(free_addresses(5 * n + 5, host))
    parties = {f"p{i}": {"cluster": {"address": next(addrs), "link": next(addrs)},
                         "secretflow": {"address": next(addrs), "spu": next(addrs), "watch": next(addrs)}}
               for i in range(n)}
    parties[DATA_OWNER] = {"secretflow": {"address": next(addrs), "watch": next(addrs)}}
    parties[MODEL_OWNER] = {"cluster": {"address": next(addrs)},
                            "secretflow": {"address": next(addrs), "watch": next(addrs)}}
    return parse_deployment({"policy": ref, "job_name": job_name or f"secptune-{pol.name}-{os.getpid()}",
                             "parties": parties}, f"<local {pol.name}>", policy=pol)
