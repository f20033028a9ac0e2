"""The package layout: who may import whom, no import cycles (deferred imports included), every
module importable alone, and no module changing the environment on import."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).absolute().parent.parent
PACKAGES = ("spu_models", "tuning", "bench")

# what each part may import (besides itself, the standard library and third-party packages):
# the shared base, then one package per role, the transports that carry the roles' calls, the data
# owner who drives a session over a transport, and the entry points (cli, sfjob) on top
BASE = {"spu_models", "tuning.errors", "tuning.cache", "tuning.datasets", "tuning.policy", "tuning.programs"}
ALLOWED = {
    "spu_models": set(),
    "tuning.errors": set(),
    "tuning.cache": {"tuning.errors"},
    "tuning.datasets": {"tuning.errors", "tuning.cache"},
    "tuning.policy": {"spu_models", "tuning.errors"},
    "tuning.programs": {"spu_models", "tuning.errors"},
    "tuning.model_owner": BASE,
    "tuning.compute_party": BASE | {"tuning.model_owner"},  # it checks the model owner's approvals
    "tuning.transports": BASE | {"tuning.model_owner", "tuning.compute_party"},
    "tuning.data_owner": BASE | {"tuning.model_owner", "tuning.transports"},  # the tokenizer; its session
    # tuning/__init__.py, cli.py, sfjob.py: the entry points
    "tuning": BASE | {"tuning.model_owner", "tuning.compute_party", "tuning.transports", "tuning.data_owner"},
    "bench": BASE | {"tuning.model_owner", "tuning.compute_party", "tuning.transports", "tuning.data_owner"},
}
# bench stands outside the product: the one way in is `secptune bench NAME`, tuning.cli reading
# bench's registry (the package ``bench`` itself: BENCHES, run), never a benchmark's module
PRODUCT_TO_BENCH = {("tuning.cli", "bench")}


def modules() -> dict:
    """Project module name -> source path."""
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def part_of(module: str) -> str:
    """The layer a module belongs to (a key of ALLOWED)."""
    for key in sorted(ALLOWED, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    raise KeyError(module)


def imports_of(name: str, path: Path, known: set) -> set:
    """Project modules ``name`` imports, at module level or inside functions (deferred)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:  # "from x.y import z": z may be a name, not a module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_import_follows_the_layers(graph):
    # the package ``tuning`` itself (its __init__: configure_jax, nothing else) is open to every
    # process entry point, e.g. a SecretFlow party's process (tuning.sfjob)
    bad = [f"{m} imports {t}" for m, ts in graph.items() for t in ts
           if part_of(t) != part_of(m) and part_of(t) not in ALLOWED[part_of(m)] and t != "tuning"
           and (m, t) not in PRODUCT_TO_BENCH]
    assert bad == []


def test_the_product_imports_bench_only_where_the_cli_dispatches_to_its_registry(graph):
    into_bench = {(m, t) for m, ts in graph.items() if part_of(m) != "bench" for t in ts if part_of(t) == "bench"}
    assert into_bench == PRODUCT_TO_BENCH


def test_bench_uses_only_the_products_public_names():
    # no "from tuning.x import _y", no module "_z", no "obj._attr": the benchmarks read the product
    # as a user's code would, so a private change inside it cannot break (or be hidden by) a bench
    bad = []
    for m, path in modules().items():
        if part_of(m) != "bench":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] in PACKAGES[:2]:
                names = node.module.split(".") + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [part for a in node.names if a.name.split(".")[0] in PACKAGES[:2] for part in a.name.split(".")]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            bad += [f"{m}:{node.lineno} {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_no_import_cycles_even_through_deferred_imports(graph):
    # parent packages are imported on the way to a submodule: not an edge of the code's own
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycle.append(path + [m, t])
                return
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert cycle == [], " -> ".join(cycle[0])


# Forks one child per project module from a parent that imported only third-party packages: each
# child imports its module with no other project module loaded (as a fresh interpreter would, less
# the seconds of importing jax each time) and reports whether os.environ changed.
_IMPORT_ALONE = r"""
import importlib, json, os, sys
{third}
base = dict(os.environ)
for m in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(m)
            out = {{"changed": sorted(k for k in set(os.environ) | set(base) if os.environ.get(k) != base.get(k))}}
        except BaseException as e:
            out = {{"error": f"{{type(e).__name__}}: {{e}}"}}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    print("RESULT", json.dumps({{"module": m, "status": status, **(json.loads(data) if data else {{}})}}), flush=True)
"""


def test_every_module_imports_alone_and_leaves_the_environment_alone():
    # third-party packages may set their own variables on import (jax sets TF_CPP_MIN_LOG_LEVEL):
    # imported first, so that only the project's own changes show
    third = "import jax, jax.numpy, flax.linen, optax, evosax, spu, spu.api, spu.utils.frontend, transformers, grpc, yaml"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(REPO)
    names = sorted(m for m in modules() if not m.endswith("__main__"))
    p = subprocess.run([sys.executable, "-c", _IMPORT_ALONE.format(third=third), *names], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = {r["module"]: r for r in (json.loads(ln[len("RESULT "):]) for ln in p.stdout.splitlines()
                                        if ln.startswith("RESULT "))}
    assert sorted(results) == names  # every module was tried
    failed = [(m, r.get("error"), r["status"]) for m, r in results.items() if r["status"] != 0 or "error" in r]
    assert failed == []
    changed = [(m, r["changed"]) for m, r in results.items() if r["changed"]]
    assert changed == [], "modules that change os.environ on import"
