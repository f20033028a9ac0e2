#!/usr/bin/env bash
# Create .venv and install the verified dependency set. Idempotent; re-runs only when inputs change.
#
# Why two steps: secretflow-lite 1.11.0b1 pins sdc-sdk/sdc-apis, which are not in the package index
# here and are not needed to import it, so it goes in with --no-deps; its other dependencies are
# listed (and pinned) in requirements.lock.txt. torch (CPU) is a *test-only* dependency: the parity
# tests compare our Flax models with transformers' PyTorch reference implementations. torch pulls
# in a new setuptools, and secretflow imports pkg_resources, so setuptools is pinned back last.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.installed
want=$(cat requirements.lock.txt requirements-test.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' \
  || { echo "setup: Python 3.11 is required (set PYTHON=...)" >&2; exit 2; }
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
pipi() { $VENV/bin/pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v -e "is ignored: it is neither" -e "which is not installed" -e "which is incompatible" -e "^ERROR: pip's dependency resolver" || true; }
echo "setup: installing secretflow-lite (--no-deps) ..."
pipi --no-deps "secretflow-lite==1.11.0b1"
echo "setup: installing the pinned dependency set (a few minutes the first time) ..."
pipi -r requirements.lock.txt
echo "setup: installing test-only dependencies ..."
pipi -r requirements-test.txt
pipi "setuptools>=65.5.1,<70"
pipi --no-deps -e .
$VENV/bin/python -c "import secretflow, spu, jax, flax, transformers, evosax, gguf, pkg_resources" \
  || { echo "setup: the environment does not import; see the messages above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: ok ($VENV)"
