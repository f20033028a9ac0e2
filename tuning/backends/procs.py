"""Ending the party processes this machine started (the cluster back end's nodes, a SecretFlow
job's parties): each runs in its own process group (``start_new_session``), so a group signal
reaches whatever it spawned."""
from __future__ import annotations

import os
import signal
import subprocess
import time


def kill_groups(procs: list, grace_s: float) -> None:
    """SIGTERM every process group (with SIGCONT, so a stopped process handles it too), SIGKILL
    what is left after ``grace_s``, and reap all (at most ``grace_s`` + 10 s)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for proc in procs:
            for s in (sig, signal.SIGCONT):
                try:
                    os.killpg(proc.pid, s)  # start_new_session: pgid == pid
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + wait_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in procs):
            return
