"""A tuning run's directory: every file a run keeps, named once, read and written here.

    run = RunDir("runs/mr")
    run.write_config(settings)       # config.json: the run's settings (TuneConfig as a dict)
    run.append_metrics(m)            # metrics.jsonl: one line per generation
    run.read_audit("tune")           # reveals.jsonl: the reveals the tune command opened

The files (what writes them, what reads them):

- ``config.json``: the run's settings; ``tune`` writes them each session, ``--resume``, predict,
  eval and the benches read them;
- ``ckpt.npz``: the loop state after the last finished generation (``trainer.save_checkpoint``);
- ``metrics.jsonl``: one JSON line per generation; ``reveals.jsonl``: every value opened to the
  data owner, one JSON line per reveal, appended as it happens by the session (``audit_path``),
  each naming the command that opened it;
- ``summary.json``, ``best_z.npy`` (the kept prompt's z; written last, it marks the run finished),
  ``head.npz`` (``--head fit``) and ``curves.png``: written at the end of the run;
- ``logits/``: ``--save-logits``' per-generation candidates and opened logits (``gen0001.npz``...)
  and the test set's (``test_zero_shot.npz``, ``test_tuned.npz``);
- ``state/``: the set-up shares the parties keep (``Session.keep_state``), so a resumed run does
  not prefill again; a cluster's nodes keep theirs on their own disks, named by this path.

Whole files go through a temporary file and a rename: a killed process leaves the old file or
the new one, never half of one. The two logs are appended a line at a time (a torn last line is
past the checkpoint's generation, and ``keep_metrics`` cuts it on resume).
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import head as fitted

CONFIG, CHECKPOINT, METRICS, AUDIT = "config.json", "ckpt.npz", "metrics.jsonl", "reveals.jsonl"
SUMMARY, BEST_Z, HEAD, CURVES, LOGITS = "summary.json", "best_z.npy", "head.npz", "curves.png", "logits"
STATE = "state"
SALT = "salt"  # in STATE: the data owner's secret for its kept shares' digests
# the commands whose reveals a run's audit holds; records of older versions name none (they were tune's)
COMMANDS = ("tune", "predict", "eval")


def atomic_write(path: Path, write, mode: int = 0o666) -> None:
    """``write(file)`` into a temporary file beside ``path`` (created with ``mode``, less the
    umask), then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays) -> None:
    """``np.savez`` of ``arrays`` to ``path``, whole or not at all."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _json_lines(path: Path) -> list:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: Path  # given as a str or a Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------ where each file lives
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def audit_path(self) -> Path:
        return self.path / AUDIT

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def best_z_path(self) -> Path:
        return self.path / BEST_Z

    @property
    def head_path(self) -> Path:
        return self.path / HEAD

    @property
    def curves_path(self) -> Path:
        return self.path / CURVES

    @property
    def logits_dir(self) -> Path:
        return self.path / LOGITS

    def logits_path(self, name: str) -> Path:
        """``logits/<name>.npz``: ``generation_name(g)``, ``test_zero_shot`` or ``test_tuned``."""
        return self.logits_dir / f"{name}.npz"

    @staticmethod
    def generation_name(generation: int) -> str:
        return f"gen{generation:04d}"

    @property
    def state_dir(self) -> Path:
        return self.path / STATE

    def state_salt(self, create: bool = True) -> bytes:
        """The data owner's secret for this run's kept shares (``state/salt``, 0600): mixed into
        every digest the parties file shares under, so that nobody who sees those digests can test
        a guessed input against them. A new run makes it (``create``); else a fresh one that
        matches nothing kept."""
        path = self.state_dir / SALT
        if path.is_file():
            return bytes.fromhex(path.read_text().strip())
        salt = os.urandom(32)
        if create:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(salt.hex().encode()), mode=0o600)
        return salt

    # ---------------------------------------------------------------------------- the run
    def is_run(self) -> bool:
        """A run wrote here: its settings, or its parties' kept shares (``secptune clean`` deletes it)."""
        return self.config_path.exists() or self.state_dir.is_dir()

    def has_checkpoint(self) -> bool:
        """A run is there (finished or not): tune wrote its first checkpoint."""
        return self.checkpoint_path.exists()

    def is_finished(self) -> bool:
        """The run's last file, the kept z, is written."""
        return self.best_z_path.is_file()

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------ config.json
    def read_config(self) -> dict:
        """The stored settings as written (OSError, ValueError: missing or not JSON)."""
        return json.loads(self.config_path.read_text())

    def write_config(self, settings: dict) -> None:
        atomic_write(self.config_path, lambda f: f.write(json.dumps(settings, indent=2).encode()))

    # ---------------------------------------------------------------------- metrics.jsonl
    def read_metrics(self) -> list:
        """One dict per finished generation (none if the file is missing)."""
        return _json_lines(self.metrics_path)

    def append_metrics(self, metrics: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def keep_metrics(self, n: int) -> None:
        """Keep the first ``n`` lines (a resumed run drops what came after its checkpoint; 0: empty)."""
        lines = self.metrics_path.read_text().splitlines()[:n] if n and self.metrics_path.exists() else []
        atomic_write(self.metrics_path, lambda f: f.write("".join(ln + "\n" for ln in lines).encode()))

    # ---------------------------------------------------------------------- reveals.jsonl
    def reset_audit(self) -> None:
        """An empty audit: a new run's (the session appends to ``audit_path`` from here on)."""
        self.audit_path.write_text("")

    def read_audit(self, command: str | None = None) -> list:
        """The audit's reveal records, or those ``command`` opened (a record without one is tune's)."""
        if command is not None and command not in COMMANDS:
            raise ValueError(f"no command {command!r} writes to a run's audit (known: {', '.join(COMMANDS)})")
        records = _json_lines(self.audit_path)
        return records if command is None else [r for r in records if r.get("command", "tune") == command]

    # ----------------------------------------------------------------------- summary.json
    def read_summary(self) -> dict | None:
        """The finished run's summary (None: not written yet)."""
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else None

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary_path, lambda f: f.write(json.dumps(summary, indent=2).encode()))

    # ------------------------------------------------------------------------- best_z.npy
    def read_best_z(self) -> np.ndarray:
        return _load_array(self.best_z_path, "search vector")

    def write_best_z(self, z: np.ndarray) -> None:
        atomic_write(self.best_z_path, lambda f: np.save(f, z))

    # --------------------------------------------------------------------------- head.npz
    def read_head(self) -> tuple[fitted.Head, np.ndarray]:
        """The fitted head and the class of each word it reads (-1: a probe word)."""
        with _load_array(self.head_path, "head") as f:
            try:
                d = {k: f[k] for k in f.files}
                return fitted.Head(d["mean"], d["scale"], d["weight"], d["bias"], float(d["c"])), d["word_groups"]
            except KeyError as e:
                raise UserError(f"{self.head_path} lacks {e}: not a head this version wrote") from None

    def write_head(self, head: fitted.Head, word_groups: np.ndarray) -> None:
        save_npz(self.head_path, **dataclasses.asdict(head), word_groups=word_groups)

    # ----------------------------------------------------------------------------- logits/
    def save_logits(self, name: str, **arrays) -> None:
        self.logits_dir.mkdir(exist_ok=True)
        save_npz(self.logits_path(name), **arrays)

    def generation_logits(self) -> list:
        """The saved generations' files, in generation order."""
        return sorted(self.logits_dir.glob("gen*.npz"))


def _load_array(path: Path, what: str):
    """``np.load`` of a run's array file, or one line saying it is damaged."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable {what} ({type(e).__name__}); the run is damaged") from None
