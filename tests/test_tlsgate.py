"""The TLS-only gate in front of brpc's ports (tuning.transports.tlsgate), against a tiny TLS echo
server standing in for brpc on the gate's Unix socket: plaintext gets no byte and a closed
connection, TLS goes through both ways byte for byte, and either end closing ends the other."""
import os
import socket
import ssl
import threading
import time

import pytest
from helpers import FORGED_PUSH, plaintext_reply

from tuning.transports import tls
from tuning.transports.tlsgate import TLSGate, is_client_hello, stop_all


def _free_addr() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    return addr


@pytest.fixture()
def echo_gate(tmp_path):
    """A started gate whose backend is a TLS echo server (a throwaway certificate); yields (gate,
    client context trusting that certificate, the backend's connections: accepted and ended)."""
    paths = tls.generate_keys(["backend"], tmp_path / "keys")
    cert, key = paths["backend"]
    gate = TLSGate(_free_addr(), "test link").start()
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(gate.path))
    srv.listen()
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    seen = {"accepted": 0, "ended": 0}

    def echo(raw):
        try:
            with sctx.wrap_socket(raw, server_side=True) as s:
                while True:
                    data = s.recv(1 << 16)
                    if not data or data == b"bye":
                        return
                    s.sendall(data)
        except OSError:
            pass
        finally:
            seen["ended"] += 1

    def serve():
        while True:
            try:
                raw, _ = srv.accept()
            except OSError:
                return
            seen["accepted"] += 1
            threading.Thread(target=echo, args=(raw,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(cert)
    yield gate, cctx, seen
    gate.stop()
    srv.close()


def _tls(gate, cctx):
    host, _, port = gate.bind.rpartition(":")
    raw = socket.create_connection((host, int(port)), timeout=10)
    return cctx.wrap_socket(raw, server_hostname="backend")


def test_plaintext_gets_nothing_and_tls_goes_through(echo_gate):
    gate, cctx, seen = echo_gate
    # plaintext, however it starts: no byte back, the connection closed at once, nothing reaches brpc
    for data in (FORGED_PUSH, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                 b"\x16\x03\x01\x00\x05\x02xxxxxxxx", b"\x80\x2e\x01\x03\x01" + b"\0" * 45):  # not a ClientHello
        t0 = time.monotonic()
        assert plaintext_reply(gate.bind, data) == b"", data
        assert time.monotonic() - t0 < 2, data  # closed, not left waiting
    assert seen["accepted"] == 0
    # control: the TLS server itself answers a malformed handshake record with an alert
    assert plaintext_reply(f"unix:{gate.path}", b"\x16\x03\x01\x00\x05\x02xxxxxxxx")[:1] == b"\x15"
    # TLS: the handshake and the data pass, both ways, byte for byte (4 MiB each way)
    with _tls(gate, cctx) as s:
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"
        big = os.urandom(4 << 20)
        got = bytearray()
        sender = threading.Thread(target=s.sendall, args=(big,))
        sender.start()
        while len(got) < len(big):
            got += s.recv(1 << 20)
        sender.join()
        assert bytes(got) == big
    assert seen["accepted"] == 2
    assert is_client_hello(b"\x16\x03\x01\x02\x00\x01") and not is_client_hello(FORGED_PUSH[:6])


def test_either_end_closing_ends_the_other(echo_gate):
    gate, cctx, seen = echo_gate
    with _tls(gate, cctx) as s:  # the backend closes: the client sees the end
        s.sendall(b"bye")
        s.settimeout(5)
        assert s.recv(10) == b""
    with _tls(gate, cctx) as s:  # the client closes: the backend sees the end
        s.sendall(b"ping")
        assert s.recv(10) == b"ping"
    deadline = time.monotonic() + 5
    while seen["ended"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == {"accepted": 2, "ended": 2}
    # stopping the gate cuts a live connection and frees the port and the socket's directory
    s = _tls(gate, cctx)
    s.sendall(b"x")
    assert s.recv(10) == b"x"
    stop_all()
    s.settimeout(5)
    try:
        assert s.recv(10) == b""
    except OSError:
        pass
    s.close()
    assert not gate.path.parent.exists()
    host, _, port = gate.bind.rpartition(":")
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind((host, int(port)))
    probe.close()


def _serve(handle):
    """A TCP server on a free local port that runs ``handle(conn)`` per connection; its address."""
    srv = socket.create_server(("127.0.0.1", 0))

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv, f"127.0.0.1:{srv.getsockname()[1]}"


def _tls_server(ctx):
    def handle(raw):
        try:
            with ctx.wrap_socket(raw, server_side=True) as s:
                s.settimeout(5)
                s.recv(1)
        except OSError:
            pass
    return handle


def test_check_peer_tells_a_wrong_peer_from_one_not_up_yet(tmp_path):
    """What answers at a peer's link port, as a party checks it while SecretFlow waits for the link
    (``tls.check_peer``): the pinned peer is "ok"; plaintext, another certificate, or a refusal of
    this party's certificate is "wrong" at once; nothing there, or a port that closes at the TLS
    handshake (our gate while brpc is not listening yet), is "wait"."""
    keys = tls.generate_keys(["alice", "p0", "mallory"], tmp_path / "keys")
    pem = {n: open(c, "rb").read() for n, (c, _) in keys.items()}
    alice = tls.pinned_tls("alice", *keys["alice"], {"alice": pem["alice"], "p0": pem["p0"]}).client("p0")
    p0_takes_alice = tls.pinned_tls("p0", *keys["p0"], {"p0": pem["p0"], "alice": pem["alice"]}).server
    p0_refuses_alice = tls.pinned_tls("p0", *keys["p0"], {"p0": pem["p0"], "mallory": pem["mallory"]}).server
    impostor = tls.pinned_tls("mallory", *keys["mallory"], {"mallory": pem["mallory"], "alice": pem["alice"]}).server

    def http(conn):
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    servers = {}
    for name, handle in [("ok", _tls_server(p0_takes_alice)), ("http", http),
                         ("refuses", _tls_server(p0_refuses_alice)), ("impostor", _tls_server(impostor))]:
        servers[name] = _serve(handle)
    addr = {n: a for n, (_, a) in servers.items()}
    gate = TLSGate(_free_addr(), "test link").start()  # nothing listens behind it
    try:
        assert tls.check_peer(addr["ok"], alice, "p0") == ("ok", "")
        state, why = tls.check_peer(addr["http"], alice, "p0")
        assert state == "wrong" and why.startswith("it does not answer in TLS"), why
        state, why = tls.check_peer(addr["impostor"], alice, "p0")
        assert state == "wrong" and "not the one the deployment pins for p0" in why, why
        state, why = tls.check_peer(addr["refuses"], alice, "p0")
        assert state == "wrong" and why.startswith("it refused this party's certificate"), why
        assert tls.check_peer(gate.bind, alice, "p0") == ("wait", "it closed the connection at the TLS handshake")
        state, why = tls.check_peer(_free_addr(), alice, "p0")
        assert state == "wait" and why.startswith("no connection"), why
    finally:
        gate.stop()
        for srv, _ in servers.values():
            srv.close()
