"""A TLS-only gate in front of a brpc port.

SPU 0.9.3's brpc link (yacl) has no switch to refuse plaintext: with TLS configured, its server
still parses and answers plaintext HTTP on the same port. So a party's process listens on the
link's public address itself (:class:`TLSGate`) and brpc listens on a Unix socket in a private
directory (``backend``) instead. For every connection the gate peeks at the first bytes: only a
TLS ClientHello record is passed on, byte for byte, both ways, to brpc, which still does the TLS
(the pinned-certificate check stays brpc's own); anything else is closed with no byte sent.

A Unix socket rather than a loopback port: no other user of the host can reach brpc's plaintext
path (the directory is 0700), and no port has to be picked while other processes are picking
theirs. brpc connects to peers' public addresses only; its own address is never dialled.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

from ..errors import UserError

HELLO_S = 10.0  # how long a new connection may take to send its first 6 bytes
CHUNK = 1 << 20  # bytes per copy (and the splice pipe's size)


def is_client_hello(head: bytes) -> bool:
    """The first 6 bytes of a TLS connection: a handshake record (0x16), record version 3.x
    (x <= 4), whose first message is a ClientHello (type 1)."""
    return len(head) >= 6 and head[0] == 0x16 and head[1] == 3 and head[2] <= 4 and head[5] == 1


_LIVE: set = set()  # this process's gates


def stop_all() -> None:
    """Stop every gate of this process (a party about to ``os._exit``: no socket directory left)."""
    for g in list(_LIVE):
        g.stop()


def socket_base() -> Path:
    """Where the gates' private directories are (``secptune-gate-PID-*``)."""
    base = Path(tempfile.gettempdir())
    return base if len(str(base)) <= 60 else Path("/tmp")  # a Unix socket's path has at most 107 bytes


def remove_stale() -> None:
    """Remove the gate directories of processes that ended without stopping their gates (killed,
    crashed): each new gate does, and so do launchers once they reaped their parties."""
    for old in socket_base().glob("secptune-gate-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)


def _private_dir() -> Path:
    """A new directory only this user can enter (0700), named by this process."""
    remove_stale()
    return Path(tempfile.mkdtemp(prefix=f"secptune-gate-{os.getpid()}-", dir=socket_base()))


def opens_with_hello(conn, timeout_s: float = HELLO_S) -> bool:
    """Whether TCP connection ``conn`` opens with a TLS ClientHello, within ``timeout_s`` (peeked:
    the bytes stay for whoever reads next; ``conn`` is left blocking). SO_RCVLOWAT makes the wait
    return only once 6 bytes (or the end) are there: no polling."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 6)
    conn.settimeout(timeout_s)
    try:
        head = conn.recv(6, socket.MSG_PEEK)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    except OSError:  # a timeout, a reset
        return False
    conn.settimeout(None)
    return is_client_hello(head)


def _split(addr: str) -> tuple:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class TLSGate:
    """Listens on ``bind`` (host:port) and passes TLS connections on to ``backend``
    (``unix:PATH``, what brpc is told to listen on). ``what`` names the port in errors."""

    def __init__(self, bind: str, what: str = "link"):
        host, port = _split(bind)
        self.bind, self.what = bind, what
        self._dir = _private_dir()
        self.path = self._dir / "brpc.sock"
        self.backend = f"unix:{self.path}"
        self._srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._srv.bind((host, port))
            self._srv.listen(128)
        except OSError as e:
            self._srv.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise UserError(f"cannot listen on {what} {bind}: {e.strerror or e}") from None
        self._stopped = threading.Event()
        self._conns: set = set()
        self._lock = threading.Lock()
        _LIVE.add(self)

    def start(self) -> "TLSGate":
        threading.Thread(target=self._accept, daemon=True, name=f"gate-{self.what}").start()
        return self

    def stop(self) -> None:
        """Stop listening, cut every connection through the gate, remove the socket's directory."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        _shut(self._srv)  # wakes the accept() of the gate's thread
        self._srv.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            _shut(s)
        shutil.rmtree(self._dir, ignore_errors=True)
        _LIVE.discard(self)

    # -------------------------------------------------------------------------- connections
    def _accept(self):
        while not self._stopped.is_set():
            try:
                conn, _ = self._srv.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                self._stopped.wait(0.05)  # out of file descriptors, an aborted connection: try again
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True, name=f"gate-{self.what}-in").start()

    def _handle(self, conn):
        try:
            if not opens_with_hello(conn):
                return refuse(conn)
            back = socket.socket(socket.AF_UNIX)
            back.settimeout(None)
            try:
                back.connect(str(self.path))
            except OSError:  # brpc is not listening (yet, or any more): the client retries
                back.close()
                return refuse(conn)
        except OSError:
            conn.close()
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._stopped.is_set():
                back.close()
                return refuse(conn)
            self._conns.update((conn, back))
        left = [2]  # directions still copying
        threading.Thread(target=self._pipe, args=(back, conn, left), daemon=True, name=f"gate-{self.what}-out").start()
        self._pipe(conn, back, left)

    def _pipe(self, src, dst, left: list):
        """Copy ``src`` to ``dst`` until ``src`` ends. The client's end is passed on (brpc may still
        answer); brpc's end, or an error either way, ends the connection. The second direction to
        finish closes both sockets."""
        try:
            _copy(src, dst)
            clean = True
        except OSError:
            clean = False
        if clean and src.family != socket.AF_UNIX:
            try:
                dst.shutdown(socket.SHUT_WR)  # the client is done sending; brpc sees its end
            except OSError:
                _shut(src, dst)
        else:
            _shut(src, dst)
        with self._lock:
            left[0] -= 1
            if left[0]:
                return
            self._conns.difference_update((src, dst))
        src.close()
        dst.close()


def _copy(src, dst) -> None:
    """Copy until ``src`` ends: in the kernel through a pipe (splice), else through a buffer."""
    if hasattr(os, "splice"):
        r, w = os.pipe()
        try:
            try:
                import fcntl

                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
            except (OSError, AttributeError, ImportError):
                pass  # the default pipe size works too
            moved = False
            while True:
                try:
                    n = os.splice(src.fileno(), w, CHUNK)
                except OSError as e:
                    if e.errno in (errno.EINVAL, errno.ENOSYS) and not moved:
                        break  # this kernel cannot splice these sockets: copy instead
                    raise
                if n == 0:
                    return
                moved = True
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        finally:
            os.close(r)
            os.close(w)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if not n:
            return
        dst.sendall(view[:n])


def _shut(*socks) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def refuse(conn) -> None:
    """Close without a byte: our end first (FIN), then whatever the client sent is dropped."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.setblocking(False)
        for _ in range(16):  # bounded: a client that keeps sending cannot keep this thread
            if not conn.recv(65536):
                break
    except OSError:
        pass
    conn.close()
