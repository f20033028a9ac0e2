"""liveness.Watch, the one heartbeat loop of every transport, on scripted links: each way a peer
can fail is named once, a peer that leaves in order is not a failure, a stopped watch fires
nothing. The carriers are tested with real processes: SecretFlow's watch ports in test_sfjob
(test_watchdog_names_lost_and_stalled_peers_and_lets_leavers_go and the killed/stalled party
jobs), the cluster driver's ping beats in test_cluster and test_faults (killed nodes)."""
import threading
import types

from tuning.transports.liveness import Lost, Stalled, Watch, timing


class Script:
    """A peer's link that answers ``steps`` in turn: "ok", "done", or an exception to raise."""

    def __init__(self, steps):
        self.steps, self.closed = list(steps), False

    def beat(self, stall_s):
        step = self.steps.pop(0) if self.steps else "ok"
        if isinstance(step, Exception):
            raise step
        return step

    def close(self):
        self.closed = True


def watch(links: dict, timeout_s=1.0, startup_s=5.0):
    fired, ev = [], threading.Event()

    def on_fatal(kind, peer, message):
        fired.append((kind, peer, message))
        ev.set()

    def dial(peer):
        link = links[peer.name]
        if isinstance(link, Exception):
            raise link
        return link

    peers = [types.SimpleNamespace(name=n) for n in links]
    w = Watch(peers, timeout_s, on_fatal, dial, startup_s=startup_s, label=lambda p: f"party {p.name} (here)")
    return w.start(), fired, ev


def test_timing_names_a_silent_peer_before_the_policys_timeout():
    assert timing(30.0) == (1.0, 28.0) and timing(5.0) == (0.5, 4.0) and timing(1.0) == (0.1, 1.0)


def test_a_lost_peer_is_named_once_and_its_link_closed():
    a, b = Script(["ok", "ok", Lost("party b (here) was lost: its process ended")]), Script([])
    w, fired, ev = watch({"a": Script([]), "b": a, "c": b})
    assert ev.wait(5)
    w.stop()
    assert fired == [("lost", "b", "party b (here) was lost: its process ended")]
    assert a.closed and w.up["a"].is_set() and w.up["b"].is_set()


def test_a_stalled_peer_is_named():
    w, fired, ev = watch({"a": Script(["ok", Stalled("party a (here) stopped answering for 1s")])})
    assert ev.wait(5)
    assert fired == [("stalled", "a", "party a (here) stopped answering for 1s")]


def test_a_peer_that_never_comes_up_is_missing_with_the_dialers_reason():
    err = ConnectionRefusedError()
    err.why = "; its watch port failed the TLS handshake"
    w, fired, ev = watch({"a": err}, startup_s=0.3)
    assert ev.wait(5)
    assert fired == [("missing", "a", "party a (here) did not come up within 0.3s; its watch port failed the TLS handshake")]
    assert not w.up["a"].is_set()


def test_leaving_in_order_is_not_a_failure_and_a_stopped_watch_fires_nothing():
    w, fired, _ = watch({"a": Script(["ok", "done"]), "b": Script([])})
    assert w.wait_done(["a"], 5) == [] and w.wait_done(["b"], 0.3) == ["b"]
    w.stop()
    assert fired == []
    fired2 = []
    w2 = Watch([types.SimpleNamespace(name="a")], 1.0, lambda *a: fired2.append(a), lambda p: Script([Lost("x")]))
    w2.stop()
    w2.start()
    w2.fire("lost", "a", "after stop")
    threading.Event().wait(0.3)
    assert fired2 == []
