"""What several test modules share: the toy data set and the scan for a job's live processes."""
from __future__ import annotations

import os
from pathlib import Path


def toy_csv(path: Path) -> tuple[Path, list]:
    """Two clearly separable classes (disjoint word sets), 10 examples each: the file and its texts."""
    pos = ["great fun", "wonderful", "loved it", "brilliant", "superb"]
    neg = ["terrible", "awful", "hated it", "boring", "dull mess"]
    rows = [(f"{pos[i % 5]} {i}", "positive") for i in range(10)] + [(f"{neg[i % 5]} {i}", "negative")
                                                                      for i in range(10)]
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    return path, [t for t, _ in rows]


def pids_with(marker: str, module: str) -> list:
    """Live processes running ``module`` (e.g. ``tuning.backends.node``) whose command line also
    contains ``marker`` (a run's own directory)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if module in cmd and marker in cmd:
                out.append(int(d))
    return out
