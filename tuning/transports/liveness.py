"""Liveness, one mechanism for every transport: a :class:`Watch` beats every peer once a second
from its own thread, and calls ``on_fatal(kind, peer, message)`` once when a peer does not come up
within ``startup_s`` (``missing``), is gone (``lost``) or stops answering (``stalled``).

Each transport says only how to dial a peer and send one beat (a :class:`Beat`):
- SecretFlow jobs (``sfcluster.Watchdog``): every party watches every other party's watch port
  over mutual TLS; a beat is a byte answered by ``!``, or ``.`` by a party that leaves in order;
- the cluster back end (``cluster.ClusterBackend``): the data owner's driver watches every node
  for the whole session; a beat is the node's ``ping`` call (gRPC, mutual TLS), and a lost or
  stalled node fails the call in flight (``rpc.gather``) with a line naming it.
"""
from __future__ import annotations

import threading
import time

from .procs import STARTUP_S


class Lost(Exception):
    """The peer is gone (its process ended, its connection broke); the message names it."""


class Stalled(Exception):
    """The peer did not answer one beat within the stall bound; the message names it."""


class Beat:
    """One peer's link as a :class:`Watch` uses it: ``beat(stall_s)`` sends one heartbeat and
    returns ``"ok"``, or ``"done"`` when the peer left in order; it raises :class:`Lost` or
    :class:`Stalled`. ``close()`` releases the link."""

    def beat(self, stall_s: float) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def timing(timeout_s: float) -> tuple:
    """(beat interval, stall bound) for a policy's ``timeout_s``: a beat a second (faster for a
    short timeout), and a peer silent for ``timeout_s`` less two beats is stalled, so that it is
    named before the policy's timeout runs out."""
    interval = min(1.0, timeout_s / 10)
    return interval, max(1.0, timeout_s - 2 * interval)


class Watch:
    """Beats every peer of ``peers`` from a thread of its own (see the module doc).

    ``dial(peer) -> Beat`` opens a peer's link; an ``OSError`` means "not up yet" and is retried
    until ``startup_s`` (its ``why`` attribute, if any, ends the ``missing`` message).
    ``label(peer)`` names the peer in messages ("party p1 (10.0.0.2:63020)")."""

    def __init__(self, peers: list, timeout_s: float, on_fatal, dial, startup_s: float = STARTUP_S,
                 label=lambda p: f"party {p.name}"):
        self.peers, self.on_fatal, self.dial, self.label = list(peers), on_fatal, dial, label
        self.timeout_s, self.startup_s = float(timeout_s), float(startup_s)
        self.interval, self.stall_s = timing(self.timeout_s)
        self.up = {p.name: threading.Event() for p in self.peers}
        self.done = {p.name: threading.Event() for p in self.peers}  # left in order
        self._stopped = threading.Event()
        self._fired = threading.Lock()

    def start(self) -> "Watch":
        for p in self.peers:
            threading.Thread(target=self._watch, args=(p,), daemon=True, name=f"watch-{p.name}").start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def wait_up(self, bound_s: float) -> bool:
        deadline = time.monotonic() + bound_s
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self.up.values())

    def wait_done(self, names: list, bound_s: float) -> list:
        """Wait until the peers ``names`` left in order (or ``bound_s``); the ones that did not."""
        deadline = time.monotonic() + bound_s
        return [n for n in names if not self.done[n].wait(max(0.0, deadline - time.monotonic()))]

    def fire(self, kind: str, peer: str, message: str) -> None:
        """``on_fatal`` once per watch, unless it was stopped."""
        if self._stopped.is_set() or not self._fired.acquire(blocking=False):
            return
        self.on_fatal(kind, peer, message)

    def _watch(self, peer) -> None:
        name = peer.name
        deadline = time.monotonic() + self.startup_s
        while True:
            if self._stopped.is_set():
                return
            try:
                link = self.dial(peer)
                break
            except Stalled as e:  # it accepted, then did not answer
                return self.fire("stalled", name, str(e))
            except OSError as e:
                if time.monotonic() > deadline:
                    return self.fire("missing", name, f"{self.label(peer)} did not come up within "
                                                      f"{self.startup_s:g}s{getattr(e, 'why', '')}")
                time.sleep(0.2)
        self.up[name].set()
        try:
            while not self._stopped.is_set():
                try:
                    state = link.beat(self.stall_s)
                except Stalled as e:
                    return self.fire("stalled", name, str(e))
                except Lost as e:
                    return self.fire("lost", name, str(e))
                if state == "done":
                    self.done[name].set()
                    return
                self._stopped.wait(self.interval)
        finally:
            link.close()
