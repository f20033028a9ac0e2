"""Cost of secure calls: wall time, bytes and send actions per party, per-op profile, and a
LAN/WAN estimate from a stated model.

SPU 0.9.3b0 has no Python API for traffic. With ``enable_pphlo_profile`` each runtime logs, after
every run, one line per op kind and a total:

    [api.cc:223] - pphlo.dot, executed 15 times, duration 0.06s, send bytes 458848 recv bytes ...
    [api.cc:233] Link details: total send bytes 7805296, recv bytes 7947696, send actions 2706, ...

We route SPU's log (stdout of the process that runs the runtime) to a file and parse it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile

LINK_RE = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), recv actions (\d+)")
OP_RE = re.compile(r"- (pphlo\.[\w.: ]+?), executed (\d+) times, duration ([\d.e+-]+)s, send bytes (\d+) "
                   r"recv bytes (\d+), send actions (\d+), recv actions (\d+)")

# Network presets of the SecP-Tuning paper's settings: (bandwidth bits/s, one-way latency s).
NETWORKS = {
    "lan": (3e9, 0.8e-3),
    "wan-100mbps": (100e6, 80e-3),
    "wan-200mbps": (200e6, 40e-3),
}


@dataclasses.dataclass
class PartyCost:
    send_bytes: int = 0
    recv_bytes: int = 0
    send_actions: int = 0
    recv_actions: int = 0

    def __iadd__(self, o: "PartyCost"):
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))
        return self


@dataclasses.dataclass
class CallCost:
    """One secure call. ``parties`` maps party name -> traffic (only parties whose log was read)."""

    wall_s: float
    parties: dict
    ops: dict = dataclasses.field(default_factory=dict)  # op -> {count, seconds, send_bytes}

    @property
    def send_bytes(self) -> int:
        """Bytes sent by the busiest party measured: comparable between the simulator (which
        measures party 0) and the cluster (every party), and what the network model needs."""
        return max((p.send_bytes for p in self.parties.values()), default=0)

    @property
    def total_send_bytes(self) -> int:
        """Bytes sent, summed over the parties measured."""
        return sum(p.send_bytes for p in self.parties.values())

    @property
    def rounds(self) -> int:
        """Send actions of the busiest party: a proxy for communication rounds."""
        return max((p.send_actions for p in self.parties.values()), default=0)

    def estimate(self, network: str) -> float:
        """time = compute + bytes / bandwidth + rounds x latency (bytes: the busiest party's)."""
        bw, lat = NETWORKS[network]
        return self.wall_s + self.send_bytes * 8 / bw + self.rounds * lat

    def to_json(self) -> dict:
        return {"wall_s": round(self.wall_s, 4), "send_bytes": self.send_bytes,
                "total_send_bytes": self.total_send_bytes, "rounds": self.rounds,
                "parties": {k: dataclasses.asdict(v) for k, v in self.parties.items()},
                "estimate_s": {n: round(self.estimate(n), 3) for n in NETWORKS},
                "ops": self.ops}


def parse_profile(text: str) -> tuple[list[PartyCost], dict]:
    """All "Link details" totals in ``text`` (one per run, in order) and the summed per-op table."""
    links = [PartyCost(*map(int, m.groups())) for m in LINK_RE.finditer(text)]
    ops: dict = {}
    for m in OP_RE.finditer(text):
        name = m.group(1).strip()
        o = ops.setdefault(name, {"count": 0, "seconds": 0.0, "send_bytes": 0})
        o["count"] += int(m.group(2))
        o["seconds"] += float(m.group(3))
        o["send_bytes"] += int(m.group(4))
    return links, ops


def top_ops(ops: dict, n: int = 8) -> list:
    return sorted(ops.items(), key=lambda kv: -kv[1]["seconds"])[:n]


@contextlib.contextmanager
def capture_fd_stdout():
    """Capture everything written to file descriptor 1 (SPU's C++ log) into ``box[0]``."""
    box = [""]
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield box
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            box[0] = tmp.read().decode("utf-8", errors="replace")


def format_cost(c: CallCost) -> str:
    mb = c.send_bytes / 1e6
    est = ", ".join(f"{n} {c.estimate(n):.1f}s" for n in NETWORKS)
    return (f"{c.wall_s:.2f}s wall, {mb:.2f} MB sent by the busiest of {len(c.parties)} measured parties, "
            f"{c.rounds} rounds; {est}")
