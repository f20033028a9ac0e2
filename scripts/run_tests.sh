#!/usr/bin/env bash
# The project's test command (README, `make test`, .ci/run). pytest's exit code 5 ("no tests
# collected") is an error here: a test run that ran nothing must not look green. Prints the
# slowest tests and the suite's wall time. Two workers (pytest-xdist), one test module per worker
# at a time: the multi-process tests spend much of their time waiting on links and processes,
# which the other worker's tests fill (make test: 21-24 min serially, 12 min so on 2 cores). Files
# go out in the order tests/conftest.py sorts them (slowest first), not xdist's by number of tests.
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
.venv/bin/python -m pytest -n "${SECPTUNE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=25 "$@"
rc=$?
echo "run_tests: wall time $(( $(date +%s) - t0 )) s, pytest exit $rc"
if [ $rc -eq 5 ]; then
  echo "run_tests: pytest collected no tests" >&2
  exit 1
fi
exit $rc
