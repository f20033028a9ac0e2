"""``secptune audit RUN``: the data owner's record of what it opened, beside each compute party's
own record of the shares it handed out, with every difference flagged.

The data owner appends each reveal to the run's ``reveals.jsonl``; each compute party appends each
share it hands out to ``audit.jsonl`` in its own state directory (``compute_party.party``), keyed
by the run's namespace. A value opened at the data owner needs every compute party's share, so
honest records agree one to one: the same variable, kind and shape, in the same order. A reveal a
party logged that the data owner's record lacks is one the data owner's file does not admit to.
"""
from __future__ import annotations

import json
from pathlib import Path

from .cache import secptune_home
from .compute_party.party import AUDIT
from .compute_party.state import namespace
from .data_owner.rundir import RunDir
from .errors import UserError


def _lines(path: Path) -> list:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise UserError(f"{path}:{n} is not a JSON record: the log is damaged") from None
    return out


def party_logs(run: RunDir, extra: list = ()) -> dict:
    """Party name -> its records for this run: the simulator's parties' under RUN/state, this
    machine's cluster nodes' under $SECPTUNE_HOME/state, and any ``extra`` files (other hosts')."""
    ns = namespace(run.state_dir)
    logs: dict = {}
    for path in sorted(run.state_dir.glob(f"*/{AUDIT}")):  # sim: one directory per party
        logs[path.parent.name] = _lines(path)
    for path in sorted((secptune_home() / "state").glob(f"*/{AUDIT}")):  # nodes: every job they served
        recs = [r for r in _lines(path) if r.get("job") == ns]
        if recs:
            logs[path.parent.name] = recs
    for f in extra:
        recs = _lines(Path(f))
        for party in sorted({r.get("party", "?") for r in recs}):
            logs[party] = [r for r in recs if r.get("party") == party and r.get("job") in (None, ns)]
    return logs


def compare(reveals: list, logs: dict) -> list:
    """One row per opened value: the data owner's (var, kind, shape) and each party's, and the
    differences (an empty list where they agree)."""
    key = lambda r: (r.get("var"), r.get("what"), tuple(r.get("shape", ())))  # noqa: E731
    n = max([len(reveals), *map(len, logs.values())], default=0)
    rows = []
    for i in range(n):
        mine = key(reveals[i]) if i < len(reveals) else None
        theirs = {p: key(recs[i]) if i < len(recs) else None for p, recs in logs.items()}
        diffs = [f"{p} {'has no record' if t is None else f'logged {t}'}"
                 + (" (the data owner's record has none)" if mine is None else "")
                 for p, t in theirs.items() if t != mine]
        rows.append({"i": i, "data_owner": mine, "parties": theirs, "command": (reveals[i] if mine else {}).get(
            "command", "tune" if mine else None), "differences": diffs})
    return rows


def audit(run_path, extra: list = ()) -> tuple:
    """(rows, number of rows with a difference) for the run at ``run_path``."""
    run = RunDir(run_path)
    if not run.config_path.exists():
        raise UserError(f"{run.path} is not a run directory (no {run.config_path.name})")
    rows = compare(run.read_audit(), party_logs(run, extra))
    return rows, sum(1 for r in rows if r["differences"])


def render(rows: list, parties: list) -> str:
    fmt = lambda k: "-" if k is None else f"{k[0]} {k[1]} {list(k[2])}"  # noqa: E731
    out = [f"{'#':>4}  {'command':8} {'data owner':48} " + "  ".join(f"{p:>6}" for p in parties)]
    for r in rows:
        marks = "  ".join(f"{'same' if r['parties'].get(p) == r['data_owner'] else 'DIFF':>6}" for p in parties)
        out.append(f"{r['i']:>4}  {str(r['command']):8} {fmt(r['data_owner'])[:48]:48} {marks}")
        out += [f"      ! {d}" for d in r["differences"]]
    return "\n".join(out)
