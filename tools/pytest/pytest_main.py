"""Entry point of the project's Bazel py_test targets: runs pytest on the given test files.

Bazel runs a test in a read-only sandbox, from the test's runfiles tree, with only $TEST_TMPDIR
writable and without the caller's environment. This main

* imports the project from the runfiles tree: the venv has the project installed in editable mode,
  pointing at whichever checkout ran `make setup`, so the runfiles workspace root goes first on
  sys.path (and on PYTHONPATH, for the CLI subprocesses some tests start), and it checks that
  `tuning`, `spu_models` and `bench` really come from there;
* points every writable location at $TEST_TMPDIR: pytest's tmp_path (--basetemp), TMPDIR,
  $SECPTUNE_HOME (the asset cache and the JAX compilation cache of tuning/cli.py) and HOME;
* turns off pytest's cache and Python's bytecode files, which would be written into the tree;
* writes Bazel's JUnit XML to $XML_OUTPUT_FILE, and maps `bazel test --test_filter=EXPR` to
  pytest's `-k EXPR`.

Arguments are passed to pytest (the BUILD file gives the marker expression and the test files).
"""
import os
import sys

PACKAGES = ("tuning", "spu_models", "bench")


def workspace_root() -> str:
    srcdir, workspace = os.environ.get("TEST_SRCDIR"), os.environ.get("TEST_WORKSPACE")
    if srcdir and workspace:
        return os.path.join(os.path.abspath(srcdir), workspace)
    # `bazel run`: this file is <runfiles>/<workspace>/tools/pytest/pytest_main.py. abspath, not
    # realpath: the runfiles are symlinks into the source tree, and the tree is what we avoid.
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_environment(root: str) -> str:
    tmp = os.environ.get("TEST_TMPDIR") or os.path.join(root, "..", "_tmp")
    tmp = os.path.abspath(tmp)
    for sub in ("tmp", "secptune-home", "pytest"):
        os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    env = os.environ
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["TMPDIR"] = os.path.join(tmp, "tmp")
    env.setdefault("HOME", tmp)
    env.setdefault("SECPTUNE_HOME", os.path.join(tmp, "secptune-home"))
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the fast tests use no model hub
    env.setdefault("MPLBACKEND", "Agg")
    sys.dont_write_bytecode = True
    sys.path[:] = [root, *(p for p in sys.path if os.path.abspath(p or ".") != root)]
    os.chdir(root)
    return tmp


def check_imports(root: str) -> None:
    import importlib

    for name in PACKAGES:
        path = os.path.abspath(importlib.import_module(name).__file__)
        if not path.startswith(root + os.sep):
            sys.exit(f"pytest_main: {name} was imported from {path}, not from the runfiles tree {root}")
    print(f"pytest_main: {', '.join(PACKAGES)} imported from the runfiles tree {root}", flush=True)


def main(argv) -> int:
    root = workspace_root()
    tmp = setup_environment(root)
    check_imports(root)
    import pytest

    args = ["-p", "no:cacheprovider", f"--basetemp={os.path.join(tmp, 'pytest')}"]
    if os.path.exists(os.path.join(root, "pyproject.toml")):
        args += ["-c", os.path.join(root, "pyproject.toml"), f"--rootdir={root}"]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    if os.environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
    rc = pytest.main(args + list(argv))
    if rc == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("pytest_main: pytest collected no tests", file=sys.stderr)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
