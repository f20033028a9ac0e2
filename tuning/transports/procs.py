"""The party processes this machine starts (the cluster back end's nodes, a SecretFlow job's
parties), from both sides:
- the launcher: ``launch`` starts one (``python -m MODULE``, named to the child by
  ``launch_env``, in its own process group, ``start_new_session``, so a group signal reaches
  whatever it spawned); ``kill_groups`` ends them; ``log_tail`` quotes a party's log;
  ``free_addresses`` picks local ports;
- the party: ``die_with_launcher`` (no orphans) and ``log_fds_to`` (its C++ and Python logs to
  its log file)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..compute_party.traffic import is_benign

ENV_PARENT = "SECPTUNE_LAUNCHER_PID"  # set by a launcher: the party dies with it
ENV_RECORD = "SECPTUNE_RECORD_DIR"  # a party appends every message it receives to DIR/<party>.bin (tests)
REPO = Path(__file__).absolute().parents[2]
STARTUP_S = 180.0  # bound on a party coming up (imports, links) on a busy machine


def launch_env() -> dict:
    """The environment for a party process this one launches (and outlives)."""
    return dict(os.environ, **{ENV_PARENT: str(os.getpid())})


def launch(module: str, args: list, stdout, stderr) -> subprocess.Popen:
    """``python -m module args`` as a party process of this one: this checkout importable, CPU
    only, unbuffered, in its own process group; it dies with this process (``die_with_launcher``)."""
    env = launch_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr, env=env, start_new_session=True)


def log_tail(path, n: int = 15, indent: str = "") -> str:
    """The last ``n`` lines of a party's log (without SPU's benign start-up notices), or ""."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(indent + s for s in [s for s in lines if not is_benign(s)][-n:])


def free_addresses(n: int, host: str = "127.0.0.1") -> list:
    """``n`` distinct host:port addresses free on this machine now (all held until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [f"{host}:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


def record_path(party: str):
    """Where a party records the messages it receives (``ENV_RECORD``), or None."""
    base = os.environ.get(ENV_RECORD)
    if not base:
        return None
    Path(base).mkdir(parents=True, exist_ok=True)
    return Path(base) / f"{party}.bin"


def under_launcher() -> bool:
    return bool(os.environ.get(ENV_PARENT))


def die_with_launcher(sig: int) -> None:
    """When started by a launcher (``launch_env``), get ``sig`` when it dies; exit now if it
    already has. Linux only (prctl); elsewhere a no-op."""
    import ctypes

    parent = os.environ.get(ENV_PARENT)
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the launcher died before prctl
        os._exit(1)


def log_fds_to(log_path, keep_stdout: bool = False):
    """File descriptors 1 and 2 (SPU's C++ log, Python's stderr) to ``log_path`` (appended), line
    buffered. ``keep_stdout``: returns a stream on the original stdout, for what the launcher
    should still see (else None, and the original is closed here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    original = os.fdopen(os.dup(1), "w", buffering=1) if keep_stdout else None
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    return original


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
