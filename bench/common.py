"""Shared output helpers for benchmarks: markdown tables, JSON and PNG into bench/results/."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import jax
    import spu

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(), "spu": spu.__version__, "jax": jax.__version__}


def tag_suffix(tag: str) -> str:
    """--tag as a file-name suffix: 'x' and '_x' both give '_x' (a bare tag used to glue onto the name)."""
    return tag if not tag or tag.startswith("_") else "_" + tag


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def save(name: str, payload: dict, table: str, out_dir: Path | None = None) -> Path:
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), **payload}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(table)
    print(table)
    print(f"saved {out / name}.json / .md")
    return out
