"""`pytest_test`: a py_test that runs pytest on its test files through //tools/pytest:pytest_main.py."""

def pytest_test(name, srcs, deps = [], data = [], marker = "not slow", deselect = [], size = "medium", **kwargs):
    """One Bazel test for one or more pytest modules of the same package.

    Args:
      name: the test's name.
      srcs: the test modules (plus conftest.py and helpers they import).
      deps: the py_library targets the tests import.
      data: files the tests read.
      marker: pytest's `-m` expression; the default runs the fast tests only.
      deselect: pytest node ids left out (`--deselect`), each with its reason in the BUILD file.
      size: Bazel's test size (its default timeout).
      **kwargs: passed to py_test (tags, timeout, ...).
    """
    tests = [s for s in srcs if s.startswith("test_") and s.endswith(".py")]
    pkg = native.package_name()
    native.py_test(
        name = name,
        srcs = ["//tools/pytest:pytest_main.py"] + srcs,
        main = "//tools/pytest:pytest_main.py",
        python_version = "PY3",
        srcs_version = "PY3",
        # Bazel tokenizes args like a shell: quote the marker expression.
        args = ["-m", "'%s'" % marker] +
               ["--deselect='%s'" % d for d in deselect] +
               ["%s/%s" % (pkg, t) if pkg else t for t in tests],
        # pyproject.toml holds pytest's configuration; the venv's inputs key the cached results.
        data = ["//:venv_inputs"] + data,
        deps = deps,
        size = size,
        **kwargs
    )
