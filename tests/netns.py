"""Hosts for tests: one Linux network namespace per host, each with its own address on a private
/24, all joined by a bridge in the root namespace (veth pairs), made and removed by the test.

    with Hosts(["alice", "bob", "p0"], probe="probe") as hosts:
        hosts.ip("bob")                                   # 10.213.57.12
        proc = hosts.popen("bob", [sys.executable, ...])  # runs inside bob's namespace
        hosts.run("probe", [...])                         # a stranger on the same wire
        hosts.shape("bob", "100mbit")                     # a bandwidth cap on bob's link (tc tbf)

Every name is prefixed with ``sq<pid><n>`` (interfaces are at most 15 characters), so parallel
runs do not collide; two runs may use the same subnet, since the bridge has no address and each
run's namespaces see only their own bridge. On exit (also after a failure) every process started
through ``popen`` is ended (its process group), then any process still inside one of these
namespaces (only this run's processes can be in them), and the namespaces, veths and bridge are
deleted; the exit checks that ``ip netns list`` and ``ip link`` show none of them.

Needs root and a kernel with network namespaces: ``Hosts.__enter__`` calls ``pytest.skip`` (with
the reason) otherwise.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess

from tuning.transports.procs import kill_groups

SUBNET = "10.213.57"  # an unusual private /24: the namespaces' addresses are SUBNET.11, .12, ...
_COUNTER = itertools.count()


def _ip(*args, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def available() -> bool:
    """Whether this machine can make network namespaces (root, iproute2, kernel support): tries one."""
    if os.geteuid() != 0:
        return False
    name = f"secptune-probe-{os.getpid()}"
    try:
        if _ip("netns", "add", name, check=False).returncode != 0:
            return False
    except FileNotFoundError:
        return False
    _ip("netns", "del", name, check=False)
    return True


class Hosts:
    """Namespaces ``names`` (+ ``probe``, a stranger's host) on one bridge; see the module doc."""

    def __init__(self, names: list, probe: str | None = "probe", subnet: str = SUBNET, first: int = 11,
                 mtu: int | None = None):
        self.names = list(names) + ([probe] if probe else [])
        self.subnet, self.mtu = subnet, mtu
        self.prefix = f"sq{os.getpid()}{chr(ord('a') + next(_COUNTER) % 26)}"
        self.bridge = f"{self.prefix}br"
        self._ns = {n: f"{self.prefix}-{n}" for n in self.names}
        self._veth = {n: f"{self.prefix}v{i}" for i, n in enumerate(self.names)}
        self._addr = {n: f"{subnet}.{first + i if n != probe else 99}" for i, n in enumerate(self.names)}
        self._procs: list = []
        self._made_ns: list = []
        self._made_links: list = []

    # ------------------------------------------------------------------------------- set-up
    def __enter__(self) -> "Hosts":
        import pytest

        if os.geteuid() != 0:
            pytest.skip("network namespaces need root")
        first = self._ns[self.names[0]]
        try:
            p = _ip("netns", "add", first, check=False)
        except FileNotFoundError:
            pytest.skip("no `ip` command (iproute2)")
        if p.returncode != 0:
            pytest.skip(f"cannot make a network namespace here (ip netns add: {p.stderr.strip()})")
        self._made_ns.append(first)
        try:
            self._build()
        except BaseException:
            self._teardown()
            raise
        return self

    def _build(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, n in enumerate(self.names):
            ns, veth, peer = self._ns[n], self._veth[n], f"{self.prefix}p{i}"
            if ns not in self._made_ns:
                _ip("netns", "add", ns)
                self._made_ns.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer, *(["mtu", str(self.mtu)] if self.mtu else []))
            if self.mtu:
                _ip("link", "set", veth, "mtu", str(self.mtu))
            self._made_links.append(veth)  # deleting one end deletes the pair
            _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "link", "set", peer, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self._addr[n]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    # ------------------------------------------------------------------------------ use
    def ip(self, name: str) -> str:
        return self._addr[name]

    def netns(self, name: str) -> str:
        return self._ns[name]

    def cmd(self, name: str, argv: list) -> list:
        """``argv`` as run inside ``name``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self._ns[name], *map(str, argv)]

    def popen(self, name: str, argv: list, **kw) -> subprocess.Popen:
        """Start ``argv`` in ``name``'s namespace, in its own process group (ended on exit)."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.cmd(name, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, name: str, argv: list, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(name, argv), **kw)

    def shape(self, name: str, rate: str = "100mbit", burst: str = "32kbit", latency: str = "50ms") -> None:
        """Cap ``name``'s link both ways (a token bucket, ``tc tbf``, on each end of its veth: the
        bridge's end shapes what it receives, its own ``eth0`` what it sends); removed with the veth."""
        tbf = ["qdisc", "add", "dev", "{dev}", "root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        for argv in (["tc", *tbf], self.cmd(name, ["tc", *tbf])):
            dev = self._veth[name] if argv[0] == "tc" else "eth0"
            subprocess.run([a.replace("{dev}", dev) for a in argv], check=True, capture_output=True)

    def pids(self, name: str) -> list:
        """Every process inside ``name``'s namespace."""
        p = _ip("netns", "pids", self._ns[name], check=False)
        return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []

    # ---------------------------------------------------------------------------- tear-down
    def __exit__(self, *exc) -> None:
        self._teardown()

    def _teardown(self) -> None:
        kill_groups([p for p in self._procs if p.poll() is None], 5.0)  # each started in its own group
        # whatever is still inside one of our namespaces is ours (a child that left its group)
        for ns in self._made_ns:
            for pid in [int(x) for x in _ip("netns", "pids", ns, check=False).stdout.split()]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        errors = []
        for link in reversed(self._made_links):
            p = _ip("link", "del", link, check=False)
            if p.returncode != 0 and "Cannot find device" not in p.stderr:
                errors.append(f"ip link del {link}: {p.stderr.strip()}")
        for ns in self._made_ns:
            p = _ip("netns", "del", ns, check=False)
            if p.returncode != 0:
                errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
        left = self.leftovers()
        if errors or left:
            raise RuntimeError(f"network namespaces not fully removed: {errors} {left}")

    def leftovers(self) -> list:
        """Namespaces and links of this run that still exist."""
        ns = [ln.split()[0] for ln in _ip("netns", "list", check=False).stdout.splitlines() if ln.strip()]
        links = [ln.split(":")[1].strip().split("@")[0] for ln in _ip("-o", "link", check=False).stdout.splitlines()]
        return [x for x in ns + links if x.startswith(self.prefix)]
