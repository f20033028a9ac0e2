"""What a secure call cost the data owner: wall time, each measured party's traffic (read by the
party itself, ``compute_party.traffic``), the per-op profile, and a LAN/WAN estimate from a
stated model."""
from __future__ import annotations

import dataclasses


# Network presets of the SecP-Tuning paper's settings: (bandwidth bits/s, one-way latency s).
NETWORKS = {
    "lan": (3e9, 0.8e-3),
    "wan-100mbps": (100e6, 80e-3),
    "wan-200mbps": (200e6, 40e-3),
}


@dataclasses.dataclass
class CallCost:
    """One secure call. ``parties`` maps party name -> traffic (only parties whose log was read)."""

    wall_s: float
    parties: dict
    ops: dict = dataclasses.field(default_factory=dict)  # op -> {count, seconds, send_bytes}
    cpu_s: float = 0.0  # this process's CPU time during the call (in-process back ends: every party's)

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


def top_ops(ops: dict, n: int = 8) -> list:
    return sorted(ops.items(), key=lambda kv: -kv[1]["seconds"])[:n]


def format_cost(c: CallCost) -> str:
    mb = c.send_bytes / 1e6
    est = ", ".join(f"{n} {c.estimate(n):.1f}s" for n in NETWORKS)
    return (f"{c.wall_s:.2f}s wall, {mb:.2f} MB sent by the busiest of {len(c.parties)} measured parties, "
            f"{c.rounds} rounds; {est}")
