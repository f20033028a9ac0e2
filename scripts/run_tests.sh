#!/usr/bin/env bash
# The project's test command (README, `make test`, .ci/run). pytest's exit code 5 ("no tests
# collected") is an error here: a test run that ran nothing must not look green. Prints the
# slowest tests and the suite's wall time.
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
.venv/bin/python -m pytest --durations=25 "$@"
rc=$?
echo "run_tests: wall time $(( $(date +%s) - t0 )) s, pytest exit $rc"
if [ $rc -eq 5 ]; then
  echo "run_tests: pytest collected no tests" >&2
  exit 1
fi
exit $rc
