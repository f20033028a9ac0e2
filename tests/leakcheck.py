"""Finding secrets in bytes: what a party received, framed as it received it (tests only)."""
from __future__ import annotations

import numpy as np


class WindowDetector:
    """Finds the raw bytes of k consecutive items of any of ``arrays`` in a blob, at any offset."""

    def __init__(self, arrays, k: int = 4):
        self.k, self.index = k, {}  # item size -> (sorted first words, set of window bytes)
        for arr in arrays:
            words = np.ascontiguousarray(arr).ravel()
            words = words.view(f"u{words.dtype.itemsize}")
            firsts, wins = self.index.setdefault(words.dtype.itemsize, ([], set()))
            firsts.append(words)
            wins.update(words[i:i + k].tobytes() for i in range(len(words) - k + 1))
        self.index = {n: (np.unique(np.concatenate(f)), w) for n, (f, w) in self.index.items()}

    def __call__(self, blob: bytes) -> bool:
        for size, (firsts, wins) in self.index.items():
            for a in range(size):
                u = np.frombuffer(blob, f"u{size}", count=(len(blob) - a) // size, offset=a)
                for j in np.nonzero(np.isin(u[: max(0, len(u) - self.k + 1)], firsts))[0]:
                    if u[j:j + self.k].tobytes() in wins:
                        return True
        return False


def leaks(blob: bytes, detectors: dict) -> list:
    """The kinds of secret found in ``blob``."""
    return [kind for kind, found in detectors.items() if found(blob)]
