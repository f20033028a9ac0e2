"""A compute party's own traffic: bytes and send actions per run, and the per-op table, read
from SPU's profile log (SPU 0.9.3b0 has no Python API for traffic). With
``enable_pphlo_profile`` a runtime logs, after every run, one line per op kind and a total:

    [api.cc:223] - pphlo.dot, executed 15 times, duration 0.06s, send bytes 458848 recv bytes ...
    [api.cc:233] Link details: total send bytes 7805296, recv bytes 7947696, send actions 2706, ...

A party process points its stdout (SPU's C++ log) at its log file and reads back the part each
run wrote (:class:`LogTraffic`); in-process parties share one stdout (:func:`capture_fd_stdout`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import sys
import tempfile
from pathlib import Path

LINK_RE = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), recv actions (\d+)")
OP_RE = re.compile(r"- (pphlo\.[\w.: ]+?), executed (\d+) times, duration ([\d.e+-]+)s, send bytes (\d+) "
                   r"recv bytes (\d+), send actions (\d+), recv actions (\d+)")

# SPU's start-up notices that say nothing to a user: yacl falling back to OpenSSL's entropy
# source (no hardware source in this VM) and its thread-pool size
BENIGN = ("entropy source", "Create a fixed thread pool")


def is_benign(line: str) -> bool:
    return any(b in line for b in BENIGN)


def echo_log(text: str) -> None:
    """Forward captured C++ log lines to stderr, less the benign start-up notices."""
    lines = [s for s in text.splitlines() if s.strip() and not is_benign(s)]
    if lines:
        print("\n".join(lines), file=sys.stderr, flush=True)


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


def flush_c_stdout() -> None:
    """Flush Python's and C's stdio buffers (SPU's log lines) so the log file is complete."""
    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)


class LogTraffic:
    """This party's traffic per run, from the part of its log file written since the last read."""

    def __init__(self, log_path):
        self.path = Path(log_path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def mark(self) -> None:
        """Skip what is in the log now (before a run)."""
        flush_c_stdout()
        self.offset = self.path.stat().st_size

    def read(self) -> tuple:
        """(PartyCost of the last run logged since ``mark``, the summed per-op table)."""
        flush_c_stdout()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read()
        self.offset += len(text)
        links, ops = parse_profile(text.decode("utf-8", errors="replace"))
        return (links[-1] if links else PartyCost()), ops
