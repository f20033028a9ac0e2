"""A compute party's shares of a job's set-up, kept on its own disk, so that a resumed run does
not prefill again (``Session.run(..., persist=True)``).

A value is filed under the digest of what produced it: the program's compiled code, the digests
of its inputs (the data owner's values, hashed where they are known), the out key, and the
identity of the weights and the policy. The same run resumed finds every digest again; anything
else (another model, policy, text or configuration) finds none and computes afresh, never a stale
share. Files are written whole (temporary name, then rename) in a directory only this party's
user can read (mode 0700), one directory per party.

The data owner names the digests; the party does not take its word for what a file holds. Each
file also records its share's origin (the approved program's digest and the output it was), and a
restore must name that same program and output: a kept share can come back only as what it was
(a prefill cache can never be restored as an output its approval lets open).
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from ..errors import Refused

MAGIC = b"secptune-share-2\n"  # files without the origin part (before it was kept) are refused


def digest(*parts) -> str:
    """sha256 over ``parts`` (bytes as they are, anything else by its repr), unambiguously framed."""
    h = hashlib.sha256()
    for p in parts:
        b = p if isinstance(p, bytes) else repr(p).encode()
        h.update(struct.pack("<Q", len(b)) + b)
    return h.hexdigest()


def checked_key(key) -> str:
    """``key`` if it is a sha256 hex digest (a file name that cannot leave its directory)."""
    if not isinstance(key, str) or len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not a digest: {str(key)[:70]!r}")
    return key


def namespace(run_state) -> str:
    """The name under which every party keeps one run's shares: a digest of its state path."""
    return digest("run", str(Path(run_state).resolve()))


class PartyStore:
    """One compute party's kept shares: ``digest -> (meta, chunks)`` (an SPU share's parts)."""

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def _path(self, key: str) -> Path:
        return self.root / f"{checked_key(key)}.share"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def save(self, key: str, meta: bytes, chunks: list, origin: bytes = b"") -> None:
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(chunks)))
            for part in (origin, meta, *chunks):
                f.write(struct.pack("<Q", len(part)) + part)
        os.replace(tmp, path)

    def load(self, key: str) -> tuple[bytes, bytes, list]:
        """(origin, meta, chunks) of the share filed under ``key``."""
        data = self._path(key).read_bytes()
        _check_magic(data, key)
        (n,), at, parts = struct.unpack_from("<Q", data, len(MAGIC)), len(MAGIC) + 8, []
        for _ in range(n + 2):
            (size,) = struct.unpack_from("<Q", data, at)
            parts.append(data[at + 8: at + 8 + size])
            at += 8 + size
        return parts[0], parts[1], parts[2:]

    def count(self, key: str) -> int:
        """How many chunks the share filed under ``key`` has (its header only: a public count)."""
        with open(self._path(key), "rb") as f:
            head = f.read(len(MAGIC) + 8)
        _check_magic(head, key)
        return struct.unpack_from("<Q", head, len(MAGIC))[0]

    def load_as(self, key: str, origin: bytes) -> tuple[bytes, list]:
        """(meta, chunks) of the share filed under ``key``, only if it was kept as ``origin``
        (else Refused: it stays on disk)."""
        kept, meta, chunks = self.load(key)
        if kept != origin:
            raise Refused(f"kept share {key[:12]} was {kept.decode(errors='replace')!r}, not "
                          f"{origin.decode(errors='replace')!r}; it stays on disk, nothing restored")
        return meta, chunks

    def keep(self, rt, names: list, keys: list, origins: list) -> None:
        """File runtime ``rt``'s shares of ``names`` under ``keys``, each with its origin (bytes)."""
        for name, key, origin in zip(names, keys, origins):
            share = rt.get_var(name)
            self.save(key, share.meta, share.share_chunks, origin)

    def restore(self, rt, names: list, keys: list, origins: list) -> None:
        """Set runtime ``rt``'s variables ``names`` to the shares filed under ``keys``, each only if
        it was kept as ``origins[i]`` (else Refused, nothing set)."""
        loaded = [to_share(*self.load_as(key, origin)) for key, origin in zip(keys, origins)]
        for name, share in zip(names, loaded):
            rt.set_var(name, share)


def _check_magic(data: bytes, key: str) -> None:
    if not data.startswith(MAGIC):
        raise Refused(f"kept share {key[:12]} has no recorded origin (kept by an older secptune); "
                      "`secptune clean` the run and set it up again")


def to_share(meta: bytes, chunks: list):
    """An SPU ``libspu.Share`` from its parts."""
    from spu import libspu

    share = libspu.Share()
    share.meta, share.share_chunks = meta, list(chunks)
    return share
